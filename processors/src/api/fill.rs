//! Gap filling for window series (`fill=` and `max_gap=`): the windows of a
//! range that hold no reading, answered as rows of their own so that a chart
//! can tell a gap from a line drawn across it.
//!
//! - `none` (the default): only windows that hold readings, as stored.
//! - `null`: every window of the range; an empty one has `count` 0 and
//!   `null` values.
//! - `previous`: an empty window carries the values of the last window
//!   before it that holds readings.
//! - `linear`: an empty window's values are interpolated, by window start,
//!   between the windows that hold readings on either side.
//!
//! `max_gap` bounds what `previous` and `linear` fill: a run of empty
//! windows longer than it stays `null`, so that a device that went quiet for
//! an hour shows a gap, not an hour of invented values. Filling never looks
//! outside `[from, to)`: before the range's first window with readings
//! there is nothing to carry, after its last nothing to interpolate
//! towards, and those windows are `null`.
//!
//! What a filled window carries: the intensive values (min, max, avg,
//! stddev, p50, p90, p99). `count` is 0 and `sum`, `first` and `last` are
//! `null` in every filled window, because no reading is in it: a carried
//! sum or count would be counted twice by anyone adding windows up.
//! `late_count` and `revision` are 0; `final` says whether a reading could
//! still land in the window. Each filled window says how it was filled in
//! `filled`.

use schemas::{Point, WindowView};

use super::problem::Problem;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    None,
    Null,
    Previous,
    Linear,
}

impl Fill {
    pub fn parse(v: Option<&str>) -> Result<Fill, Problem> {
        Ok(match v {
            None | Some("none") => Fill::None,
            Some("null") => Fill::Null,
            Some("previous") => Fill::Previous,
            Some("linear") => Fill::Linear,
            Some(other) => {
                return Err(Problem::bad_request(format!(
                    "`fill` must be none, null, previous or linear, got `{other}`"
                )));
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Fill::None => "none",
            Fill::Null => "null",
            Fill::Previous => "previous",
            Fill::Linear => "linear",
        }
    }
}

/// What a request asked to fill, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FillSpec {
    pub fill: Fill,
    /// The longest run of empty windows, in ms, that `previous` and
    /// `linear` fill.
    pub max_gap_ms: Option<i64>,
}

impl FillSpec {
    pub fn parse(fill: Option<&str>, max_gap: Option<&str>) -> Result<FillSpec, Problem> {
        let fill = Fill::parse(fill)?;
        let max_gap_ms = match max_gap {
            None => None,
            Some(_) if !matches!(fill, Fill::Previous | Fill::Linear) => {
                return Err(Problem::bad_request(
                    "`max_gap` applies to fill=previous or fill=linear",
                ));
            }
            Some(v) => {
                let d = humantime::parse_duration(v).map_err(|e| {
                    Problem::bad_request(format!("`max_gap` `{v}` is not a duration: {e}"))
                })?;
                let ms = i64::try_from(d.as_millis())
                    .map_err(|_| Problem::bad_request(format!("`max_gap` `{v}` is too long")))?;
                Some(ms)
            }
        };
        Ok(FillSpec { fill, max_gap_ms })
    }
}

/// A row of a filled answer: a stored window, or a filled one.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub view: WindowView,
    /// How the window was filled; `None` for a window that holds readings.
    pub filled: Option<Fill>,
}

/// The range a filled answer covers: windows of `res_ms` starting at
/// `first_start`, `first_start + res_ms`, … before `end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slots {
    pub first_start: i64,
    pub end: i64,
    pub res_ms: i64,
}

impl Slots {
    pub fn count(&self) -> usize {
        if self.end <= self.first_start || self.res_ms <= 0 {
            return 0;
        }
        usize::try_from((self.end - self.first_start + self.res_ms - 1) / self.res_ms)
            .unwrap_or(usize::MAX)
    }

    fn start(&self, i: usize) -> i64 {
        self.first_start + i as i64 * self.res_ms
    }
}

/// Every window of `slots`: the stored `windows` (ordered by start, each on
/// a slot) where they are, filled rows between them. `is_final(end)`: whether
/// a window ending at `end` can still change.
pub fn fill(
    windows: &[WindowView],
    slots: Slots,
    spec: FillSpec,
    is_final: &dyn Fn(i64) -> bool,
) -> Vec<Row> {
    let n = slots.count();
    let mut rows = Vec::with_capacity(n);
    let mut next = 0;
    let mut i = 0;
    while i < n {
        let start = slots.start(i);
        while next < windows.len() && windows[next].start < start {
            next += 1;
        }
        if let Some(w) = windows.get(next).filter(|w| w.start == start) {
            rows.push(Row {
                view: w.clone(),
                filled: None,
            });
            next += 1;
            i += 1;
            continue;
        }
        // A run of empty slots up to the next stored window or the range's end.
        let run_end = windows
            .get(next)
            .map_or(slots.end, |w| w.start.min(slots.end));
        let run = (i..n)
            .take_while(|&j| slots.start(j) < run_end)
            .count()
            .max(1);
        let gap_ms = run as i64 * slots.res_ms;
        let before = next.checked_sub(1).and_then(|k| windows.get(k));
        let after = windows.get(next).filter(|w| w.start < slots.end);
        let fits = spec.max_gap_ms.is_none_or(|max| gap_ms <= max);
        for j in i..i + run {
            let start = slots.start(j);
            let end = start + slots.res_ms;
            let filled = match (spec.fill, before, after) {
                (Fill::Previous, Some(b), _) if fits => carried(b, start, end, Fill::Previous),
                (Fill::Linear, Some(b), Some(a)) if fits => interpolated(b, a, start, end),
                _ => empty(start, end, Fill::Null),
            };
            rows.push(Row {
                view: WindowView {
                    is_final: is_final(end),
                    ..filled.view
                },
                filled: filled.filled,
            });
        }
        i += run;
    }
    rows
}

/// A window without readings and without values.
fn empty(start: i64, end: i64, how: Fill) -> Row {
    let none = f64::NAN;
    Row {
        view: WindowView {
            start,
            end,
            count: 0,
            sum: none,
            min: none,
            max: none,
            avg: none,
            stddev: none,
            first: Point {
                ts: start,
                value: none,
            },
            last: Point {
                ts: start,
                value: none,
            },
            p50: none,
            p90: none,
            p99: none,
            late_count: 0,
            revision: 0,
            is_final: false,
        },
        filled: Some(how),
    }
}

fn carried(from: &WindowView, start: i64, end: i64, how: Fill) -> Row {
    let mut row = empty(start, end, how);
    set_intensive(&mut row.view, |field| field(from));
    row
}

fn interpolated(before: &WindowView, after: &WindowView, start: i64, end: i64) -> Row {
    let t = (start - before.start) as f64 / (after.start - before.start) as f64;
    let mut row = empty(start, end, Fill::Linear);
    set_intensive(&mut row.view, |field| {
        let (a, b) = (field(before), field(after));
        a + (b - a) * t
    });
    row
}

/// Sets the values a gap may take from stored windows (counts and sums
/// never: nothing was measured there), each to what `value` makes of that
/// field.
fn set_intensive(v: &mut WindowView, value: impl Fn(fn(&WindowView) -> f64) -> f64) {
    v.min = value(|w| w.min);
    v.max = value(|w| w.max);
    v.avg = value(|w| w.avg);
    v.stddev = value(|w| w.stddev);
    v.p50 = value(|w| w.p50);
    v.p90 = value(|w| w.p90);
    v.p99 = value(|w| w.p99);
}

#[cfg(test)]
mod tests {
    use super::*;

    const RES: i64 = 60_000;

    /// A window at slot `i` whose intensive values are all `x`.
    fn stored(i: i64, x: f64) -> WindowView {
        let mut v = empty(i * RES, (i + 1) * RES, Fill::None).view;
        v.count = 2;
        v.sum = 2.0 * x;
        (v.min, v.max, v.avg, v.stddev) = (x, x, x, 0.0);
        (v.p50, v.p90, v.p99) = (x, x, x);
        v.first = Point {
            ts: i * RES,
            value: x,
        };
        v.last = Point {
            ts: i * RES + 1,
            value: x,
        };
        v.is_final = true;
        v
    }

    fn slots(n: i64) -> Slots {
        Slots {
            first_start: 0,
            end: n * RES,
            res_ms: RES,
        }
    }

    fn spec(fill: Fill, max_gap_ms: Option<i64>) -> FillSpec {
        FillSpec { fill, max_gap_ms }
    }

    /// Each row as (how it was filled, its avg or None for null).
    fn shape(rows: &[Row]) -> Vec<(Option<Fill>, Option<f64>)> {
        rows.iter()
            .map(|r| (r.filled, Some(r.view.avg).filter(|a| !a.is_nan())))
            .collect()
    }

    /// Stored windows at slots 1 (avg 10) and 4 (avg 40) of 0..7.
    fn gappy() -> Vec<WindowView> {
        vec![stored(1, 10.0), stored(4, 40.0)]
    }

    fn never_final(_: i64) -> bool {
        false
    }

    #[test]
    fn null_answers_every_window_and_empty_ones_hold_no_values() {
        let rows = fill(&gappy(), slots(7), spec(Fill::Null, None), &never_final);
        let n = Some(Fill::Null);
        assert_eq!(
            shape(&rows),
            [
                (n, None),
                (None, Some(10.0)),
                (n, None),
                (n, None),
                (None, Some(40.0)),
                (n, None),
                (n, None)
            ]
        );
        let starts: Vec<i64> = rows.iter().map(|r| r.view.start).collect();
        assert_eq!(starts, (0..7).map(|i| i * RES).collect::<Vec<_>>());
        assert!(rows[2].view.count == 0 && rows[2].view.sum.is_nan());
        assert!(rows[1].view.is_final, "a stored window keeps its own final");
    }

    #[test]
    fn previous_carries_the_last_values_and_never_a_count_or_sum() {
        let rows = fill(&gappy(), slots(7), spec(Fill::Previous, None), &never_final);
        let (p, n) = (Some(Fill::Previous), Some(Fill::Null));
        assert_eq!(
            shape(&rows),
            [
                (n, None),
                (None, Some(10.0)),
                (p, Some(10.0)),
                (p, Some(10.0)),
                (None, Some(40.0)),
                (p, Some(40.0)),
                (p, Some(40.0))
            ]
        );
        let carried = &rows[2].view;
        assert_eq!((carried.count, carried.p99), (0, 10.0));
        assert!(
            carried.sum.is_nan() && carried.first.value.is_nan() && carried.last.value.is_nan()
        );
    }

    #[test]
    fn linear_interpolates_by_window_start_between_stored_windows() {
        let rows = fill(&gappy(), slots(7), spec(Fill::Linear, None), &never_final);
        let (l, n) = (Some(Fill::Linear), Some(Fill::Null));
        assert_eq!(
            shape(&rows),
            [
                (n, None),
                (None, Some(10.0)),
                (l, Some(20.0)),
                (l, Some(30.0)),
                (None, Some(40.0)),
                (n, None),
                (n, None)
            ]
        );
    }

    #[test]
    fn max_gap_leaves_longer_runs_null_and_fills_shorter_ones() {
        // Runs: slots 2–3 (2 minutes) and 5–6 (2 minutes, to the range's end).
        for (max_gap, filled) in [(2 * RES, true), (2 * RES - 1, false)] {
            for how in [Fill::Previous, Fill::Linear] {
                let rows = fill(&gappy(), slots(7), spec(how, Some(max_gap)), &never_final);
                let got = rows[2].filled;
                let want = if filled { Some(how) } else { Some(Fill::Null) };
                assert_eq!(got, want, "{how:?} with max_gap {max_gap}");
                assert_eq!(rows[3].filled, want, "{how:?} with max_gap {max_gap}");
            }
        }
        // A run of one window fills under a max_gap of one window.
        let one = vec![stored(0, 1.0), stored(2, 3.0)];
        let rows = fill(&one, slots(3), spec(Fill::Linear, Some(RES)), &never_final);
        assert_eq!(shape(&rows)[1], (Some(Fill::Linear), Some(2.0)));
    }

    #[test]
    fn none_stored_fills_every_window_with_null_whatever_the_mode() {
        for how in [Fill::Null, Fill::Previous, Fill::Linear] {
            let rows = fill(&[], slots(3), spec(how, None), &never_final);
            assert_eq!(rows.len(), 3);
            assert!(rows.iter().all(|r| r.filled == Some(Fill::Null)), "{how:?}");
        }
    }

    #[test]
    fn a_filled_window_is_final_when_nothing_can_land_in_it_any_more() {
        let rows = fill(&gappy(), slots(7), spec(Fill::Null, None), &|end| {
            end <= 3 * RES
        });
        let finals: Vec<bool> = rows.iter().map(|r| r.view.is_final).collect();
        // Slot 1 is stored (final); 4 is stored (final as stored).
        assert_eq!(finals, [true, true, true, false, true, false, false]);
    }

    #[test]
    fn slots_count_every_window_that_starts_before_the_end() {
        assert_eq!(slots(7).count(), 7);
        let partial = Slots {
            first_start: 0,
            end: 2 * RES + 1,
            res_ms: RES,
        };
        assert_eq!(partial.count(), 3);
        assert_eq!(Slots { end: 0, ..partial }.count(), 0);
    }

    #[test]
    fn parameters_are_checked_with_a_clear_answer() {
        assert_eq!(FillSpec::parse(None, None).unwrap(), spec(Fill::None, None));
        assert_eq!(
            FillSpec::parse(Some("linear"), Some("10m")).unwrap(),
            spec(Fill::Linear, Some(600_000))
        );
        for (fill, max_gap) in [
            (Some("zero"), None),
            (Some("null"), Some("10m")),
            (None, Some("10m")),
            (Some("previous"), Some("soon")),
        ] {
            let err = FillSpec::parse(fill, max_gap).unwrap_err();
            assert_eq!(
                err.status,
                axum::http::StatusCode::BAD_REQUEST,
                "{fill:?} {max_gap:?}"
            );
        }
    }
}
