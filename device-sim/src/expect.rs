//! What the pipeline should report: windows regenerated from the ledger's
//! plans by the simulator's own arithmetic.
//!
//! One device at a time: its readings are regenerated from every run it
//! appears in, folded into its windows, and (by the caller) compared and
//! dropped, so memory holds one device's windows plus the fleet's.
//!
//! Every window keeps its values as an exact multiset ([`Values`]), so that
//! verify can hold the sketch's quantiles to the true order statistics. The
//! simulator rounds every value to 3 decimals, so a window holds at most as
//! many distinct values as its signal's range has thousandths, however many
//! readings fall in it.

use std::collections::BTreeMap;

use crate::lateness::{Class, classify, too_late_boundary, window_end};
use crate::ledger::Run;
use crate::payload::DeviceValues;
use crate::plan::RESOLUTIONS_MS;

/// An exact multiset of values: a count per distinct value, in value order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Values {
    /// [`order_key`] of a value -> how many times it occurs.
    counts: BTreeMap<u64, u64>,
    len: u64,
}

/// Maps a float to an integer with the same order (`total_cmp`'s).
fn order_key(v: f64) -> u64 {
    let bits = v.to_bits();
    if bits >> 63 == 1 {
        !bits
    } else {
        bits | 1 << 63
    }
}

fn from_order_key(k: u64) -> f64 {
    if k >> 63 == 1 {
        f64::from_bits(k & !(1 << 63))
    } else {
        f64::from_bits(!k)
    }
}

impl Values {
    pub fn add(&mut self, v: f64) {
        *self.counts.entry(order_key(v)).or_default() += 1;
        self.len += 1;
    }

    pub fn merge(&mut self, o: &Values) {
        for (k, n) in &o.counts {
            *self.counts.entry(*k).or_default() += n;
        }
        self.len += o.len;
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The value at 0-based `rank` in ascending order, if there is one.
    pub fn at(&self, rank: u64) -> Option<f64> {
        let mut seen = 0;
        for (k, n) in &self.counts {
            seen += n;
            if seen > rank {
                return Some(from_order_key(*k));
            }
        }
        None
    }

    /// Each distinct value and how often it occurs, ascending.
    pub fn iter(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        self.counts.iter().map(|(k, n)| (from_order_key(*k), *n))
    }

    /// Distinct values held: what the multiset costs in memory.
    pub fn distinct(&self) -> usize {
        self.counts.len()
    }
}

/// Some readings of a window, folded.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    pub count: u64,
    pub sum: f64,
    /// Sum of absolute values: the scale for judging `sum`'s rounding, which
    /// depends on the order the pipeline added values in.
    pub sum_abs: f64,
    pub sum_sq: f64,
    pub min: f64,
    pub max: f64,
    /// (ts, value) of the earliest reading; ties: the smaller value.
    pub first: (i64, f64),
    /// (ts, value) of the latest reading; ties: the larger value.
    pub last: (i64, f64),
    pub values: Values,
}

impl Default for Part {
    fn default() -> Self {
        Part {
            count: 0,
            sum: 0.0,
            sum_abs: 0.0,
            sum_sq: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            first: (i64::MAX, 0.0),
            last: (i64::MIN, 0.0),
            values: Values::default(),
        }
    }
}

/// `a` comes before `b` in (ts, value) order.
pub fn point_before(a: (i64, f64), b: (i64, f64)) -> bool {
    (a.0, a.1.total_cmp(&b.1)) < (b.0, std::cmp::Ordering::Equal)
}

impl Part {
    pub fn add(&mut self, ts: i64, v: f64) {
        self.count += 1;
        self.sum += v;
        self.sum_abs += v.abs();
        self.sum_sq += v * v;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        if point_before((ts, v), self.first) {
            self.first = (ts, v);
        }
        if point_before(self.last, (ts, v)) {
            self.last = (ts, v);
        }
        self.values.add(v);
    }

    pub fn merge(&mut self, o: &Part) {
        if o.count == 0 {
            return;
        }
        self.count += o.count;
        self.sum += o.sum;
        self.sum_abs += o.sum_abs;
        self.sum_sq += o.sum_sq;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
        if point_before(o.first, self.first) {
            self.first = o.first;
        }
        if point_before(self.last, o.last) {
            self.last = o.last;
        }
        self.values.merge(&o.values);
    }

    /// Population variance from the sums, as the pipeline computes it.
    pub fn variance(&self) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let n = self.count as f64;
        let mean = self.sum / n;
        (self.sum_sq / n - mean * mean).max(0.0)
    }
}

/// A window as expected.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExpectedAgg {
    /// Readings certainly accepted.
    pub sure: Part,
    /// Readings that may or may not have been accepted (an unacknowledged
    /// message, or a `too_late` decision too close to call): a window with
    /// any is uncertain, and held only to what does not depend on their fate.
    pub maybe: Part,
    /// The least and most `late_count` can be (see [`crate::lateness`]). An
    /// uncertain reading may add 0 or 1, so `late_lo` may undercount (and go
    /// below 0) in an uncertain window: it is a bound, not a value.
    pub late_lo: i64,
    pub late_hi: i64,
}

impl ExpectedAgg {
    pub fn add(&mut self, ts: i64, v: f64, late: bool, maybe: bool) {
        if maybe {
            self.maybe.add(ts, v);
            self.late_hi += 1;
            return;
        }
        self.sure.add(ts, v);
        if late {
            self.late_lo += 1;
            self.late_hi += 1;
        }
    }

    pub fn merge(&mut self, o: &ExpectedAgg) {
        self.sure.merge(&o.sure);
        self.maybe.merge(&o.maybe);
        self.late_lo += o.late_lo;
        self.late_hi += o.late_hi;
    }

    pub fn is_uncertain(&self) -> bool {
        self.maybe.count > 0
    }

    /// Every reading, as if each uncertain one had been accepted.
    pub fn all(&self) -> Part {
        let mut all = self.sure.clone();
        all.merge(&self.maybe);
        all
    }
}

/// `(metric, resolution ms, window start)`.
pub type WindowKey = (String, i64, i64);
pub type Windows = BTreeMap<WindowKey, ExpectedAgg>;

/// Readings expected in total, for the quick catch-up check.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Readings certainly accepted.
    pub certain: u64,
    /// Readings that may or may not have been accepted.
    pub maybe: u64,
}

/// Regenerates the windows of one device from every run it appears in:
/// `occurrences` are (run position in `runs`, device index in that run).
/// Runs without exceptions (interrupted) are refused by the caller.
pub fn device_windows(runs: &[Run], occurrences: &[(usize, u32)]) -> Windows {
    let mut windows = Windows::new();
    for &(r, index) in occurrences {
        let Some(run) = runs.get(r) else { continue };
        let plan = &run.start.plan;
        let no_exceptions = Default::default();
        let ex = run.exceptions.as_ref().unwrap_or(&no_exceptions);
        let i = index as usize;
        let first = run.start.first_seq.get(i).copied().unwrap_or(0);
        let count = run.start.messages.get(i).copied().unwrap_or(0);
        let mut values = DeviceValues::new(plan, index, first);
        for msg in plan.messages(index, first, count) {
            let due = msg.due_ms;
            for r in &msg.readings {
                let boundary = too_late_boundary(r.ts, plan.allowed_lateness_ms);
                let tl = ex
                    .too_late
                    .get(&(index, r.seq))
                    .copied()
                    .unwrap_or_else(|| classify(boundary, due, due));
                if tl == Class::Yes {
                    continue;
                }
                let vs = values.reading_values(r.seq);
                for res in RESOLUTIONS_MS {
                    let end = window_end(r.ts, res);
                    let late = classify(end, due, due) == Class::Yes;
                    // A recorded row may lack a metric: no reading of it.
                    let present = vs
                        .iter()
                        .zip(&plan.metrics)
                        .filter_map(|(v, m)| Some((m, (*v)?)));
                    for (m, v) in present {
                        windows
                            .entry((m.name.clone(), res, end - res))
                            .or_default()
                            .add(r.ts, v, late, tl == Class::Maybe);
                    }
                }
            }
        }
        for (&(_, res, start), &(lo, hi)) in ex
            .windows
            .range((index, i64::MIN, i64::MIN)..=(index, i64::MAX, i64::MAX))
        {
            for m in &plan.metrics {
                if let Some(w) = windows.get_mut(&(m.name.clone(), res, start)) {
                    w.late_lo += i64::from(lo);
                    w.late_hi += i64::from(hi);
                }
            }
        }
    }
    windows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lateness::Exceptions;
    use crate::ledger::RunStart;
    use crate::plan::tests::plan;
    use crate::plan::{FaultConfig, MINUTE_MS};

    fn run(first_seq: u64, messages: u64, exceptions: Exceptions) -> Run {
        let p = plan();
        Run {
            start: RunStart {
                run: 1,
                first_seq: vec![first_seq; p.devices as usize],
                messages: vec![messages; p.devices as usize],
                plan: p,
            },
            exceptions: Some(exceptions),
        }
    }

    #[test]
    fn agg_matches_a_direct_computation() {
        let mut a = ExpectedAgg::default();
        for (ts, v) in [(5, 2.0), (5, 1.0), (9, -3.0), (9, 4.0), (1, 0.5)] {
            a.add(ts, v, ts == 9, false);
        }
        let s = &a.sure;
        assert_eq!(s.count, 5);
        assert_eq!(s.sum, 4.5);
        assert_eq!(s.sum_abs, 10.5);
        assert_eq!((s.min, s.max), (-3.0, 4.0));
        assert_eq!(s.first, (1, 0.5));
        assert_eq!(s.last, (9, 4.0));
        assert_eq!((a.late_lo, a.late_hi), (2, 2));
        let mut b = ExpectedAgg::default();
        b.add(0, 7.0, false, true);
        a.merge(&b);
        assert_eq!(a.all().first, (0, 7.0));
        assert_eq!(a.sure.first, (1, 0.5), "an uncertain reading stays apart");
        assert_eq!((a.all().count, a.maybe.count), (6, 1));
        assert_eq!((a.late_lo, a.late_hi), (2, 3), "it may or may not be late");
        let mut tie = ExpectedAgg::default();
        tie.add(5, 2.0, false, false);
        tie.add(5, 1.0, false, false);
        tie.add(5, 3.0, false, false);
        assert_eq!((tie.sure.first, tie.sure.last), ((5, 1.0), (5, 3.0)));
    }

    #[test]
    fn values_are_an_exact_multiset_in_order() {
        let mut v = Values::default();
        for x in [2.5, -0.001, 2.5, 1e9, -7.25, 0.0, 2.5] {
            v.add(x);
        }
        let sorted: Vec<f64> = (0..7).map(|r| v.at(r).unwrap()).collect();
        assert_eq!(sorted, [-7.25, -0.001, 0.0, 2.5, 2.5, 2.5, 1e9]);
        assert_eq!(v.at(7), None);
        assert_eq!((v.len(), v.distinct()), (7, 5));
        let mut w = Values::default();
        w.add(-100.0);
        w.merge(&v);
        assert_eq!((w.at(0), w.at(7), w.len()), (Some(-100.0), Some(1e9), 8));
    }

    #[test]
    fn one_device_fills_its_windows() {
        // 4 devices, 5 msg/s, 600 messages: 2 minutes of one device.
        let runs = vec![run(0, 600, Exceptions::default())];
        let w = device_windows(&runs, &[(0, 1)]);
        let start = plan().run_start_ms;
        let m0 = &w[&("temperature".to_string(), MINUTE_MS, start)];
        let m1 = &w[&("temperature".to_string(), MINUTE_MS, start + MINUTE_MS)];
        assert_eq!((m0.sure.count, m1.sure.count), (300, 300));
        assert_eq!(m0.late_hi, 0);
        let day: u64 = w
            .iter()
            .filter(|(k, _)| k.1 == crate::plan::DAY_MS)
            .map(|(_, a)| a.sure.count)
            .sum();
        assert_eq!(day, 1200, "2 metrics x 600 readings");
        let mut values = DeviceValues::new(&plan(), 1, 0);
        assert_eq!(m0.sure.first, (start + 50, values.values(0)[0]));
    }

    #[test]
    fn exceptions_widen_late_count_and_drop_rejected_readings() {
        let start = plan().run_start_ms;
        let mut ex = Exceptions::default();
        ex.windows.insert((1, MINUTE_MS, start), (1, 2));
        ex.too_late.insert((1, 0), Class::Yes);
        ex.too_late.insert((1, 1), Class::Maybe);
        let runs = vec![run(0, 600, ex)];
        let w = device_windows(&runs, &[(0, 1)]);
        let m0 = &w[&("humidity".to_string(), MINUTE_MS, start)];
        assert_eq!((m0.sure.count, m0.maybe.count), (298, 1));
        assert_eq!((m0.late_lo, m0.late_hi), (1, 3));
    }

    #[test]
    fn late_faults_count_late_in_past_windows() {
        let mut r = run(0, 600, Exceptions::default());
        r.start.plan.faults = FaultConfig {
            late_rate: 0.1,
            late_by_ms: 5 * MINUTE_MS,
            ..FaultConfig::default()
        };
        let late_msgs = r
            .start
            .plan
            .messages(1, 0, 600)
            .filter(|m| m.late_reading.is_some())
            .count() as i64;
        let w = device_windows(&[r], &[(0, 1)]);
        let late_1m: i64 = w
            .iter()
            .filter(|(k, _)| k.0 == "temperature" && k.1 == MINUTE_MS)
            .map(|(_, a)| a.late_lo)
            .sum();
        assert!(late_msgs > 20);
        assert_eq!(late_1m, late_msgs);
    }

    /// Memory of a fleet's expected windows at scale: 200 devices at 500
    /// messages/s each (100,000 msgs/s) for 10 s, one reading per message.
    /// Heavy; run with `cargo test -p device-sim --release -- --ignored`.
    #[test]
    #[ignore]
    fn a_fleet_of_a_million_readings_keeps_its_values_in_little_memory() {
        let mut p = plan();
        p.devices = 200;
        p.period_us = 2_000;
        let runs = vec![Run {
            start: RunStart {
                run: 1,
                first_seq: vec![0; 200],
                messages: vec![5_000; 200],
                plan: p,
            },
            exceptions: Some(Exceptions::default()),
        }];
        let before = crate::resources::Usage::now(0).rss_mib;
        let started = std::time::Instant::now();
        let mut fleet = Windows::new();
        for d in 0..200 {
            for (k, w) in device_windows(&runs, &[(0, d)]) {
                fleet.entry(k).or_default().merge(&w);
            }
        }
        let elapsed = started.elapsed();
        let grown = crate::resources::Usage::now(0).rss_mib - before;
        let readings: u64 = fleet
            .iter()
            .filter(|(k, _)| k.1 == crate::plan::DAY_MS)
            .map(|(_, w)| w.sure.count)
            .sum();
        let distinct: usize = fleet.values().map(|w| w.sure.values.distinct()).sum();
        println!(
            "{} fleet windows, {readings} metric readings, {distinct} distinct values kept, RSS +{grown:.1} MiB, {:.1} s",
            fleet.len(),
            elapsed.as_secs_f64()
        );
        assert_eq!(readings, 2 * 200 * 5_000);
        assert!(grown < 64.0, "RSS grew by {grown:.1} MiB");
    }
}
