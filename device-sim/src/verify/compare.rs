//! Comparing expected windows with the API's, field by field. Pure.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use crate::expect::{ExpectedAgg, Part, Values, point_before};

/// How many mismatches a report keeps in full; the rest are counted.
pub const KEPT_MISMATCHES: usize = 20;

/// Relative tolerance for `sum` and `avg`, scaled by the sum of absolute
/// values: the pipeline may add in any order.
pub const SUM_TOLERANCE: f64 = 1e-9;

/// Relative tolerance for variances (`stddev` squared), scaled by the mean
/// of the squares: the pipeline's sum of squares loses digits to
/// cancellation that the square root would magnify near zero.
pub const VARIANCE_TOLERANCE: f64 = 1e-9;

/// The rounding a variance may carry, for values whose mean square is
/// `mean_sq`.
fn variance_slack(mean_sq: f64) -> f64 {
    VARIANCE_TOLERANCE * mean_sq.max(1e-12)
}

/// A window as the query API returns it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ApiWindow {
    pub start: i64,
    pub end: i64,
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    pub avg: f64,
    pub stddev: f64,
    pub first: ApiPoint,
    pub last: ApiPoint,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub late_count: u64,
    pub revision: u64,
    #[serde(rename = "final")]
    pub is_final: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ApiPoint {
    pub ts: i64,
    pub value: f64,
}

/// One field of one window that differs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Mismatch {
    /// E.g. `device sim-d00001 temperature 1m` or `fleet sim humidity 1d`.
    pub series: String,
    pub start: i64,
    pub field: String,
    pub expected: String,
    pub got: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} window {} ({}): {} expected {} got {}",
            self.series,
            self.start,
            fmt_utc(self.start),
            self.field,
            self.expected,
            self.got
        )
    }
}

/// Counts of a comparison, and its first mismatches.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tally {
    pub windows: u64,
    pub series: u64,
    /// Expected windows holding a reading whose acceptance is unknown:
    /// compared on bounds, and not counted in `windows`.
    pub uncertain: u64,
    pub mismatch_count: u64,
    /// Windows holding readings the runs did not send: more of them, or
    /// earlier or later ones, or a window where none was expected.
    pub unknown: u64,
    pub mismatches: Vec<Mismatch>,
}

impl Tally {
    pub fn push(&mut self, m: Mismatch) {
        self.mismatch_count += 1;
        if self.mismatches.len() < KEPT_MISMATCHES {
            self.mismatches.push(m);
        }
    }

    pub fn add(&mut self, o: Tally) {
        self.windows += o.windows;
        self.series += o.series;
        self.uncertain += o.uncertain;
        self.mismatch_count += o.mismatch_count;
        self.unknown += o.unknown;
        for m in o.mismatches {
            if self.mismatches.len() < KEPT_MISMATCHES {
                self.mismatches.push(m);
            }
        }
    }

    pub fn ok(&self) -> bool {
        self.mismatch_count == 0
    }
}

/// Compares one series: `expected` by window start (ascending) against the
/// API's windows. Windows on only one side are mismatches too.
pub fn compare_series<'a>(
    series: &str,
    res_ms: i64,
    expected: impl IntoIterator<Item = (i64, &'a ExpectedAgg)>,
    got: &[ApiWindow],
    fin: &Finality,
    tally: &mut Tally,
) {
    tally.series += 1;
    let mut got: Vec<&ApiWindow> = got.iter().collect();
    got.sort_by_key(|w| w.start);
    let mut exp = expected.into_iter().peekable();
    let mut got = got.into_iter().peekable();
    let mismatch = |start: i64, field: &str, e: String, g: String| Mismatch {
        series: series.to_string(),
        start,
        field: field.to_string(),
        expected: e,
        got: g,
    };
    loop {
        let order = match (exp.peek(), got.peek()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((s, _)), Some(g)) => s.cmp(&g.start),
        };
        match order {
            Ordering::Less => {
                let Some((start, e)) = exp.next() else { break };
                let sure = e.sure.count;
                if e.is_uncertain() {
                    tally.uncertain += 1;
                } else {
                    tally.windows += 1;
                }
                // No window at all is right only if every reading in it
                // may have been refused or lost.
                if sure > 0 {
                    let want = if e.is_uncertain() {
                        format!("count {sure}..={}", sure + e.maybe.count)
                    } else {
                        format!("count {sure}")
                    };
                    tally.push(mismatch(start, "window", want, "no window".into()));
                }
            }
            Ordering::Greater => {
                let Some(g) = got.next() else { break };
                tally.windows += 1;
                tally.unknown += 1;
                tally.push(mismatch(
                    g.start,
                    "window",
                    "no window".into(),
                    format!("count {}", g.count),
                ));
            }
            Ordering::Equal => {
                let (Some((start, e)), Some(g)) = (exp.next(), got.next()) else {
                    break;
                };
                if e.is_uncertain() {
                    tally.uncertain += 1;
                } else {
                    tally.windows += 1;
                }
                if holds_unknown_readings(e, g) {
                    tally.unknown += 1;
                }
                for (field, want, have) in check_window(e, g, res_ms, fin) {
                    tally.push(mismatch(start, field, want, have));
                }
            }
        }
    }
}

/// Whether the window holds a reading that none of the runs sent: more
/// readings than all of them, or one before the earliest or after the latest.
/// A store that held the fleet before (an earlier run) shows this; a pipeline
/// that has not caught up never does.
pub fn holds_unknown_readings(e: &ExpectedAgg, g: &ApiWindow) -> bool {
    let all = e.all();
    g.count > all.count
        || point_before((g.first.ts, g.first.value), all.first)
        || point_before(all.last, (g.last.ts, g.last.value))
}

/// The share of compared windows that may be uncertain before a run fails:
/// past it, too much of the run was checked on bounds rather than values.
pub const MAX_UNCERTAIN_SHARE: f64 = 0.01;

/// Whether more than [`MAX_UNCERTAIN_SHARE`] of the compared windows
/// (`certain + uncertain`) were uncertain.
pub fn too_uncertain(certain: u64, uncertain: u64) -> bool {
    uncertain as f64 > MAX_UNCERTAIN_SHARE * (certain + uncertain) as f64
}

/// What verify can tell about a window's `final` flag.
///
/// The pipeline calls a window final once `end + allowed_lateness` is at or
/// before its processed watermark, which never runs ahead of its clock and
/// has passed the arrival of every reading it has applied, less its slack.
/// So:
/// - a window is not final while `end + allowed_lateness` is after the moment
///   it was read (`read_by_ms`);
/// - a window is final once `end + allowed_lateness` is at or before the
///   first publish of the latest run of the fleet less the watermark's slack
///   (`settled_ms`): that run's readings were stamped after it, and verify
///   reads once they are counted.
///
/// Between the two, either answer is right. Both bounds allow for the skew
/// between the simulator's clock and the pipeline's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Finality {
    pub allowed_lateness_ms: i64,
    /// The simulator's clock after the response arrived, plus the skew.
    pub read_by_ms: i64,
    /// The latest run's first publish, minus the skew.
    pub settled_ms: i64,
}

impl Finality {
    /// `Some(final)` where the flag is determined; `None` where both are right.
    pub fn expected(&self, end: i64) -> Option<bool> {
        let at = end.saturating_add(self.allowed_lateness_ms);
        if at > self.read_by_ms {
            Some(false)
        } else if at <= self.settled_ms {
            Some(true)
        } else {
            None
        }
    }
}

/// Every field of a window that disagrees: (field, expected, got). A certain
/// window is held to exact values; an uncertain one to the bounds that hold
/// whichever of its uncertain readings were accepted.
pub fn check_window(
    e: &ExpectedAgg,
    g: &ApiWindow,
    res_ms: i64,
    fin: &Finality,
) -> Vec<(&'static str, String, String)> {
    let mut out = Vec::new();
    if g.end != g.start + res_ms {
        out.push(("end", (g.start + res_ms).to_string(), g.end.to_string()));
    }
    if e.is_uncertain() {
        check_bounds(e, g, &mut out);
    } else {
        check_exact(&e.sure, g, &mut out);
    }
    let (lo, hi) = (e.late_lo.max(0), e.late_hi);
    let want = if lo == hi {
        lo.to_string()
    } else {
        format!("{lo}..={hi}")
    };
    // Each late reading changes the window once after its end, so the
    // revision count has the same range as `late_count`.
    for (field, have) in [("late_count", g.late_count), ("revision", g.revision)] {
        if !(lo..=hi).contains(&(have as i64)) {
            out.push((field, want.clone(), have.to_string()));
        }
    }
    if let Some(want) = fin.expected(g.end)
        && g.is_final != want
    {
        let at = fmt_utc(g.end + fin.allowed_lateness_ms);
        let why = if want {
            format!("true (end + allowed lateness {at} is before the run began)")
        } else {
            format!("false (end + allowed lateness {at} is after the window was read)")
        };
        out.push(("final", why, g.is_final.to_string()));
    }
    if g.p50 > g.p90 || g.p90 > g.p99 {
        out.push((
            "quantiles",
            "p50 <= p90 <= p99".into(),
            format!("{} {} {}", fmt_f(g.p50), fmt_f(g.p90), fmt_f(g.p99)),
        ));
    }
    out
}

/// A window whose every reading is known: every field exact, but for the
/// rounding of sums and the sketch's accuracy.
fn check_exact(e: &Part, g: &ApiWindow, out: &mut Vec<(&'static str, String, String)>) {
    let mut exact = |field, want: String, have: String| {
        if want != have {
            out.push((field, want, have));
        }
    };
    exact("count", e.count.to_string(), g.count.to_string());
    exact("min", fmt_f(e.min), fmt_f(g.min));
    exact("max", fmt_f(e.max), fmt_f(g.max));
    exact(
        "first",
        fmt_point(e.first),
        fmt_point((g.first.ts, g.first.value)),
    );
    exact(
        "last",
        fmt_point(e.last),
        fmt_point((g.last.ts, g.last.value)),
    );
    let scale = e.sum_abs.max(f64::MIN_POSITIVE);
    if (g.sum - e.sum).abs() > SUM_TOLERANCE * scale {
        out.push(("sum", fmt_f(e.sum), fmt_f(g.sum)));
    }
    if e.count > 0 {
        let n = e.count as f64;
        if (g.avg - e.sum / n).abs() > SUM_TOLERANCE * scale / n {
            out.push(("avg", fmt_f(e.sum / n), fmt_f(g.avg)));
        }
        // Compared as variances (see `VARIANCE_TOLERANCE`).
        if (g.stddev * g.stddev - e.variance()).abs() > variance_slack(e.sum_sq / n) {
            out.push(("stddev", fmt_f(e.variance().sqrt()), fmt_f(g.stddev)));
        }
        check_quantiles(&e.values, &e.values, e.max, e.count, g, out);
    }
}

/// A window holding readings that may or may not have been accepted: the
/// certain readings `C` are in it, all readings `A` may be. Whatever the
/// pipeline accepted, its window lies between `C` and `A`, which bounds
/// every field but `avg` and `stddev` (held to the window's own figures).
fn check_bounds(e: &ExpectedAgg, g: &ApiWindow, out: &mut Vec<(&'static str, String, String)>) {
    let (c, a) = (&e.sure, e.all());
    let mut within = |field, ok: bool, want: String, have: String| {
        if !ok {
            out.push((field, want, have));
        }
    };
    within(
        "count",
        (c.count..=a.count).contains(&g.count),
        format!("{}..={}", c.count, a.count),
        g.count.to_string(),
    );
    let (neg, pos) = e.maybe.values.iter().fold((0.0, 0.0), |(n, p), (v, k)| {
        let s = v * k as f64;
        if v < 0.0 { (n + s, p) } else { (n, p + s) }
    });
    let slack = SUM_TOLERANCE * a.sum_abs.max(f64::MIN_POSITIVE);
    let (sum_lo, sum_hi) = (c.sum + neg - slack, c.sum + pos + slack);
    within(
        "sum",
        (sum_lo..=sum_hi).contains(&g.sum),
        format!("{}..={}", fmt_f(c.sum + neg), fmt_f(c.sum + pos)),
        fmt_f(g.sum),
    );
    // min and max: within all readings' extremes, and at least as far out
    // as the certain readings'.
    let min_hi = if c.count > 0 { c.min } else { a.max };
    within(
        "min",
        a.min <= g.min && g.min <= min_hi,
        format!("{}..={}", fmt_f(a.min), fmt_f(min_hi)),
        fmt_f(g.min),
    );
    let max_lo = if c.count > 0 { c.max } else { a.min };
    within(
        "max",
        max_lo <= g.max && g.max <= a.max,
        format!("{}..={}", fmt_f(max_lo), fmt_f(a.max)),
        fmt_f(g.max),
    );
    let got_first = (g.first.ts, g.first.value);
    let first_hi = if c.count > 0 { c.first } else { a.last };
    within(
        "first",
        !point_before(got_first, a.first) && !point_before(first_hi, got_first),
        format!("{}..={}", fmt_point(a.first), fmt_point(first_hi)),
        fmt_point(got_first),
    );
    let got_last = (g.last.ts, g.last.value);
    let last_lo = if c.count > 0 { c.last } else { a.first };
    within(
        "last",
        !point_before(got_last, last_lo) && !point_before(a.last, got_last),
        format!("{}..={}", fmt_point(last_lo), fmt_point(a.last)),
        fmt_point(got_last),
    );
    if g.count > 0 {
        let n = g.count as f64;
        within(
            "avg",
            (g.avg - g.sum / n).abs() <= slack / n,
            format!("sum / count = {}", fmt_f(g.sum / n)),
            fmt_f(g.avg),
        );
        // Popoviciu: a population's spread is at most half its range.
        // Compared as variances, with the exact check's tolerance: a
        // stddev computed from sums of squares may land just past the
        // bound when the readings sit close together far from zero.
        let spread = (a.max - a.min) / 2.0;
        let mean_sq = if a.count > 0 {
            a.sum_sq / a.count as f64
        } else {
            0.0
        };
        within(
            "stddev",
            g.stddev * g.stddev <= spread * spread + variance_slack(mean_sq),
            format!("<= half the range of all readings, {}", fmt_f(spread)),
            fmt_f(g.stddev),
        );
    }
    if (c.count..=a.count).contains(&g.count) && g.count > 0 {
        check_quantiles(&a.values, &c.values, a.max, g.count, g, out);
    }
}

/// Relative accuracy of the pipeline's quantile sketch (1 %), plus rounding
/// where a value sits on the edge of a bin.
pub const QUANTILE_ALPHA: f64 = 0.01 + 1e-9;
/// Magnitudes the sketch reads back as zero.
const QUANTILE_ZERO: f64 = 1e-9;

/// Holds p50, p90 and p99 of a window of `n` values to its true order
/// statistics. The sketch answers the value at rank `floor(q·(n − 1))`
/// (0-based) within relative error α; neighbouring ranks are allowed too, for
/// rounding of `q·(n − 1)` and for the other common rank definitions. The
/// window's values lie between `lower` (a superset: its order statistics are
/// at most the window's) and `upper` (a subset: at least); for a certain
/// window both are its values. `max` is the most any value can be. An answer
/// clamped to `[min, max]` passes: clamping only moves it towards the truth.
fn check_quantiles(
    lower: &Values,
    upper: &Values,
    max: f64,
    n: u64,
    g: &ApiWindow,
    out: &mut Vec<(&'static str, String, String)>,
) {
    for (field, q, got) in [
        ("p50", 0.5, g.p50),
        ("p90", 0.9, g.p90),
        ("p99", 0.99, g.p99),
    ] {
        let rank = (q * (n - 1) as f64).floor() as u64;
        let Some(lo) = lower.at(rank.saturating_sub(1)) else {
            continue;
        };
        let hi = upper.at(rank + 1).unwrap_or(max).min(max);
        let (lo_ok, hi_ok) = (
            lo - QUANTILE_ALPHA * lo.abs() - QUANTILE_ZERO,
            hi + QUANTILE_ALPHA * hi.abs() + QUANTILE_ZERO,
        );
        if !(lo_ok..=hi_ok).contains(&got) {
            out.push((
                field,
                format!(
                    "rank {rank} of {n} in [{}, {}], within 1 %",
                    fmt_f(lo),
                    fmt_f(hi)
                ),
                fmt_f(got),
            ));
        }
    }
}

fn fmt_f(v: f64) -> String {
    format!("{v:?}")
}

fn fmt_point((ts, v): (i64, f64)) -> String {
    format!("{v:?}@{ts}")
}

/// `ms` since the epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn fmt_utc(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let rem = ms.rem_euclid(86_400_000);
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000
    )
}

#[cfg(test)]
mod tests;
