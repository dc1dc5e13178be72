//! What the benchmark reads from the simulator's JSON report
//! (`device-sim --report json FILE`), and the checks a step passes on.
//!
//! Only the fields the verdicts and the results table use are named here;
//! the report carries many more, and a field added to it changes nothing.

use serde::Deserialize;
use serde_json::Value;

/// Publishes may run at most this far behind schedule at the p99.
pub const MAX_LAG_P99_MS: f64 = 1000.0;
/// Freshness p99 over every sample, misses included.
pub const MAX_FRESHNESS_P99_MS: f64 = 1000.0;
/// The simulator's and the pipeline's readings/s may differ by this much.
pub const RATE_AGREEMENT: f64 = 0.10;
/// The share of the offered rate a step must have acknowledged.
pub const MIN_ACKNOWLEDGED_SHARE: f64 = 0.95;

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct SimReport {
    pub messages_sent: u64,
    pub readings_sent: u64,
    pub acked: u64,
    /// `None` when the report lacks it: a step without it cannot pass.
    pub failed: Option<u64>,
    pub reconnects: u64,
    /// Acknowledged messages over the real time from the first publish to
    /// the last acknowledgement.
    pub achieved_msgs_per_sec: f64,
    pub achieved_readings_per_sec: f64,
    pub rate_span_ms: f64,
    pub connect_ms: u64,
    pub schedule_lag: Option<Latency>,
    pub puback: Option<Latency>,
    pub verdict: String,
    pub verify: Option<Verify>,
    pub freshness: Option<Freshness>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Verify {
    pub ok: bool,
    pub windows: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Freshness {
    pub samples: u64,
    pub missed: u64,
    /// Milliseconds, or the string `"missed"` where the percentile falls on
    /// a sample that never became visible.
    pub p50_ms: Option<Value>,
    pub p99_ms: Option<Value>,
    /// How late the probe's own requests went out, p99: how much of the
    /// figure may be the probe rather than the pipeline.
    pub poll_late_p99_ms: Option<f64>,
}

impl Freshness {
    /// The p99 in milliseconds; `None` when it is a miss or absent.
    pub fn p99(&self) -> Option<f64> {
        self.p99_ms.as_ref().and_then(Value::as_f64)
    }
}

impl SimReport {
    pub fn parse(text: &str) -> anyhow::Result<SimReport> {
        Ok(serde_json::from_str(text)?)
    }

    /// Acknowledged at least 95 % of the offered rate, publishes on time.
    pub fn kept_schedule(&self, offered: f64) -> bool {
        let lag_ok = self
            .schedule_lag
            .as_ref()
            .is_some_and(|l| l.p99_ms <= MAX_LAG_P99_MS);
        offered > 0.0 && self.achieved_msgs_per_sec >= MIN_ACKNOWLEDGED_SHARE * offered && lag_ok
    }

    /// Freshness p99 over every sample within bounds; a miss fails.
    pub fn fresh_enough(&self) -> bool {
        self.freshness
            .as_ref()
            .and_then(Freshness::p99)
            .is_some_and(|p99| p99 <= MAX_FRESHNESS_P99_MS)
    }

    pub fn verified(&self) -> bool {
        self.verify.as_ref().is_some_and(|v| v.ok && v.windows > 0)
    }

    pub fn none_failed(&self) -> bool {
        self.failed == Some(0)
    }
}

/// Whether the simulator's readings/s and the pipeline's own agree.
pub fn rates_agree(simulator: f64, pipeline: Option<f64>) -> bool {
    match pipeline {
        Some(p) if simulator > 0.0 && p > 0.0 => (simulator / p - 1.0).abs() <= RATE_AGREEMENT,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(json: &str) -> SimReport {
        SimReport::parse(json).unwrap()
    }

    #[test]
    fn a_step_keeps_the_schedule_only_at_95_percent_and_on_time() {
        let on_time = r#"{"achieved_msgs_per_sec": 950, "schedule_lag": {"p99_ms": 1000}}"#;
        assert!(report(on_time).kept_schedule(1000.0));
        assert!(!report(on_time).kept_schedule(1001.0));
        let late = r#"{"achieved_msgs_per_sec": 1000, "schedule_lag": {"p99_ms": 1001}}"#;
        assert!(!report(late).kept_schedule(1000.0));
        let no_lag = r#"{"achieved_msgs_per_sec": 1000}"#;
        assert!(!report(no_lag).kept_schedule(1000.0));
    }

    #[test]
    fn a_missed_freshness_percentile_fails_and_a_number_is_compared() {
        assert!(report(r#"{"freshness": {"p99_ms": 1000.0}}"#).fresh_enough());
        assert!(!report(r#"{"freshness": {"p99_ms": 1000.5}}"#).fresh_enough());
        assert!(!report(r#"{"freshness": {"p99_ms": "missed"}}"#).fresh_enough());
        assert!(!report(r#"{"freshness": {"p99_ms": null}}"#).fresh_enough());
        assert!(!report("{}").fresh_enough());
    }

    #[test]
    fn a_report_without_a_failure_count_or_verify_windows_does_not_pass() {
        let r = report("{}");
        assert!(!r.none_failed());
        assert!(!r.verified());
        assert!(!report(r#"{"verify": {"ok": true, "windows": 0}}"#).verified());
        assert!(report(r#"{"failed": 0, "verify": {"ok": true, "windows": 3}}"#).verified());
    }

    #[test]
    fn rates_agree_within_ten_percent_either_way() {
        assert!(rates_agree(109.9, Some(100.0)));
        assert!(rates_agree(90.0, Some(100.0)));
        assert!(!rates_agree(111.0, Some(100.0)));
        assert!(!rates_agree(100.0, None));
        assert!(!rates_agree(0.0, Some(0.0)));
    }

    #[test]
    fn fields_the_benchmark_does_not_read_are_ignored() {
        let r = report(r#"{"acked": 5, "puback_timeline": [{"at_ms": 0}], "usage": {}}"#);
        assert_eq!(r.acked, 5);
    }
}
