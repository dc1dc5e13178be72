//! A device's readings live in span items (see `keys`); its coarser windows
//! are computed from them. The same functions serve the compaction in
//! [`crate::aggregate`] and the query API's answer for a window not yet
//! compacted, which is what makes the two indistinguishable.

use schemas::WindowAgg;
use schemas::state::{DeviceState, MetricWindows, SpanState};

/// The window `[start, start + res_ms)` of every metric, from the spans that
/// cover it. A reading late for its finest window is late for this window
/// only if it arrived after this window's end too.
pub fn coarse_window<'a>(
    res_ms: i64,
    start: i64,
    spans: impl IntoIterator<Item = &'a SpanState>,
) -> MetricWindows {
    let end = start + res_ms;
    let mut out: Vec<(String, WindowAgg)> = Vec::new();
    for span in spans {
        for w in span
            .windows
            .iter()
            .filter(|w| w.start >= start && w.start < end)
        {
            for m in &w.metrics {
                let mut agg = m.agg.clone();
                let fine_late = m.late_at.len() as u64;
                let late = m.late_at.iter().filter(|at| **at >= end).count() as u64;
                agg.late_count = agg.late_count.saturating_sub(fine_late) + late;
                agg.revision = agg.revision.saturating_sub(fine_late) + late;
                match out.binary_search_by(|(name, _)| name.as_str().cmp(&m.metric)) {
                    Ok(i) => out[i].1.merge(&agg),
                    Err(i) => out.insert(i, (m.metric.clone(), agg)),
                }
            }
        }
    }
    MetricWindows { metrics: out }
}

/// The finest windows of `metric` in a span, in time order.
pub fn finest_windows<'a>(
    span: &'a SpanState,
    metric: &'a str,
) -> impl Iterator<Item = (i64, &'a WindowAgg)> + 'a {
    span.windows.iter().filter_map(move |w| {
        w.metrics
            .binary_search_by(|m| m.metric.as_str().cmp(metric))
            .ok()
            .map(|i| (w.start, &w.metrics[i].agg))
    })
}

/// Settles a compacted window in its device: drops it from the pending list
/// and folds in what its spans say of the device's latest values and
/// arrival, which the API overlays only for pending windows.
pub fn settle(
    device: &mut DeviceState,
    window: (i64, i64),
    spans: &[SpanState],
    merged: &MetricWindows,
) {
    device.pending.retain(|p| *p != window);
    for s in spans {
        observe_span(device, s);
    }
    observe_windows(device, merged);
}

/// Folds a span's latest values and arrival time into a device's.
pub fn observe_span(device: &mut DeviceState, span: &SpanState) {
    device.last_seen = device.last_seen.max(span.last_seen);
    for w in &span.windows {
        for m in &w.metrics {
            if m.agg.count > 0 {
                device.observe(&m.metric, m.agg.last);
            }
        }
    }
}

/// Folds a compacted window's latest values into a device's.
fn observe_windows(device: &mut DeviceState, windows: &MetricWindows) {
    for (metric, agg) in &windows.metrics {
        if agg.count > 0 {
            device.observe(metric, agg.last);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reading_late_for_its_minute_is_late_for_the_hour_only_after_the_hour() {
        let mut span = SpanState::default();
        // Window [0, 60 s): one reading on time, one that arrived at 90 s
        // (late for the minute, on time for the hour), one at 4,000 s (late
        // for both).
        let w = span.window_mut(0, "t");
        w.agg.add(1, 1.0, false);
        w.agg.add(2, 2.0, true);
        w.late_at.push(90_000);
        w.agg.add(3, 3.0, true);
        w.late_at.push(4_000_000);
        let hour = coarse_window(3_600_000, 0, [&span]);
        let (name, agg) = &hour.metrics[0];
        assert_eq!(name, "t");
        assert_eq!(agg.count, 3);
        assert_eq!(agg.late_count, 1);
        assert_eq!(agg.revision, 1);
        assert_eq!(agg.sum, 6.0);
    }

    #[test]
    fn windows_outside_the_range_are_left_out() {
        let mut span = SpanState::default();
        span.window_mut(0, "t").agg.add(1, 1.0, false);
        span.window_mut(60_000, "t").agg.add(60_001, 5.0, false);
        let first = coarse_window(60_000, 0, [&span]);
        assert_eq!(first.metrics[0].1.count, 1);
        assert_eq!(first.metrics[0].1.sum, 1.0);
        assert_eq!(finest_windows(&span, "t").count(), 2);
        assert_eq!(finest_windows(&span, "u").count(), 0);
    }
}
