//! Alert rules on windows, and which windows fire them: pure, so that the
//! shell that reads windows and writes alert items holds no decision.
//!
//! A rule compares one aggregate of one series' windows (a fleet's or a
//! device's metric at a stored resolution) with a threshold. A window is
//! evaluated only once the processed watermark has passed its end: every
//! reading that arrived before the window closed is in it then, so revision
//! 0 is complete; a late reading bumps `revision`, and the window is
//! evaluated again at that revision. A firing is keyed by (rule, window
//! start, revision), which is what makes a notification fire once per
//! revision whatever the ticks and restarts of the shell.

use schemas::{Resolution, WindowView};

use crate::config::AggregateConfig;

/// Whose windows a rule watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Fleet(String),
    Device(String),
}

/// The window field a rule compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregate {
    Count,
    Sum,
    Min,
    Max,
    Avg,
    Stddev,
    P50,
    P90,
    P99,
}

impl Aggregate {
    pub const ALL: [Aggregate; 9] = [
        Aggregate::Count,
        Aggregate::Sum,
        Aggregate::Min,
        Aggregate::Max,
        Aggregate::Avg,
        Aggregate::Stddev,
        Aggregate::P50,
        Aggregate::P90,
        Aggregate::P99,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Aggregate::Count => "count",
            Aggregate::Sum => "sum",
            Aggregate::Min => "min",
            Aggregate::Max => "max",
            Aggregate::Avg => "avg",
            Aggregate::Stddev => "stddev",
            Aggregate::P50 => "p50",
            Aggregate::P90 => "p90",
            Aggregate::P99 => "p99",
        }
    }

    /// The field's value in `w`.
    pub fn of(self, w: &WindowView) -> f64 {
        match self {
            // Counts of one window stay far below 2^53: exact as f64.
            Aggregate::Count => w.count as f64,
            Aggregate::Sum => w.sum,
            Aggregate::Min => w.min,
            Aggregate::Max => w.max,
            Aggregate::Avg => w.avg,
            Aggregate::Stddev => w.stddev,
            Aggregate::P50 => w.p50,
            Aggregate::P90 => w.p90,
            Aggregate::P99 => w.p99,
        }
    }
}

schemas::named!(Aggregate, "aggregate");

/// How a window's value is compared with the threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    Above,
    AtLeast,
    Below,
    AtMost,
}

impl Comparison {
    pub const ALL: [Comparison; 4] = [
        Comparison::Above,
        Comparison::AtLeast,
        Comparison::Below,
        Comparison::AtMost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Comparison::Above => ">",
            Comparison::AtLeast => ">=",
            Comparison::Below => "<",
            Comparison::AtMost => "<=",
        }
    }

    pub fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Comparison::Above => value > threshold,
            Comparison::AtLeast => value >= threshold,
            Comparison::Below => value < threshold,
            Comparison::AtMost => value <= threshold,
        }
    }
}

schemas::named!(Comparison, "comparison");

/// One alert rule.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertRule {
    /// Names the rule in alert keys, notifications and `GET /v1/alerts`.
    pub name: String,
    pub scope: Scope,
    pub metric: String,
    /// A stored resolution: the rule reads windows as the API serves them.
    pub res: Resolution,
    pub aggregate: Aggregate,
    pub comparison: Comparison,
    pub threshold: f64,
    /// Consecutive windows that must hold, the fired one the last (the
    /// rule's `for`); at least 1.
    pub for_windows: u32,
}

/// The most consecutive windows a rule may ask for: each evaluation reads
/// that many windows before the ones it judges.
pub const MAX_FOR_WINDOWS: u32 = 1000;

impl AlertRule {
    /// Refuses, in words, what the pipeline could never evaluate.
    pub fn validate(&self, config: &AggregateConfig) -> Result<(), String> {
        let name = &self.name;
        schemas::topic::check_id("alert rule name", name)?;
        match &self.scope {
            Scope::Fleet(f) => schemas::topic::check_id("fleet", f),
            Scope::Device(d) => schemas::topic::check_id("device", d),
        }
        .map_err(|e| format!("rule `{name}`: {e}"))?;
        schemas::reading::check_metric_name(&self.metric)
            .map_err(|e| format!("rule `{name}`: {e}"))?;
        if !config.resolutions.contains(&self.res) {
            let stored: Vec<String> = config.resolutions.iter().map(|r| r.to_string()).collect();
            return Err(format!(
                "rule `{name}`: resolution {} is not stored (stored: {})",
                self.res,
                stored.join(", ")
            ));
        }
        if !self.threshold.is_finite() {
            return Err(format!(
                "rule `{name}`: the threshold must be a finite number"
            ));
        }
        if !(1..=MAX_FOR_WINDOWS).contains(&self.for_windows) {
            return Err(format!(
                "rule `{name}`: `for` must be 1 to {MAX_FOR_WINDOWS} windows, not {}",
                self.for_windows
            ));
        }
        Ok(())
    }

    /// Whether window `w` crosses the threshold.
    pub fn holds(&self, w: &WindowView) -> bool {
        w.count > 0 && self.comparison.holds(self.aggregate.of(w), self.threshold)
    }

    /// The window ends a shell must read to evaluate everything that can
    /// still change at `watermark`: `(lo, watermark]` with the `for` chain's
    /// earlier windows before it, as window starts `[from, to)`.
    pub fn read_range(&self, watermark: i64, allowed_lateness_ms: i64) -> (i64, i64) {
        let res = self.res.ms();
        let chain = i64::from(self.for_windows) * res;
        let from = watermark
            .saturating_sub(allowed_lateness_ms)
            .saturating_sub(chain);
        // The last window judged ends at or before the watermark.
        let to = watermark.saturating_sub(res).saturating_add(1);
        (self.res.window_start(from), to)
    }
}

/// A window at one revision that crossed a rule's threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct Firing {
    pub rule: String,
    pub window_start: i64,
    pub window_end: i64,
    pub revision: u64,
    pub value: f64,
    pub late_count: u64,
}

/// The windows of `windows` (one series, ascending by start) that fire
/// `rule` at `watermark`: those that ended at or before it, cross the
/// threshold, and whose `for_windows - 1` windows right before them cross
/// it too. A window missing from the series (no readings) breaks a chain.
///
/// A chain is judged on the windows as they are now: when an earlier window
/// is revised, the window that ends the chain fires again only at a revision
/// of its own.
pub fn evaluate(rule: &AlertRule, windows: &[WindowView], watermark: i64) -> Vec<Firing> {
    let res = rule.res.ms();
    // How many windows in a row, ending at each index, hold.
    let mut run = 0u32;
    let mut out = Vec::new();
    for (i, w) in windows.iter().enumerate() {
        let follows = i > 0 && windows[i - 1].start + res == w.start;
        run = match (rule.holds(w), follows) {
            (false, _) => 0,
            (true, true) => run.saturating_add(1),
            (true, false) => 1,
        };
        if w.end <= watermark && run >= rule.for_windows {
            out.push(Firing {
                rule: rule.name.clone(),
                window_start: w.start,
                window_end: w.end,
                revision: w.revision,
                value: rule.aggregate.of(w),
                late_count: w.late_count,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::WindowAgg;

    const MIN: i64 = 60_000;

    fn rule(comparison: &str, threshold: f64, for_windows: u32) -> AlertRule {
        AlertRule {
            name: "hot".into(),
            scope: Scope::Fleet("f".into()),
            metric: "temp".into(),
            res: "1m".parse().unwrap(),
            aggregate: Aggregate::Avg,
            comparison: comparison.parse().unwrap(),
            threshold,
            for_windows,
        }
    }

    /// A 1m window at `start` holding `values`, the last `late` of them late.
    fn window(start: i64, values: &[f64], late: usize) -> WindowView {
        let mut agg = WindowAgg::default();
        for (i, v) in values.iter().enumerate() {
            agg.add(start + i as i64, *v, i >= values.len() - late);
        }
        agg.view(start, "1m".parse().unwrap(), false)
    }

    fn starts(f: &[Firing]) -> Vec<(i64, u64)> {
        f.iter().map(|f| (f.window_start, f.revision)).collect()
    }

    #[test]
    fn windows_that_cross_fire_with_their_revision_and_value() {
        let ws = [
            window(0, &[10.0, 20.0], 0),
            window(MIN, &[40.0, 30.0], 0),
            window(2 * MIN, &[20.0, 50.0], 1),
        ];
        let f = evaluate(&rule(">", 30.0, 1), &ws, 3 * MIN);
        assert_eq!(starts(&f), [(MIN, 0), (2 * MIN, 1)]);
        assert_eq!(f[0].value, 35.0);
        assert_eq!(f[0].window_end, 2 * MIN);
        assert_eq!(f[1].late_count, 1);
    }

    #[test]
    fn a_window_is_judged_only_once_the_watermark_passed_its_end() {
        let ws = [window(0, &[40.0], 0), window(MIN, &[40.0], 0)];
        let r = rule(">", 30.0, 1);
        assert_eq!(starts(&evaluate(&r, &ws, 2 * MIN - 1)), [(0, 0)]);
        assert_eq!(starts(&evaluate(&r, &ws, 2 * MIN)), [(0, 0), (MIN, 0)]);
        assert!(evaluate(&r, &ws, MIN - 1).is_empty());
    }

    #[test]
    fn every_comparison_is_strict_or_not_as_written() {
        let ws = [window(0, &[30.0], 0)];
        for (cmp, fires) in [(">", false), (">=", true), ("<", false), ("<=", true)] {
            let f = evaluate(&rule(cmp, 30.0, 1), &ws, MIN);
            assert_eq!(f.len(), usize::from(fires), "{cmp}");
        }
        assert_eq!(evaluate(&rule("<", 31.0, 1), &ws, MIN).len(), 1);
    }

    #[test]
    fn for_n_needs_the_n_minus_1_windows_right_before() {
        let ws = [
            window(0, &[40.0], 0),
            window(MIN, &[40.0], 0),
            window(2 * MIN, &[40.0], 0),
            window(3 * MIN, &[10.0], 0),
            window(4 * MIN, &[40.0], 0),
            window(5 * MIN, &[40.0], 0),
            // 6 is missing: no readings, which breaks the chain.
            window(7 * MIN, &[40.0], 0),
            window(8 * MIN, &[40.0], 0),
        ];
        let f = evaluate(&rule(">", 30.0, 2), &ws, 9 * MIN);
        assert_eq!(
            starts(&f),
            [(MIN, 0), (2 * MIN, 0), (5 * MIN, 0), (8 * MIN, 0)]
        );
        let f = evaluate(&rule(">", 30.0, 3), &ws, 9 * MIN);
        assert_eq!(starts(&f), [(2 * MIN, 0)]);
    }

    #[test]
    fn every_aggregate_reads_its_field() {
        let w = window(0, &[1.0, 2.0, 3.0, 4.0], 0);
        let mut r = rule(">=", 0.0, 1);
        let got: Vec<(Aggregate, f64)> = Aggregate::ALL
            .iter()
            .map(|a| {
                r.aggregate = *a;
                (*a, evaluate(&r, std::slice::from_ref(&w), MIN)[0].value)
            })
            .collect();
        assert_eq!(got[0], (Aggregate::Count, 4.0));
        assert_eq!(got[1], (Aggregate::Sum, 10.0));
        assert_eq!(got[2], (Aggregate::Min, 1.0));
        assert_eq!(got[3], (Aggregate::Max, 4.0));
        assert_eq!(got[4], (Aggregate::Avg, 2.5));
        for (a, v) in &got[5..] {
            assert!(*v > 0.0, "{a:?}");
        }
        for a in Aggregate::ALL {
            assert_eq!(a.as_str().parse::<Aggregate>(), Ok(a));
        }
    }

    #[test]
    fn validation_refuses_in_words() {
        let config = AggregateConfig::default();
        assert_eq!(rule(">", 1.0, 1).validate(&config), Ok(()));
        let mut r = rule(">", 1.0, 1);
        r.res = "5m".parse().unwrap();
        let e = r.validate(&config).unwrap_err();
        assert!(e.contains("5m is not stored"), "{e}");
        let e = rule(">", f64::NAN, 1).validate(&config).unwrap_err();
        assert!(e.contains("finite"), "{e}");
        let e = rule(">", 1.0, 0).validate(&config).unwrap_err();
        assert!(e.contains("`for`"), "{e}");
        let mut r = rule(">", 1.0, 1);
        r.name = "a|b".into();
        assert!(r.validate(&config).is_err());
        let mut r = rule(">", 1.0, 1);
        r.metric = "bad metric".into();
        assert!(r.validate(&config).is_err());
        let e = "avgg".parse::<Aggregate>().unwrap_err();
        assert!(e.contains("p99"), "{e}");
        assert!("=>".parse::<Comparison>().is_err());
    }

    #[test]
    fn the_read_range_covers_the_lateness_and_the_chain() {
        let r = rule(">", 1.0, 3);
        let (from, to) = r.read_range(100 * MIN + 5, 10 * MIN);
        assert_eq!(from, 87 * MIN);
        // The window [99m, 100m) is the last one ended; [100m, 101m) is not.
        assert_eq!(r.res.window_start(to - 1), 99 * MIN);
    }
}
