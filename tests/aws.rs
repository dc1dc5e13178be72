//! The whole pipeline on the AWS backends (Kinesis and DynamoDB, on moto),
//! and parity with the embedded backends: the same messages give the same
//! rollups.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use iotpipe::config::{StoreKind, StreamKind};
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use stream::lease::LeaseStore;
use support::{get, publish_acked, wait_for};
use testkit::moto::{moto_endpoint, unique_name};
use testkit::now_ms;

fn aws_config(dir: &std::path::Path) -> iotpipe::Config {
    let mut c = support::config(dir);
    c.backend.stream = StreamKind::Kinesis;
    c.backend.store = StoreKind::Dynamodb;
    c.backend.endpoint_url = Some(moto_endpoint().unwrap());
    c.backend.stream_name = unique_name("telemetry");
    c.backend.lease_table = unique_name("leases");
    c.backend.table_name = unique_name("rollups");
    c.stream.shards = 2;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_verifies_exactly_on_kinesis_and_dynamodb() {
    let dir = tempfile::tempdir().unwrap();
    let p = iotpipe::start(&aws_config(dir.path())).await.unwrap();
    support::a_short_run_verifies(&p, 3).await;
    p.shutdown().await.unwrap();
}

/// Every field but `final` (which depends on when it is asked), numbers to
/// 1e-9 relative: batches differ between the backends, so sums may add in
/// another order.
fn same(a: &Value, b: &Value, path: &str) -> Result<(), String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                if matches!(k.as_str(), "final" | "from" | "to" | "last_seen") {
                    continue;
                }
                same(v, y.get(k).unwrap_or(&Value::Null), &format!("{path}.{k}"))?;
            }
            Ok(())
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .try_for_each(|(i, (a, b))| same(a, b, &format!("{path}[{i}]"))),
        (Value::Number(x), Value::Number(y)) if testkit::numbers_close(x, y) => Ok(()),
        (x, y) if x == y => Ok(()),
        (x, y) => Err(format!("{path}: {x} vs {y}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_and_aws_backends_give_identical_rollups() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut embedded = support::config(dir_a.path());
    let mut aws = aws_config(dir_b.path());
    // Readings two hours old, so every window they reach has ended on both
    // runs alike: a day of lateness keeps them all.
    for c in [&mut embedded, &mut aws] {
        c.aggregate.allowed_lateness = Duration::from_secs(86_400);
    }
    let a = iotpipe::start(&embedded).await.unwrap();
    let b = iotpipe::start(&aws).await.unwrap();

    let anchor = (now_ms() - 2 * 3_600_000) / 60_000 * 60_000;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let devices: Vec<String> = (0..12).map(|i| format!("par-{i:02}")).collect();
    let mut messages = Vec::new();
    for (d, device) in devices.iter().enumerate() {
        for k in 0..25u64 {
            let ts = anchor + d as i64 * 1_000 + k as i64 * 7_300;
            let payload = json!({"seq": k, "ts": ts, "metrics": {
                "temperature": (rng.random_range(-5.0..35.0f64) * 100.0).round() / 100.0,
                "humidity": (rng.random_range(10.0..90.0f64) * 100.0).round() / 100.0,
            }});
            messages.push((
                format!("dt/parity/{device}/telemetry"),
                serde_json::to_vec(&payload).unwrap(),
            ));
        }
    }
    // A few repeats, as a device retrying would send.
    messages.extend(messages[..10].to_vec());
    publish_acked(&a, "parity-publisher", &messages).await;
    publish_acked(&b, "parity-publisher", &messages).await;
    let total = devices.len() as u64 * 25;
    for p in [&a, &b] {
        wait_for(p, "/v1/stats", Duration::from_secs(90), |s| {
            s["accepted_readings"] == total && s["duplicate_readings"] == 10
        })
        .await;
    }
    let (from, to) = (anchor - 86_400_000, anchor + 86_400_000);
    let mut compared = 0;
    let mut series: Vec<String> = Vec::new();
    for device in &devices {
        for metric in ["temperature", "humidity"] {
            for res in ["1m", "1h", "1d"] {
                series.push(format!(
                    "/v1/devices/{device}/metrics/{metric}?res={res}&from={from}&to={to}"
                ));
            }
        }
        series.push(format!("/v1/devices/{device}"));
    }
    for metric in ["temperature", "humidity"] {
        for res in ["1m", "5m", "1h", "1d"] {
            series.push(format!(
                "/v1/fleets/parity/metrics/{metric}?res={res}&from={from}&to={to}"
            ));
        }
    }
    series.push("/v1/devices?fleet=parity".into());
    for path in &series {
        let (sa, ja) = get(&a, path).await;
        let (sb, jb) = get(&b, path).await;
        assert_eq!((sa, sb), (200, 200), "{path}");
        same(&ja, &jb, "body").unwrap_or_else(|e| panic!("{path}: {e}"));
        compared += ja["windows"].as_array().map_or(1, Vec::len);
    }
    assert!(compared > 150, "compared only {compared} windows");
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// Readings accepted, and readings a pipeline found applied already (a
/// second reader of the same records would find them so).
fn applied(m: &processors::metrics::ProcessorMetrics) -> (u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    (
        m.readings_accepted.load(Relaxed),
        m.readings_replayed.load(Relaxed) + m.readings_duplicate.load(Relaxed),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_kinesis_stream_split_its_shards() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut c1 = aws_config(d1.path());
    c1.stream.shards = 4;
    c1.backend.lease_duration = Duration::from_secs(3);
    let mut c2 = c1.clone();
    c2.data_dir = d2.path().to_owned();
    let p1 = iotpipe::start(&c1).await.unwrap();
    let p2 = iotpipe::start(&c2).await.unwrap();

    // The leases settle two and two, between two owners.
    let leases = stream::kinesis::KinesisStream::connect(
        &stream::kinesis::AwsConfig::stand_in(moto_endpoint().unwrap()),
        &c1.backend.stream_name,
        &c1.backend.lease_table,
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let snapshot = leases.leases().snapshot("processors").await.unwrap();
        let mut per_owner = std::collections::BTreeMap::new();
        for lease in &snapshot.leases {
            *per_owner.entry(lease.owner.clone()).or_insert(0) += 1;
        }
        let counts: Vec<i32> = per_owner.values().copied().collect();
        if snapshot.leases.len() == 4 && counts == [2, 2] && !per_owner.contains_key(&None) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "leases never split: {snapshot:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let ts = now_ms();
    let messages: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| {
            let payload = json!({"seq": 1, "ts": ts, "metrics": {"t": i}});
            (
                format!("dt/f/d{i}/telemetry"),
                payload.to_string().into_bytes(),
            )
        })
        .collect();
    publish_acked(&p1, "publisher", &messages).await;
    let (m1, m2) = (p1.processor_metrics.clone(), p2.processor_metrics.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while applied(&m1).0 + applied(&m2).0 < 40 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "readings never applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Shutting down drains every shard a process reads.
    p1.shutdown().await.unwrap();
    p2.shutdown().await.unwrap();
    let (one, two) = (applied(&m1), applied(&m2));

    // Each process applied its own shards' readings, and neither saw the
    // other's: no reading was read twice.
    assert!(one.0 > 0 && two.0 > 0, "{one:?} {two:?}");
    assert_eq!(one.0 + two.0, 40, "{one:?} {two:?}");
    assert_eq!((one.1, two.1), (0, 0), "a reading was read by both");
}
