//! What the pipeline should report: windows regenerated from the ledger's
//! plans by the simulator's own arithmetic.
//!
//! One device at a time: its readings are regenerated from every run it
//! appears in, folded into its windows, and (by the caller) compared and
//! dropped, so memory holds one device's windows plus the fleet's.

use std::collections::BTreeMap;

use crate::lateness::{Class, classify, too_late_boundary, window_end};
use crate::ledger::Run;
use crate::payload::DeviceValues;
use crate::plan::RESOLUTIONS_MS;

/// A window as expected.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpectedAgg {
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
    /// The least and most `late_count` can be (see [`crate::lateness`]).
    pub late_lo: i64,
    pub late_hi: i64,
    /// Readings in this window that may or may not have been accepted (an
    /// unacknowledged message, or a `too_late` decision too close to call):
    /// such a window cannot be checked exactly.
    pub maybe: u64,
}

impl Default for ExpectedAgg {
    fn default() -> Self {
        ExpectedAgg {
            count: 0,
            sum: 0.0,
            sum_abs: 0.0,
            sum_sq: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            first: (i64::MAX, 0.0),
            last: (i64::MIN, 0.0),
            late_lo: 0,
            late_hi: 0,
            maybe: 0,
        }
    }
}

impl ExpectedAgg {
    pub fn add(&mut self, ts: i64, v: f64, late: bool, maybe: bool) {
        self.count += 1;
        self.sum += v;
        self.sum_abs += v.abs();
        self.sum_sq += v * v;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        if (ts, v.total_cmp(&self.first.1)) < (self.first.0, std::cmp::Ordering::Equal) {
            self.first = (ts, v);
        }
        if (ts, v.total_cmp(&self.last.1)) > (self.last.0, std::cmp::Ordering::Equal) {
            self.last = (ts, v);
        }
        if late {
            self.late_lo += 1;
            self.late_hi += 1;
        }
        if maybe {
            self.maybe += 1;
        }
    }

    pub fn merge(&mut self, o: &ExpectedAgg) {
        if o.count == 0 {
            return;
        }
        self.count += o.count;
        self.sum += o.sum;
        self.sum_abs += o.sum_abs;
        self.sum_sq += o.sum_sq;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
        if (o.first.0, o.first.1.total_cmp(&self.first.1))
            < (self.first.0, std::cmp::Ordering::Equal)
        {
            self.first = o.first;
        }
        if (o.last.0, o.last.1.total_cmp(&self.last.1)) > (self.last.0, std::cmp::Ordering::Equal) {
            self.last = o.last;
        }
        self.late_lo += o.late_lo;
        self.late_hi += o.late_hi;
        self.maybe += o.maybe;
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
                let vs = values.values(r.seq);
                for res in RESOLUTIONS_MS {
                    let end = window_end(r.ts, res);
                    let late = classify(end, due, due) == Class::Yes;
                    for (m, v) in plan.metrics.iter().zip(&vs) {
                        windows
                            .entry((m.name.clone(), res, end - res))
                            .or_default()
                            .add(r.ts, *v, late, tl == Class::Maybe);
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
        assert_eq!(a.count, 5);
        assert_eq!(a.sum, 4.5);
        assert_eq!(a.sum_abs, 10.5);
        assert_eq!((a.min, a.max), (-3.0, 4.0));
        assert_eq!(a.first, (1, 0.5));
        assert_eq!(a.last, (9, 4.0));
        assert_eq!((a.late_lo, a.late_hi), (2, 2));
        let mut b = ExpectedAgg::default();
        b.add(0, 7.0, false, true);
        a.merge(&b);
        assert_eq!(a.first, (0, 7.0));
        assert_eq!((a.count, a.maybe), (6, 1));
        let mut tie = ExpectedAgg::default();
        tie.add(5, 2.0, false, false);
        tie.add(5, 1.0, false, false);
        tie.add(5, 3.0, false, false);
        assert_eq!((tie.first, tie.last), ((5, 1.0), (5, 3.0)));
    }

    #[test]
    fn one_device_fills_its_windows() {
        // 4 devices, 5 msg/s, 600 messages: 2 minutes of one device.
        let runs = vec![run(0, 600, Exceptions::default())];
        let w = device_windows(&runs, &[(0, 1)]);
        let start = plan().run_start_ms;
        let m0 = &w[&("temperature".to_string(), MINUTE_MS, start)];
        let m1 = &w[&("temperature".to_string(), MINUTE_MS, start + MINUTE_MS)];
        assert_eq!((m0.count, m1.count), (300, 300));
        assert_eq!(m0.late_hi, 0);
        let day: u64 = w
            .iter()
            .filter(|(k, _)| k.1 == crate::plan::DAY_MS)
            .map(|(_, a)| a.count)
            .sum();
        assert_eq!(day, 1200, "2 metrics x 600 readings");
        let mut values = DeviceValues::new(&plan(), 1, 0);
        assert_eq!(m0.first, (start + 50, values.values(0)[0]));
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
        assert_eq!(m0.count, 299);
        assert_eq!((m0.late_lo, m0.late_hi, m0.maybe), (1, 2, 1));
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
}
