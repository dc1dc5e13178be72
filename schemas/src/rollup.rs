//! Rollups: window resolutions, the mergeable aggregate a window holds, and
//! the window as the query API returns it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use crate::sketch::Sketch;

/// A tumbling window length, aligned to the UTC epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Resolution {
    ms: i64,
}

impl Resolution {
    pub const SECOND: i64 = 1_000;
    pub const MINUTE: i64 = 60_000;
    pub const HOUR: i64 = 3_600_000;
    pub const DAY: i64 = 86_400_000;

    /// The resolutions stored by default: 1m, 1h and 1d.
    pub const DEFAULTS: [Resolution; 3] = [
        Resolution { ms: Self::MINUTE },
        Resolution { ms: Self::HOUR },
        Resolution { ms: Self::DAY },
    ];

    /// Builds a resolution of whole seconds, at most 366 days.
    pub fn from_ms(ms: i64) -> Result<Self, String> {
        if ms <= 0 || ms % Self::SECOND != 0 || ms > 366 * Self::DAY {
            return Err(format!(
                "a resolution is a whole number of seconds up to 366d, got {ms} ms"
            ));
        }
        Ok(Resolution { ms })
    }

    pub fn ms(self) -> i64 {
        self.ms
    }

    /// The start of the window holding `ts`.
    pub fn window_start(self, ts: i64) -> i64 {
        ts - ts.rem_euclid(self.ms)
    }

    /// Whether windows of `self` are unions of windows of `finer`: both are
    /// aligned to the epoch, so divisibility is enough.
    pub fn is_multiple_of(self, finer: Resolution) -> bool {
        self.ms % finer.ms == 0
    }
}

impl fmt::Display for Resolution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, ms) in [
            ("d", Self::DAY),
            ("h", Self::HOUR),
            ("m", Self::MINUTE),
            ("s", Self::SECOND),
        ] {
            if self.ms % ms == 0 {
                return write!(f, "{}{unit}", self.ms / ms);
            }
        }
        write!(f, "{}ms", self.ms)
    }
}

impl FromStr for Resolution {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let n: i64 = digits
            .parse()
            .map_err(|_| format!("resolution `{s}` is not like 1m, 15m, 1h or 1d"))?;
        let unit_ms = match unit {
            "s" => Self::SECOND,
            "m" => Self::MINUTE,
            "h" => Self::HOUR,
            "d" => Self::DAY,
            _ => return Err(format!("resolution `{s}` needs a unit: s, m, h or d")),
        };
        Self::from_ms(n.saturating_mul(unit_ms))
    }
}

impl TryFrom<String> for Resolution {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Resolution> for String {
    fn from(r: Resolution) -> String {
        r.to_string()
    }
}

/// A value at an instant of device time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub ts: i64,
    pub value: f64,
}

impl Point {
    /// Orders by time, then by value, so that `first` and `last` do not depend
    /// on the order in which readings arrive.
    fn before(&self, other: &Point) -> bool {
        self.ts < other.ts || (self.ts == other.ts && self.value.total_cmp(&other.value).is_lt())
    }
}

/// Everything a window knows. Every field merges exactly (sums add, extremes
/// compare, sketches merge bin by bin), which is what lets iotpipe pre-aggregate
/// a batch, combine fleet partitions and downsample at query time without
/// changing a result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowAgg {
    pub count: u64,
    pub sum: f64,
    /// Sum of squares, for the standard deviation.
    pub sum_sq: f64,
    pub min: f64,
    pub max: f64,
    /// The reading with the earliest event time (ties: the smaller value).
    pub first: Point,
    /// The reading with the latest event time (ties: the larger value).
    pub last: Point,
    /// Readings that reached this window after its end.
    pub late_count: u64,
    /// How many times the window changed after its end.
    pub revision: u64,
    pub sketch: Sketch,
}

impl Default for WindowAgg {
    fn default() -> Self {
        WindowAgg {
            count: 0,
            sum: 0.0,
            sum_sq: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            first: Point {
                ts: i64::MAX,
                value: 0.0,
            },
            last: Point {
                ts: i64::MIN,
                value: 0.0,
            },
            late_count: 0,
            revision: 0,
            sketch: Sketch::new(),
        }
    }
}

impl WindowAgg {
    /// Adds one value. `late` says the reading arrived after the window's end.
    pub fn add(&mut self, ts: i64, value: f64, late: bool) {
        self.count += 1;
        self.sum += value;
        self.sum_sq += value * value;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        let p = Point { ts, value };
        if p.before(&self.first) {
            self.first = p;
        }
        if self.last.before(&p) {
            self.last = p;
        }
        if late {
            self.late_count += 1;
            self.revision += 1;
        }
        self.sketch.add(value);
    }

    /// Folds `other` into `self`, as if every value of both had been added to one.
    pub fn merge(&mut self, other: &WindowAgg) {
        if other.count == 0 {
            return;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.sum_sq += other.sum_sq;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        if other.first.before(&self.first) {
            self.first = other.first;
        }
        if self.last.before(&other.last) {
            self.last = other.last;
        }
        self.late_count += other.late_count;
        self.revision += other.revision;
        self.sketch.merge(&other.sketch);
    }

    pub fn avg(&self) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        self.sum / self.count as f64
    }

    /// Population standard deviation from the sum of squares, clamped at zero
    /// where rounding would make the variance negative.
    pub fn stddev(&self) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let n = self.count as f64;
        let mean = self.sum / n;
        (self.sum_sq / n - mean * mean).max(0.0).sqrt()
    }

    /// The value at rank `floor(q · (count − 1))`: exact at the lowest and
    /// highest rank (so for every window of one or two readings, and every
    /// window whose readings are all equal), and otherwise the sketch's
    /// answer, within its relative error `α`. Either way it lies within
    /// `[min, max]`: a bin's representative can sit past the extreme values
    /// that fell in it, and a single 21.5 must not read back as 21.543.
    /// Done at read time, so stored sketches keep their format.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let rank = (q * (self.count - 1) as f64) as u64;
        if rank == 0 {
            return self.min;
        }
        if rank >= self.count - 1 {
            return self.max;
        }
        let approx = self.sketch.quantile(q).unwrap_or(self.min);
        // Not `clamp`, which panics on a NaN bound.
        approx.max(self.min).min(self.max)
    }

    /// The window as the API shows it.
    pub fn view(&self, start: i64, res: Resolution, is_final: bool) -> WindowView {
        WindowView {
            start,
            end: start + res.ms(),
            count: self.count,
            sum: self.sum,
            min: self.min,
            max: self.max,
            avg: self.avg(),
            stddev: self.stddev(),
            first: self.first,
            last: self.last,
            p50: self.quantile(0.5),
            p90: self.quantile(0.9),
            p99: self.quantile(0.99),
            late_count: self.late_count,
            revision: self.revision,
            is_final,
        }
    }
}

/// One window in an API response. `start` and `end` are ms since the epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowView {
    pub start: i64,
    pub end: i64,
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    pub avg: f64,
    pub stddev: f64,
    pub first: Point,
    pub last: Point,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub late_count: u64,
    pub revision: u64,
    /// `end + allowed_lateness` has passed: the window will not change again.
    #[serde(rename = "final")]
    pub is_final: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolutions_parse_and_print() {
        for (s, ms) in [
            ("1m", 60_000),
            ("15m", 900_000),
            ("6h", 21_600_000),
            ("7d", 604_800_000),
            ("30s", 30_000),
        ] {
            let r: Resolution = s.parse().unwrap();
            assert_eq!(r.ms(), ms);
            assert_eq!(r.to_string(), s);
        }
        assert_eq!("60m".parse::<Resolution>().unwrap().to_string(), "1h");
        for bad in [
            "",
            "m",
            "1",
            "1w",
            "0m",
            "-1m",
            "400d",
            "99999999999999999999d",
        ] {
            assert!(bad.parse::<Resolution>().is_err(), "{bad}");
        }
    }

    #[test]
    fn windows_align_to_the_epoch() {
        let m = Resolution::from_ms(Resolution::MINUTE).unwrap();
        assert_eq!(m.window_start(0), 0);
        assert_eq!(m.window_start(59_999), 0);
        assert_eq!(m.window_start(60_000), 60_000);
        assert_eq!(m.window_start(1_764_240_000_123), 1_764_240_000_000);
    }

    #[test]
    fn merge_equals_adding_everything() {
        let values: Vec<(i64, f64)> = (0..1000)
            .map(|i| (i * 7 % 1000, (i as f64).sin() * 10.0))
            .collect();
        let mut all = WindowAgg::default();
        for (ts, v) in &values {
            all.add(*ts, *v, false);
        }
        let (a, b) = values.split_at(333);
        let mut left = WindowAgg::default();
        a.iter().for_each(|(ts, v)| left.add(*ts, *v, false));
        let mut right = WindowAgg::default();
        b.iter().rev().for_each(|(ts, v)| right.add(*ts, *v, false));
        let mut merged = WindowAgg::default();
        merged.merge(&right);
        merged.merge(&left);
        assert_eq!(merged.count, all.count);
        assert_eq!((merged.min, merged.max), (all.min, all.max));
        assert_eq!(merged.first, all.first);
        assert_eq!(merged.last, all.last);
        assert!((merged.sum - all.sum).abs() < 1e-9);
        for q in [0.5, 0.9, 0.99] {
            assert_eq!(merged.sketch.quantile(q), all.sketch.quantile(q));
        }
    }

    #[test]
    fn first_and_last_break_ties_by_value() {
        let mut a = WindowAgg::default();
        a.add(5, 2.0, false);
        a.add(5, 1.0, false);
        a.add(5, 3.0, false);
        assert_eq!(a.first, Point { ts: 5, value: 1.0 });
        assert_eq!(a.last, Point { ts: 5, value: 3.0 });
    }

    fn window_of(values: &[f64]) -> WindowAgg {
        let mut w = WindowAgg::default();
        for (ts, v) in values.iter().enumerate() {
            w.add(ts as i64, *v, false);
        }
        w
    }

    fn quantiles(w: &WindowAgg) -> [f64; 3] {
        let v = w.view(0, Resolution::DEFAULTS[0], false);
        [v.p50, v.p90, v.p99]
    }

    #[test]
    fn quantiles_are_clamped_to_min_and_max() {
        // 21.5's bin reads back as about 21.543, and 21.7 shares the bin:
        // unclamped, the middle ranks would land above or below every value.
        for (values, bound) in [([21.5; 3], 21.5), ([21.7; 3], 21.7)] {
            assert_ne!(window_of(&values).sketch.quantile(0.5), Some(bound));
            assert_eq!(quantiles(&window_of(&values)), [bound; 3], "{values:?}");
        }
        let mixed = window_of(&[21.5, 21.52, 21.7, 21.7, 30.0]);
        for q in quantiles(&mixed) {
            assert!((21.5..=30.0).contains(&q), "{q} is outside [21.5, 30]");
        }
    }

    #[test]
    fn quantiles_are_exact_for_small_counts() {
        assert_eq!(quantiles(&window_of(&[21.5])), [21.5; 3]);
        // Two readings: every quantile's rank is the lower one.
        assert_eq!(quantiles(&window_of(&[21.7, 21.5])), [21.5; 3]);
        assert_eq!(
            quantiles(&window_of(&[-3.25, -3.25, -3.25, -3.25])),
            [-3.25; 3]
        );
        let w = window_of(&[1.0, 2.0, 3.0]);
        assert_eq!(w.quantile(0.0), 1.0);
        assert_eq!(w.quantile(1.0), 3.0);
        assert!(((w.quantile(0.5) - 2.0) / 2.0).abs() <= crate::sketch::SKETCH_ALPHA);
        assert_eq!(quantiles(&WindowAgg::default()), [0.0; 3]);
    }

    #[test]
    fn state_round_trips_through_postcard() {
        let mut a = WindowAgg::default();
        for i in 0..100 {
            a.add(i, -5.0 + i as f64 * 0.37, i % 10 == 0);
        }
        let bytes = postcard::to_allocvec(&a).unwrap();
        let b: WindowAgg = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(b.count, 100);
        assert_eq!(b.late_count, 10);
        assert_eq!(b.sketch.quantile(0.5), a.sketch.quantile(0.5));
        let mut c = b.clone();
        c.merge(&a);
        assert_eq!(c.sketch.count(), 200);
        let empty: WindowAgg =
            postcard::from_bytes(&postcard::to_allocvec(&WindowAgg::default()).unwrap()).unwrap();
        assert_eq!(empty.count, 0);
    }
}
