//! CloudWatch Embedded Metric Format: one JSON line per invocation that
//! CloudWatch Logs turns into metrics, with no API call from the function.
//!
//! The figures are the ones `/metrics` shows for the local processors:
//! records, readings accepted, duplicates, late and replayed readings,
//! rejections by reason, store writes, batch and store-write duration,
//! IteratorAge and freshness. The only dimension is the function's name: a
//! device id as a dimension would make one metric per device.

use std::sync::atomic::Ordering::Relaxed;

use schemas::RejectReason;
use serde_json::{Map, Value, json};

use crate::metrics::ProcessorMetrics;

/// Where the metrics go in CloudWatch; read once when the function starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmfConfig {
    pub namespace: String,
    /// The `Function` dimension's value, so that two deployments in one
    /// account keep their metrics apart.
    pub function: String,
}

impl Default for EmfConfig {
    fn default() -> Self {
        EmfConfig {
            namespace: "iotpipe".into(),
            function: "aggregate".into(),
        }
    }
}

/// What one invocation did, gathered while it ran.
#[derive(Debug, Default)]
pub struct Invocation {
    /// The counters and histograms `process_batch` fills, fresh per
    /// invocation since nothing survives between batches.
    pub metrics: ProcessorMetrics,
    /// From the event's arrival at the handler to the last shard's end.
    pub duration: std::time::Duration,
    /// The oldest approximate arrival timestamp in the event: IteratorAge is
    /// measured from it.
    pub oldest_arrival_ms: Option<i64>,
    /// The oldest arrival among records whose effect is durable: freshness is
    /// measured from it, so a failed shard does not count as fresh.
    pub oldest_applied_ms: Option<i64>,
    /// Shards of the event reported failed, to be retried by Lambda.
    pub failed_shards: u64,
}

/// A metric of the line: its name, unit and value.
fn metrics_of(inv: &Invocation, started_ms: i64, finished_ms: i64) -> Vec<(String, &str, f64)> {
    let m = &inv.metrics;
    let count = |v: &std::sync::atomic::AtomicU64| v.load(Relaxed) as f64;
    let mut out: Vec<(String, &str, f64)> = vec![
        ("Records".into(), "Count", count(&m.records)),
        (
            "ReadingsAccepted".into(),
            "Count",
            count(&m.readings_accepted),
        ),
        (
            "ReadingsDuplicate".into(),
            "Count",
            count(&m.readings_duplicate),
        ),
        ("ReadingsLate".into(), "Count", count(&m.readings_late)),
        (
            "ReadingsReplayed".into(),
            "Count",
            count(&m.readings_replayed),
        ),
        ("StoreWrites".into(), "Count", count(&m.store_writes)),
        ("FailedShards".into(), "Count", inv.failed_shards as f64),
        (
            "BatchDuration".into(),
            "Milliseconds",
            inv.duration.as_secs_f64() * 1e3,
        ),
        (
            "StoreWriteDuration".into(),
            "Milliseconds",
            m.store_write_seconds.sum().as_secs_f64() * 1e3,
        ),
    ];
    for reason in RejectReason::ALL {
        out.push((
            format!("Rejected_{}", reason.as_str()),
            "Count",
            m.rejected[reason.index()].load(Relaxed) as f64,
        ));
    }
    // Ages are only meaningful when there were records; an absent metric
    // keeps an empty event from pulling averages towards zero.
    if let Some(oldest) = inv.oldest_arrival_ms {
        out.push((
            "IteratorAge".into(),
            "Milliseconds",
            (started_ms - oldest).max(0) as f64,
        ));
    }
    if let Some(oldest) = inv.oldest_applied_ms {
        out.push((
            "Freshness".into(),
            "Milliseconds",
            (finished_ms - oldest).max(0) as f64,
        ));
    }
    out
}

/// The EMF line for one invocation that started at `started_ms` and
/// finished at `finished_ms` (ms since the epoch).
pub fn line(config: &EmfConfig, inv: &Invocation, started_ms: i64, finished_ms: i64) -> String {
    metrics_line(
        config,
        metrics_of(inv, started_ms, finished_ms),
        finished_ms,
    )
}

/// An EMF line with `metrics` (name, unit, value) under `config`'s namespace
/// and function, stamped `timestamp_ms`; shared by every function.
pub fn metrics_line(
    config: &EmfConfig,
    metrics: Vec<(String, &str, f64)>,
    timestamp_ms: i64,
) -> String {
    let definitions: Vec<Value> = metrics
        .iter()
        .map(|(name, unit, _)| json!({"Name": name, "Unit": unit}))
        .collect();
    let mut root = Map::new();
    root.insert(
        "_aws".into(),
        json!({
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [{
                "Namespace": config.namespace,
                "Dimensions": [["Function"]],
                "Metrics": definitions,
            }],
        }),
    );
    root.insert("Function".into(), Value::from(config.function.clone()));
    for (name, _, value) in metrics {
        root.insert(name, Value::from(value));
    }
    Value::Object(root).to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use super::*;
    use rollup::aggregate::BatchStats;

    fn invocation() -> Invocation {
        let inv = Invocation {
            duration: Duration::from_millis(42),
            oldest_arrival_ms: Some(1_000),
            oldest_applied_ms: Some(1_500),
            failed_shards: 1,
            ..Invocation::default()
        };
        let stats = BatchStats {
            records: 7,
            accepted_readings: 20,
            duplicate_readings: 3,
            late_readings: 2,
            replayed_readings: 1,
            rejected: vec![(RejectReason::MalformedJson, 4), (RejectReason::TooLate, 5)],
        };
        inv.metrics.record_batch(&stats, 11);
        inv.metrics
            .store_write_seconds
            .observe(Duration::from_millis(8));
        inv
    }

    #[test]
    fn the_line_is_emf_with_every_figure() {
        let config = EmfConfig {
            namespace: "iotpipe-test".into(),
            function: "iotpipe-aggregate".into(),
        };
        let text = line(&config, &invocation(), 4_000, 4_100);
        assert!(!text.contains('\n'), "one line: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();

        assert_eq!(v["_aws"]["Timestamp"], 4_100);
        let directives = v["_aws"]["CloudWatchMetrics"].as_array().unwrap();
        assert_eq!(directives.len(), 1);
        let d = &directives[0];
        assert_eq!(d["Namespace"], "iotpipe-test");
        assert_eq!(d["Dimensions"], json!([["Function"]]));
        // Every dimension named has a value at the root.
        assert_eq!(v["Function"], "iotpipe-aggregate");

        // Every declared metric has a numeric value at the root, and a unit
        // CloudWatch knows.
        let declared = d["Metrics"].as_array().unwrap();
        for m in declared {
            let name = m["Name"].as_str().unwrap();
            assert!(v[name].is_number(), "{name} has no value");
            assert!(
                ["Count", "Milliseconds"].contains(&m["Unit"].as_str().unwrap()),
                "{m}"
            );
        }
        let names: Vec<&str> = declared
            .iter()
            .map(|m| m["Name"].as_str().unwrap())
            .collect();
        assert!(names.len() <= 100, "EMF allows 100 metrics per directive");
        for reason in RejectReason::ALL {
            let name = format!("Rejected_{}", reason.as_str());
            assert!(names.contains(&name.as_str()), "{name} missing");
        }

        assert_eq!(v["Records"], 7.0);
        assert_eq!(v["ReadingsAccepted"], 20.0);
        assert_eq!(v["ReadingsDuplicate"], 3.0);
        assert_eq!(v["ReadingsLate"], 2.0);
        assert_eq!(v["ReadingsReplayed"], 1.0);
        assert_eq!(v["StoreWrites"], 11.0);
        assert_eq!(v["FailedShards"], 1.0);
        assert_eq!(v["Rejected_malformed_json"], 4.0);
        assert_eq!(v["Rejected_too_late"], 5.0);
        assert_eq!(v["Rejected_schema"], 0.0);
        assert_eq!(v["BatchDuration"], 42.0);
        assert_eq!(v["StoreWriteDuration"], 8.0);
        // IteratorAge from the invocation's start, freshness from its end.
        assert_eq!(v["IteratorAge"], 3_000.0);
        assert_eq!(v["Freshness"], 2_600.0);
    }

    #[test]
    fn an_empty_event_has_no_ages() {
        let text = line(&EmfConfig::default(), &Invocation::default(), 10, 20);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["Records"], 0.0);
        assert!(v.get("IteratorAge").is_none() && v.get("Freshness").is_none());
        let declared = v["_aws"]["CloudWatchMetrics"][0]["Metrics"]
            .as_array()
            .unwrap();
        assert!(declared.iter().all(|m| m["Name"] != "IteratorAge"));
    }

    #[test]
    fn no_field_names_a_device() {
        let text = line(&EmfConfig::default(), &invocation(), 4_000, 4_100);
        let v: Value = serde_json::from_str(&text).unwrap();
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert!(
            keys.iter().all(|k| !k.to_lowercase().contains("device")),
            "{keys:?}"
        );
    }
}
