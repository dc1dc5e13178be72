//! Whether a run kept its schedule, and if not, which side fell behind.

use crate::publish::device::DeviceCounters;
use crate::summary;

/// Whether the schedule was kept, and if not, which side fell behind: the
/// broker (publishes waited for PUBACKs, PUBACKs took seconds, or
/// acknowledgements fell short of publishes made on time) or the simulator
/// itself (publishes late with the broker answering promptly).
///
/// Kept means both: publishes no more than [`MAX_LAG_P99_MS`] behind their
/// due time at the p99, and at least 98 % of the target acknowledged per
/// second. Judged on readings, which backfill batching does not change.
pub(super) fn verdict(
    c: &DeviceCounters,
    (achieved, target): (f64, f64),
    lag: Option<&summary::Latency>,
    puback: Option<&summary::Latency>,
    window: usize,
) -> String {
    let on_rate = target <= 0.0 || achieved >= 0.98 * target;
    let (lag_p99, lag_max) = lag.map_or((0.0, 0.0), |l| (l.p99_ms, l.max_ms));
    let on_time = lag_p99 <= MAX_LAG_P99_MS;
    let rate = format!(
        "{achieved:.1} of {target:.1} readings/s acknowledged ({:.1} %)",
        100.0 * achieved / target.max(1e-9)
    );
    let lagging = format!(
        "publish lag p99 {}, max {}",
        seconds_or_ms(lag_p99),
        seconds_or_ms(lag_max)
    );
    let p50 = puback.map_or(0.0, |l| l.p50_ms);
    let slow_acks = p50 > SLOW_PUBACK_MS;
    if on_rate && on_time {
        let mut v = format!("kept the schedule: {rate}, {lagging}");
        if c.behind > 0 {
            v.push_str(&format!("; {} publishes over 100 ms late", c.behind));
        }
        if slow_acks || c.window_waits > 0 {
            v.push_str(&format!(
                "; the broker is slow to acknowledge: PUBACK p50 {p50:.0} ms, {} publishes waited for a full in-flight window",
                c.window_waits
            ));
        }
        return v;
    }
    let mut causes = Vec::new();
    // Publishes made on time but acknowledged too slowly: only the broker
    // can be behind.
    if c.window_waits > 0 || slow_acks || on_time {
        causes.push(format!(
            "the broker is not keeping up: PUBACK p50 {p50:.0} ms, {} publishes waited for a full in-flight window ({window} per device)",
            c.window_waits
        ));
    }
    if !on_time && c.window_waits == 0 {
        let who = if causes.is_empty() {
            "the simulator fell behind its schedule"
        } else {
            "publishing also fell behind (the simulator shares the CPU with the broker here)"
        };
        causes.push(format!("{who}: {} publishes over 100 ms late", c.behind));
    }
    format!(
        "did not keep the schedule: {lagging}, {rate}; {}",
        causes.join("; ")
    )
}

/// "850 ms" or "9.4 s".
fn seconds_or_ms(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else {
        format!("{ms:.0} ms")
    }
}

/// PUBACKs slower than this (median) mean the broker is behind, not busy.
const SLOW_PUBACK_MS: f64 = 1000.0;
/// Publishes this far behind their due time at the p99 did not keep the
/// schedule, whatever the rate.
const MAX_LAG_P99_MS: f64 = 1000.0;

#[cfg(test)]
mod tests {
    use super::*;

    fn latency(p50_ms: f64) -> summary::Latency {
        summary::Latency {
            count: 1,
            p50_ms,
            p90_ms: p50_ms,
            p99_ms: p50_ms,
            p999_ms: p50_ms,
            max_ms: p50_ms,
        }
    }

    #[test]
    fn the_verdict_names_the_side_that_fell_behind() {
        let mut c = DeviceCounters::default();
        let on_time = latency(5.0);
        let kept = verdict(
            &c,
            (995.0, 1000.0),
            Some(&on_time),
            Some(&latency(5.0)),
            256,
        );
        assert!(kept.starts_with("kept the schedule"), "{kept}");
        c.behind = 500;
        let late_but_on_rate = verdict(
            &c,
            (990.0, 1000.0),
            Some(&latency(300.0)),
            Some(&latency(5.0)),
            256,
        );
        assert!(
            late_but_on_rate.starts_with("kept the schedule"),
            "{late_but_on_rate}"
        );
        assert!(
            late_but_on_rate.contains("500 publishes over 100 ms late"),
            "{late_but_on_rate}"
        );
        // On rate, but publishes ran seconds behind at the p99: not kept.
        let far_behind = verdict(
            &c,
            (1000.0, 1000.0),
            Some(&latency(9400.0)),
            Some(&latency(3.0)),
            256,
        );
        assert!(
            far_behind.starts_with("did not keep the schedule: publish lag p99 9.4 s"),
            "{far_behind}"
        );
        assert!(
            far_behind.contains("the simulator fell behind its schedule"),
            "{far_behind}"
        );
        let slow_broker = verdict(
            &c,
            (800.0, 1000.0),
            Some(&latency(2000.0)),
            Some(&latency(8000.0)),
            256,
        );
        assert!(
            slow_broker.starts_with("did not keep the schedule"),
            "{slow_broker}"
        );
        assert!(
            slow_broker.contains("the broker is not keeping up"),
            "{slow_broker}"
        );
        assert!(
            slow_broker.contains("publishing also fell behind"),
            "{slow_broker}"
        );
        // Published on time, acknowledged at 54 %: the broker.
        let short_acks = verdict(
            &c,
            (540.0, 1000.0),
            Some(&on_time),
            Some(&latency(300.0)),
            256,
        );
        assert!(
            short_acks.contains("540.0 of 1000.0 readings/s acknowledged (54.0 %)"),
            "{short_acks}"
        );
        assert!(
            short_acks.contains("the broker is not keeping up"),
            "{short_acks}"
        );
        c.behind = 0;
        c.window_waits = 7;
        let full = verdict(&c, (990.0, 1000.0), Some(&on_time), Some(&latency(30.0)), 4);
        assert!(full.starts_with("kept the schedule"), "{full}");
        assert!(full.contains("7 publishes waited"), "{full}");
    }
}
