//! Windows as SQL can read them: the `windows` column of migration 2.
//!
//! An item's `state` is postcard, which SQL cannot read. Beside it, in the
//! same row and the same statement, the writer stores the figures of the
//! windows the item holds as a JSON array, one element per window and
//! metric: `{"metric", "start", "res" (ms), "count", "sum", "min", "max",
//! "avg", "late_count", "revision"}`. The views `device_windows` and
//! `fleet_windows` unnest it for dashboards (docs/SCALE-OUT.md, "Grafana").
//!
//! The figures come from the item the core hands the store, before it is
//! encoded, through `WindowAgg`'s own accessors: nothing is decoded, and a
//! span's window of one value (stored compactly) is already a whole
//! aggregate here.

use std::sync::atomic::{AtomicBool, Ordering};

use rollup::keys::ItemKey;
use schemas::state::{Item, ItemState};
use schemas::{Resolution, WindowAgg};
use serde::Serialize;

/// One window of one metric, as the views read it.
#[derive(Debug, Serialize)]
struct SqlWindow<'a> {
    metric: &'a str,
    /// ms since the epoch.
    start: i64,
    /// The window's length in ms.
    res: i64,
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    avg: f64,
    late_count: u64,
    revision: u64,
}

impl<'a> SqlWindow<'a> {
    fn of(metric: &'a str, start: i64, res: Resolution, agg: &WindowAgg) -> Self {
        SqlWindow {
            metric,
            start,
            res: res.ms(),
            count: agg.count,
            sum: agg.sum,
            min: agg.min,
            max: agg.max,
            avg: agg.avg(),
            late_count: agg.late_count,
            revision: agg.revision,
        }
    }
}

/// Set once a window item's figures could not be written, so that the
/// failure is logged once and not per commit.
static UNWRITTEN_LOGGED: AtomicBool = AtomicBool::new(false);

/// The `windows` column of `item` written at `key`: a device's span (its
/// windows of `finest`), compacted window or a fleet window part; `None`
/// for every other item, and for an item whose key and state disagree,
/// which the core never writes.
pub(super) fn column(key: &ItemKey, item: &Item, finest: Resolution) -> Option<String> {
    let windows: Vec<SqlWindow<'_>> = match (key, &item.state) {
        (ItemKey::Span { .. }, ItemState::Span(span)) => span
            .windows
            .iter()
            .flat_map(|w| {
                w.metrics
                    .iter()
                    .map(move |m| SqlWindow::of(&m.metric, w.start, finest, &m.agg))
            })
            .collect(),
        (ItemKey::DeviceWindow { res, start, .. }, ItemState::Windows(w)) => w
            .metrics
            .iter()
            .map(|(metric, agg)| SqlWindow::of(metric, *start, *res, agg))
            .collect(),
        (
            ItemKey::FleetWindow {
                metric, res, start, ..
            },
            ItemState::Window(agg),
        ) => vec![SqlWindow::of(metric, *start, *res, agg)],
        _ => return None,
    };
    // Plain structs of numbers and strings always serialise (a value that
    // is not finite becomes `null`). Were that ever to fail, the commit
    // still lands whole, as before the column existed: only this item's
    // row in the views is missing, which is logged once rather than fail
    // the pipeline for a dashboard's sake.
    match serde_json::to_string(&windows) {
        Ok(json) => Some(json),
        Err(e) => {
            if !UNWRITTEN_LOGGED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    pk = %key.pk(),
                    sk = %key.sk(),
                    error = %e,
                    "A window item's figures could not be written for SQL; its row is missing \
                     from the windows views until it is written again (logged once)."
                );
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use schemas::state::{MetricWindows, SpanState};
    use serde_json::Value;

    use super::*;

    const MINUTE: Resolution = Resolution::DEFAULTS[0];
    const HOUR: Resolution = Resolution::DEFAULTS[1];

    fn item(state: ItemState) -> Item {
        Item {
            applied: Default::default(),
            state,
        }
    }

    fn parse(json: Option<String>) -> Vec<Value> {
        let json = json.expect("a window item has the column");
        match serde_json::from_str(&json).unwrap() {
            Value::Array(a) => a,
            other => panic!("not an array: {other}"),
        }
    }

    #[test]
    fn a_span_gives_each_window_and_metric_with_the_aggregates_own_figures() {
        let mut span = SpanState::default();
        // A window of one on-time value (stored compactly) and a full one
        // with a late reading.
        span.window_mut(60_000, "t").agg.add(60_005, 21.5, false);
        let full = span.window_mut(0, "t");
        full.agg.add(1, 1.0, false);
        full.agg.add(2, 4.0, true);
        full.late_at.push(70_000);
        span.window_mut(0, "h").agg.add(3, 50.0, false);
        let key = ItemKey::Span {
            device: "d".into(),
            start: 0,
        };
        let rows = parse(column(&key, &item(ItemState::Span(span)), MINUTE));
        let brief: Vec<(&str, i64, u64)> = rows
            .iter()
            .map(|r| {
                (
                    r["metric"].as_str().unwrap(),
                    r["start"].as_i64().unwrap(),
                    r["count"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(brief, [("h", 0, 1), ("t", 0, 2), ("t", 60_000, 1)]);
        let late = &rows[1];
        assert_eq!(late["res"], 60_000);
        assert_eq!(
            (late["sum"].as_f64(), late["avg"].as_f64()),
            (Some(5.0), Some(2.5))
        );
        assert_eq!(
            (late["min"].as_f64(), late["max"].as_f64()),
            (Some(1.0), Some(4.0))
        );
        assert_eq!(
            (late["late_count"].as_u64(), late["revision"].as_u64()),
            (Some(1), Some(1))
        );
        assert_eq!(rows[2]["avg"].as_f64(), Some(21.5));
    }

    #[test]
    fn compacted_windows_and_fleet_parts_take_start_and_resolution_from_their_key() {
        let mut agg = WindowAgg::default();
        agg.add(10, 3.0, false);
        agg.add(20, 5.0, false);
        let compacted = MetricWindows {
            metrics: vec![("t".into(), agg.clone())],
        };
        let key = ItemKey::DeviceWindow {
            device: "d".into(),
            res: HOUR,
            start: 3_600_000,
        };
        let rows = parse(column(&key, &item(ItemState::Windows(compacted)), MINUTE));
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0]["start"].as_i64(), rows[0]["res"].as_i64()),
            (Some(3_600_000), Some(3_600_000))
        );
        assert_eq!(rows[0]["avg"].as_f64(), Some(4.0));

        let key = ItemKey::FleetWindow {
            fleet: "f".into(),
            metric: "t".into(),
            res: MINUTE,
            start: 120_000,
            part: "shard-0".into(),
        };
        let rows = parse(column(&key, &item(ItemState::Window(agg)), MINUTE));
        assert_eq!(rows[0]["metric"], "t");
        assert_eq!(
            (rows[0]["start"].as_i64(), rows[0]["count"].as_u64()),
            (Some(120_000), Some(2))
        );
    }

    #[test]
    fn other_items_and_empty_extremes_are_written_as_sql_can_read_them() {
        let counter = ItemKey::Counter {
            shard: "s".into(),
            name: "n".into(),
        };
        assert_eq!(column(&counter, &item(ItemState::Counter(3)), MINUTE), None);
        // A span key over a state that is no span: no column, not a guess.
        let span = ItemKey::Span {
            device: "d".into(),
            start: 0,
        };
        assert_eq!(column(&span, &item(ItemState::Counter(3)), MINUTE), None);
        // An empty aggregate's infinite extremes are JSON nulls (SQL NULL).
        let key = ItemKey::FleetWindow {
            fleet: "f".into(),
            metric: "t".into(),
            res: MINUTE,
            start: 0,
            part: "p".into(),
        };
        let rows = parse(column(
            &key,
            &item(ItemState::Window(WindowAgg::default())),
            MINUTE,
        ));
        assert!(
            rows[0]["min"].is_null() && rows[0]["max"].is_null(),
            "{rows:?}"
        );
    }
}
