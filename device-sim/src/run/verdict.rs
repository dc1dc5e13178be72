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

    /// One run's figures, and what its verdict must say.
    struct Case {
        what: &'static str,
        behind: u64,
        window_waits: u64,
        /// Readings per second (achieved, target).
        rate: (f64, f64),
        lag_p50_ms: f64,
        puback_p50_ms: f64,
        window: usize,
        starts_with: &'static str,
        contains: &'static [&'static str],
    }

    const ON_RATE: Case = Case {
        what: "on rate and on time",
        behind: 0,
        window_waits: 0,
        rate: (995.0, 1000.0),
        lag_p50_ms: 5.0,
        puback_p50_ms: 5.0,
        window: 256,
        starts_with: "kept the schedule",
        contains: &[],
    };

    #[test]
    fn the_verdict_names_the_side_that_fell_behind() {
        for case in [
            ON_RATE,
            Case {
                what: "late but on rate",
                behind: 500,
                rate: (990.0, 1000.0),
                lag_p50_ms: 300.0,
                contains: &["500 publishes over 100 ms late"],
                ..ON_RATE
            },
            // On rate, but publishes ran seconds behind at the p99: not kept.
            Case {
                what: "far behind",
                behind: 500,
                rate: (1000.0, 1000.0),
                lag_p50_ms: 9400.0,
                puback_p50_ms: 3.0,
                starts_with: "did not keep the schedule: publish lag p99 9.4 s",
                contains: &["the simulator fell behind its schedule"],
                ..ON_RATE
            },
            Case {
                what: "slow broker",
                behind: 500,
                rate: (800.0, 1000.0),
                lag_p50_ms: 2000.0,
                puback_p50_ms: 8000.0,
                starts_with: "did not keep the schedule",
                contains: &[
                    "the broker is not keeping up",
                    "publishing also fell behind",
                ],
                ..ON_RATE
            },
            // Published on time, acknowledged at 54 %: the broker.
            Case {
                what: "short acks",
                behind: 500,
                rate: (540.0, 1000.0),
                puback_p50_ms: 300.0,
                starts_with: "",
                contains: &[
                    "540.0 of 1000.0 readings/s acknowledged (54.0 %)",
                    "the broker is not keeping up",
                ],
                ..ON_RATE
            },
            Case {
                what: "full window",
                window_waits: 7,
                rate: (990.0, 1000.0),
                puback_p50_ms: 30.0,
                window: 4,
                contains: &["7 publishes waited"],
                ..ON_RATE
            },
        ] {
            let c = DeviceCounters {
                behind: case.behind,
                window_waits: case.window_waits,
                ..DeviceCounters::default()
            };
            let v = verdict(
                &c,
                case.rate,
                Some(&latency(case.lag_p50_ms)),
                Some(&latency(case.puback_p50_ms)),
                case.window,
            );
            let what = case.what;
            assert!(v.starts_with(case.starts_with), "{what}: {v}");
            for part in case.contains {
                assert!(v.contains(part), "{what}: {part:?} not in {v}");
            }
        }
    }
}
