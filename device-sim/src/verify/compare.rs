//! Comparing expected windows with the API's, field by field. Pure.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use crate::expect::ExpectedAgg;

/// How many mismatches a report keeps in full; the rest are counted.
pub const KEPT_MISMATCHES: usize = 20;

/// Relative tolerance for `sum` and `avg`, scaled by the sum of absolute
/// values: the pipeline may add in any order.
pub const SUM_TOLERANCE: f64 = 1e-9;

/// Relative accuracy of the pipeline's quantile sketch, plus rounding.
const QUANTILE_SLACK: f64 = 0.011;

/// A window as the query API returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
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
    /// Expected windows holding a reading whose acceptance is unknown; not
    /// compared.
    pub uncertain: u64,
    pub mismatch_count: u64,
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
                if e.maybe > 0 {
                    // No window at all is right only if every reading in it
                    // may have been refused or lost.
                    tally.uncertain += 1;
                    if e.count > e.maybe {
                        tally.push(mismatch(
                            start,
                            "window",
                            format!("count {}..={}", e.count - e.maybe, e.count),
                            "no window".into(),
                        ));
                    }
                    continue;
                }
                tally.windows += 1;
                tally.push(mismatch(
                    start,
                    "window",
                    format!("count {}", e.count),
                    "no window".into(),
                ));
            }
            Ordering::Greater => {
                let Some(g) = got.next() else { break };
                tally.windows += 1;
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
                if e.maybe > 0 {
                    // Which of its uncertain readings made it is unknown, so
                    // only the count can be checked: it lies between the
                    // certain readings and all of them.
                    tally.uncertain += 1;
                    let lo = e.count - e.maybe;
                    if !(lo..=e.count).contains(&g.count) {
                        tally.push(mismatch(
                            start,
                            "count",
                            format!("{lo}..={}", e.count),
                            g.count.to_string(),
                        ));
                    }
                    continue;
                }
                tally.windows += 1;
                for (field, want, have) in check_window(e, g, res_ms) {
                    tally.push(mismatch(start, field, want, have));
                }
            }
        }
    }
}

/// Every field of a window that disagrees: (field, expected, got).
pub fn check_window(
    e: &ExpectedAgg,
    g: &ApiWindow,
    res_ms: i64,
) -> Vec<(&'static str, String, String)> {
    let mut out = Vec::new();
    let mut exact = |field, want: String, have: String| {
        if want != have {
            out.push((field, want, have));
        }
    };
    exact("end", (g.start + res_ms).to_string(), g.end.to_string());
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
    let late = g.late_count as i64;
    if late < e.late_lo || late > e.late_hi {
        let want = if e.late_lo == e.late_hi {
            e.late_lo.to_string()
        } else {
            format!("{}..={}", e.late_lo, e.late_hi)
        };
        out.push(("late_count", want, g.late_count.to_string()));
    }
    if g.late_count > 0 && g.revision == 0 {
        out.push((
            "revision",
            ">= 1 (the window changed after its end)".into(),
            "0".into(),
        ));
    }
    let scale = e.sum_abs.max(f64::MIN_POSITIVE);
    if (g.sum - e.sum).abs() > SUM_TOLERANCE * scale {
        out.push(("sum", fmt_f(e.sum), fmt_f(g.sum)));
    }
    if e.count > 0 {
        let n = e.count as f64;
        if (g.avg - e.sum / n).abs() > SUM_TOLERANCE * scale / n {
            out.push(("avg", fmt_f(e.sum / n), fmt_f(g.avg)));
        }
        // Compared as variances: the pipeline's sum of squares loses digits
        // to cancellation that the square root would magnify near zero.
        let mean_sq = e.sum_sq / n;
        if (g.stddev * g.stddev - e.variance()).abs() > 1e-9 * mean_sq.max(1e-12) {
            out.push(("stddev", fmt_f(e.variance().sqrt()), fmt_f(g.stddev)));
        }
    }
    let lo = e.min - QUANTILE_SLACK * e.min.abs();
    let hi = e.max + QUANTILE_SLACK * e.max.abs();
    for (field, q) in [("p50", g.p50), ("p90", g.p90), ("p99", g.p99)] {
        if !(lo..=hi).contains(&q) {
            out.push((
                field,
                format!("within [{}, {}]", fmt_f(e.min), fmt_f(e.max)),
                fmt_f(q),
            ));
        }
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
mod tests {
    use super::*;

    fn agg(values: &[(i64, f64)]) -> ExpectedAgg {
        let mut a = ExpectedAgg::default();
        for (ts, v) in values {
            a.add(*ts, *v, false, false);
        }
        a
    }

    fn view(e: &ExpectedAgg, start: i64) -> ApiWindow {
        let n = e.count as f64;
        ApiWindow {
            start,
            end: start + 60_000,
            count: e.count,
            sum: e.sum,
            min: e.min,
            max: e.max,
            avg: e.sum / n,
            stddev: e.variance().sqrt(),
            first: ApiPoint {
                ts: e.first.0,
                value: e.first.1,
            },
            last: ApiPoint {
                ts: e.last.0,
                value: e.last.1,
            },
            p50: e.min,
            p90: e.max,
            p99: e.max,
            late_count: e.late_lo as u64,
            revision: e.late_lo as u64,
            is_final: false,
        }
    }

    #[test]
    fn uncertain_windows_are_held_to_their_count_range() {
        let mut e = agg(&[(1, 20.5), (2, 21.25), (3, 19.0)]);
        e.add(4, 18.0, false, true);
        let g = view(&e, 0);
        let mismatches = |got: &[ApiWindow], e: &ExpectedAgg| {
            let mut tally = Tally::default();
            compare_series("s", 60_000, [(0, e)], got, &mut tally);
            assert_eq!((tally.windows, tally.uncertain), (0, 1));
            tally.mismatch_count
        };
        // 3 certain readings and 1 that may have been lost.
        assert_eq!(
            mismatches(
                &[ApiWindow {
                    count: 3,
                    ..g.clone()
                }],
                &e
            ),
            0
        );
        assert_eq!(
            mismatches(
                &[ApiWindow {
                    count: 4,
                    ..g.clone()
                }],
                &e
            ),
            0
        );
        assert_eq!(
            mismatches(
                &[ApiWindow {
                    count: 2,
                    ..g.clone()
                }],
                &e
            ),
            1
        );
        assert_eq!(
            mismatches(
                &[ApiWindow {
                    count: 5,
                    ..g.clone()
                }],
                &e
            ),
            1
        );
        assert_eq!(mismatches(&[], &e), 1);
        // Every reading uncertain: no window at all is possible.
        let mut all_maybe = ExpectedAgg::default();
        all_maybe.add(1, 20.0, false, true);
        assert_eq!(mismatches(&[], &all_maybe), 0);
    }

    #[test]
    fn equal_windows_pass_and_each_field_is_named() {
        let e = agg(&[(1, 20.5), (2, 21.25), (3, 19.0)]);
        let g = view(&e, 0);
        assert!(check_window(&e, &g, 60_000).is_empty());
        let fields = |g: &ApiWindow| -> Vec<&str> {
            check_window(&e, g, 60_000)
                .into_iter()
                .map(|f| f.0)
                .collect()
        };
        assert_eq!(
            fields(&ApiWindow {
                count: 4,
                ..g.clone()
            }),
            ["count"]
        );
        assert_eq!(
            fields(&ApiWindow {
                min: 19.001,
                ..g.clone()
            }),
            ["min"]
        );
        assert_eq!(
            fields(&ApiWindow {
                late_count: 1,
                revision: 1,
                ..g.clone()
            }),
            ["late_count"]
        );
        assert_eq!(
            fields(&ApiWindow {
                late_count: 1,
                ..g.clone()
            }),
            ["late_count", "revision"]
        );
        assert_eq!(
            fields(&ApiWindow {
                first: ApiPoint { ts: 2, value: 20.5 },
                ..g.clone()
            }),
            ["first"]
        );
        assert_eq!(
            fields(&ApiWindow {
                sum: e.sum * (1.0 + 1e-12),
                ..g.clone()
            }),
            Vec::<&str>::new()
        );
        assert_eq!(
            fields(&ApiWindow {
                sum: e.sum * (1.0 + 1e-6),
                ..g.clone()
            }),
            ["sum"]
        );
        assert_eq!(
            fields(&ApiWindow {
                p99: 40.0,
                ..g.clone()
            }),
            ["p99"]
        );
        assert_eq!(
            fields(&ApiWindow {
                end: 1,
                ..g.clone()
            }),
            ["end"]
        );
    }

    #[test]
    fn late_count_may_fall_in_a_range() {
        let mut e = agg(&[(1, 1.0)]);
        e.late_hi = 1;
        let g = view(&e, 0);
        assert!(check_window(&e, &g, 60_000).is_empty());
        let g = ApiWindow {
            late_count: 1,
            revision: 1,
            ..g
        };
        assert!(check_window(&e, &g, 60_000).is_empty());
        let g = ApiWindow { late_count: 2, ..g };
        assert_eq!(check_window(&e, &g, 60_000)[0].1, "0..=1");
    }

    #[test]
    fn missing_and_unexpected_windows_are_mismatches() {
        let a = agg(&[(1, 1.0)]);
        let b = agg(&[(60_001, 2.0)]);
        let mut t = Tally::default();
        compare_series(
            "s",
            60_000,
            [(0, &a), (60_000, &b)],
            &[view(&b, 60_000), view(&a, 120_000)],
            &mut t,
        );
        assert_eq!(t.windows, 3);
        assert_eq!(t.mismatch_count, 2);
        assert_eq!(t.mismatches[0].start, 0);
        assert_eq!(t.mismatches[0].got, "no window");
        assert_eq!(t.mismatches[1].start, 120_000);
        assert_eq!(t.mismatches[1].expected, "no window");
        let mut maybe = a.clone();
        maybe.maybe = 1;
        let mut t = Tally::default();
        compare_series("s", 60_000, [(0, &maybe)], &[], &mut t);
        assert_eq!((t.uncertain, t.mismatch_count), (1, 0));
    }

    #[test]
    fn keeps_the_first_mismatches_and_counts_all() {
        let mut t = Tally::default();
        let empty: [(i64, &ExpectedAgg); 0] = [];
        let got: Vec<ApiWindow> = (0..50)
            .map(|i| view(&agg(&[(1, 1.0)]), i * 60_000))
            .collect();
        compare_series("s", 60_000, empty, &got, &mut t);
        assert_eq!(t.mismatch_count, 50);
        assert_eq!(t.mismatches.len(), KEPT_MISMATCHES);
    }

    #[test]
    fn formats_utc() {
        assert_eq!(fmt_utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(fmt_utc(1_764_244_859_999), "2025-11-27T12:00:59.999Z");
        assert_eq!(fmt_utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
