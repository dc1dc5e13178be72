//! `/metrics` after a real run: the simulator, with a few malformed messages,
//! against the whole pipeline in-process on port 0. Every figure an operator
//! alerts on must be there with a value the run explains, and no label may
//! carry a device id (one series per device would not scale).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use device_sim::plan::FaultConfig;
use device_sim::{BrokerAddr, Rate, SimConfig, Stop};

/// Every device id of the run starts with this, so a label value that
/// contains it names a device.
const DEVICE_PREFIX: &str = "metrics-dev-";

/// One sample of the Prometheus text format.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Reads the text format as iotpipe writes it: `name{k="v",...} value`,
/// label values without escaped quotes or commas.
fn parse(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in `{line}`")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("labels end with }");
                let labels = body
                    .split(',')
                    .filter(|kv| !kv.is_empty())
                    .map(|kv| {
                        let (k, v) = kv.split_once('=').expect("label is k=v");
                        let v = v.trim_matches('"');
                        (k.to_string(), v.to_string())
                    })
                    .collect();
                (name.to_string(), labels)
            }
        };
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    samples
}

/// The one unlabelled sample called `name`.
fn value(samples: &[Sample], name: &str) -> f64 {
    let found: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == name && s.labels.is_empty())
        .collect();
    assert_eq!(found.len(), 1, "expected one sample `{name}`: {found:?}");
    found[0].value
}

/// The sample called `name` whose label `key` is `val`.
fn labelled(samples: &[Sample], name: &str, key: &str, val: &str) -> f64 {
    samples
        .iter()
        .find(|s| s.name == name && s.labels.get(key).map(String::as_str) == Some(val))
        .unwrap_or_else(|| panic!("no `{name}{{{key}=\"{val}\"}}`"))
        .value
}

/// The values of `name` by the value of its `shard` label.
fn per_shard(samples: &[Sample], name: &str) -> BTreeMap<String, f64> {
    samples
        .iter()
        .filter(|s| s.name == name)
        .map(|s| {
            let shard = s.labels.get("shard").expect("a lag gauge names its shard");
            (shard.clone(), s.value)
        })
        .collect()
}

/// Checks the histogram `name` is whole (cumulative buckets ending in
/// `+Inf` equal to `_count`) and returns its count.
fn histogram_count(samples: &[Sample], name: &str) -> f64 {
    let buckets: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.name == format!("{name}_bucket"))
        .map(|s| {
            let le = s.labels.get("le").expect("a bucket has le");
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            (le, s.value)
        })
        .collect();
    assert!(buckets.len() > 1, "`{name}` has no buckets");
    for pair in buckets.windows(2) {
        assert!(pair[0].0 < pair[1].0, "`{name}` bounds out of order");
        assert!(pair[0].1 <= pair[1].1, "`{name}` buckets not cumulative");
    }
    let count = value(samples, &format!("{name}_count"));
    let (last_bound, last) = buckets[buckets.len() - 1];
    assert!(last_bound.is_infinite(), "`{name}` has no +Inf bucket");
    assert_eq!(last, count, "`{name}` +Inf bucket is not the count");
    let sum = value(samples, &format!("{name}_sum"));
    assert!(sum >= 0.0 && sum.is_finite(), "`{name}_sum` is {sum}");
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_explain_a_run_with_malformed_messages() {
    let dir = tempfile::tempdir().unwrap();
    let config = support::config(dir.path());
    let shards = config.stream.shards as usize;
    let p = iotpipe::start(&config).await.unwrap();
    let devices = 20;
    let summary = device_sim::run(SimConfig {
        broker: BrokerAddr {
            host: p.mqtt_addr.ip().to_string(),
            port: p.mqtt_addr.port(),
        },
        devices,
        rate: Rate::PerDevice(5.0),
        stop: Stop::After(Duration::from_secs(3)),
        qos: 1,
        seed: 11,
        device_prefix: Some(DEVICE_PREFIX.into()),
        faults: FaultConfig {
            malformed_rate: 0.05,
            ..FaultConfig::default()
        },
        // Verify returns once every accepted reading is in the rollups, so
        // the processors' figures below are final.
        verify: Some(format!("http://{}", p.http_addr)),
        verify_timeout: Duration::from_secs(60),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    println!("{summary}");
    assert!(summary.ok(), "{summary}");
    assert!(summary.malformed_sent > 0, "{summary:?}");

    let url = format!("http://{}/metrics", p.http_addr);
    let resp = reqwest::get(&url).await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let text = resp.text().await.unwrap();
    let m = parse(&text);

    // Messages in: at least every acknowledged one (retransmissions may add).
    let messages_in = value(&m, "iotpipe_mqtt_messages_received_total");
    assert!(messages_in >= summary.acked as f64, "{messages_in}");
    assert!(summary.acked > 0);

    // Readings accepted: every reading sent, once (the simulator sends its
    // malformed messages besides its readings).
    let sent = summary.readings_sent as f64;
    let accepted = value(&m, "iotpipe_processor_readings_accepted_total");
    assert_eq!(accepted, sent, "processor readings accepted");
    let ingest_accepted = value(&m, "iotpipe_mqtt_readings_accepted_total");
    assert!(ingest_accepted >= sent, "{ingest_accepted}");

    // Rejections by reason: every malformed message is counted as such, and
    // every reason has its own series.
    let malformed = labelled(
        &m,
        "iotpipe_processor_rejected_total",
        "reason",
        "malformed_json",
    );
    // A retransmitted malformed message is refused again.
    let most = summary.malformed_sent + summary.retransmissions;
    assert!(
        (summary.malformed_sent as f64..=most as f64).contains(&malformed),
        "{malformed} malformed_json of {} sent",
        summary.malformed_sent
    );
    for reason in ["schema", "too_large", "too_late", "in_future", "bad_topic"] {
        let n = labelled(&m, "iotpipe_processor_rejected_total", "reason", reason);
        assert_eq!(n, 0.0, "nothing of the run is `{reason}`");
    }

    // Stream lag: both gauges for every shard, and caught up after verify
    // (records behind cannot exceed what was appended).
    let appended = value(&m, "iotpipe_stream_records_appended_total");
    assert!(appended >= summary.acked as f64, "{appended}");
    let behind = per_shard(&m, "iotpipe_stream_records_behind");
    let age = per_shard(&m, "iotpipe_stream_iterator_age_seconds");
    assert_eq!(behind.len(), shards, "records behind per shard: {behind:?}");
    assert_eq!(
        behind.keys().collect::<BTreeSet<_>>(),
        age.keys().collect::<BTreeSet<_>>(),
        "both lag gauges name the same shards"
    );
    for (shard, n) in &behind {
        assert!(*n >= 0.0 && *n <= appended, "shard {shard}: {n} behind");
    }
    for (shard, secs) in &age {
        assert!(
            (0.0..600.0).contains(secs),
            "shard {shard}: iterator age {secs}"
        );
    }

    // Latency histograms saw the run.
    let batches = value(&m, "iotpipe_processor_batches_total");
    assert!(batches > 0.0);
    // A batch is counted before its duration is observed, so a scrape may
    // fall between the two.
    let timed = histogram_count(&m, "iotpipe_processor_batch_seconds");
    assert!(timed > 0.0 && timed <= batches, "{timed} of {batches}");
    assert!(histogram_count(&m, "iotpipe_store_write_seconds") > 0.0);
    assert!(histogram_count(&m, "iotpipe_processor_freshness_seconds") > 0.0);

    // No label names a device: the run's ids all start with the prefix.
    for s in &m {
        for (k, v) in &s.labels {
            assert!(
                !v.contains(DEVICE_PREFIX) && k != "device_id" && k != "device",
                "`{}` carries a device in label {k}={v}",
                s.name
            );
        }
    }

    assert_named_by_the_rule_and_documented(&m);

    p.shutdown().await.unwrap();
}

/// Every name follows the naming rule, and docs/METRICS.md lists it.
fn assert_named_by_the_rule_and_documented(m: &[Sample]) {
    let documented = include_str!("../docs/METRICS.md");
    for name in m.iter().map(|s| family(&s.name)).collect::<BTreeSet<_>>() {
        assert!(follows_the_naming_rule(name), "`{name}` breaks the rule");
        assert!(
            documented.contains(&format!("`{name}`")),
            "`{name}` is missing from docs/METRICS.md"
        );
    }
}

/// A histogram's series share its family's name.
fn family(name: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .unwrap_or(name)
}

/// docs/METRICS.md: `iotpipe_<stage>_<what>`, a stage the data flows
/// through, lower snake case.
fn follows_the_naming_rule(name: &str) -> bool {
    const STAGES: [&str; 8] = [
        "mqtt",
        "bridge",
        "tap",
        "stream",
        "processor",
        "store",
        "api",
        "alert",
    ];
    let Some(rest) = name.strip_prefix("iotpipe_") else {
        return false;
    };
    let stage = rest.split('_').next().unwrap_or("");
    STAGES.contains(&stage)
        && rest.len() > stage.len() + 1
        && rest
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

#[test]
fn the_naming_rule_refuses_names_without_a_stage() {
    assert!(follows_the_naming_rule(
        "iotpipe_mqtt_messages_received_total"
    ));
    assert!(!follows_the_naming_rule("iotpipe_messages_in_total"));
    assert!(!follows_the_naming_rule("iotpipe_mqtt"));
    assert!(!follows_the_naming_rule("mqtt_messages_total"));
    assert!(!follows_the_naming_rule("iotpipe_mqtt_Bytes"));
}
