//! The whole pipeline in-process on port 0: real MQTT in, rollups out.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{get, publish_acked, start, wait_for};
use testkit::now_ms;

fn reading(seq: u64, ts: i64, t: f64) -> Vec<u8> {
    serde_json::to_vec(&json!({"seq": seq, "ts": ts, "metrics": {"temperature": t}})).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_counted_kept_and_the_pipeline_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path()).await;
    let now = now_ms();
    let topic = "dt/plant/dev-1/telemetry".to_string();
    let oversized = format!(
        r#"{{"ts": {now}, "metrics": {{"t": 1}}, "pad": "{}"}}"#,
        "x".repeat(128 * 1024)
    );
    let messages = vec![
        (topic.clone(), b"{\"ts\": 1, \"metrics\": {".to_vec()),
        (
            topic.clone(),
            format!(r#"{{"ts": {now}, "metrics": {{"t": "warm"}}}}"#).into_bytes(),
        ),
        (
            topic.clone(),
            format!(r#"{{"ts": {now}, "metrics": {{"t": NaN}}}}"#).into_bytes(),
        ),
        (topic.clone(), oversized.into_bytes()),
        ("dt/plant/dev-1/status".to_string(), reading(1, now, 1.0)),
        (topic.clone(), reading(1, now, 21.5)),
    ];
    publish_acked(&p, "dev-1", &messages).await;
    let stats = wait_for(&p, "/v1/stats", Duration::from_secs(20), |b| {
        b["accepted_readings"] == 1 && b["rejected"]["bad_topic"] == 1
    })
    .await;
    for reason in [
        "malformed_json",
        "schema",
        "not_finite",
        "too_large",
        "bad_topic",
    ] {
        assert_eq!(stats["rejected"][reason], 1, "{reason}: {stats}");
        let (status, body) = get(&p, &format!("/v1/dead-letters?reason={reason}")).await;
        assert_eq!(status, 200);
        let letters = body["dead_letters"].as_array().unwrap();
        assert_eq!(letters.len(), 1, "{reason}: {body}");
        assert!(!letters[0]["detail"].as_str().unwrap().is_empty());
    }
    let (_, body) = get(&p, "/v1/devices/dev-1").await;
    assert_eq!(body["metrics"]["temperature"]["value"], 21.5);
    let metrics = support::metrics_text(&p).await;
    assert!(
        metrics.contains("iotpipe_mqtt_messages_refused_total{reason=\"not_finite\"} 1"),
        "{metrics}"
    );
    p.shutdown().await.unwrap();
}

fn windows_of(body: &Value) -> Vec<(i64, u64, f64)> {
    body["windows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["start"].as_i64().unwrap(),
                w["count"].as_u64().unwrap(),
                w["sum"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_every_rollup_and_continues() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = now_ms() - 5_000;
    let topic = "dt/plant/dev-1/telemetry".to_string();
    let first: Vec<_> = (0..50)
        .map(|i| (topic.clone(), reading(i, t0 + i as i64, 1.0)))
        .collect();
    let query = format!(
        "/v1/devices/dev-1/metrics/temperature?res=1h&from={}&to={}",
        t0 - 3_600_000,
        t0 + 3_600_000
    );

    let p = start(dir.path()).await;
    publish_acked(&p, "dev-1", &first).await;
    let before = wait_for(&p, &query, Duration::from_secs(20), |b| {
        b["windows"]
            .as_array()
            .is_some_and(|w| w.iter().map(|w| w["count"].as_u64().unwrap()).sum::<u64>() == 50)
    })
    .await;
    p.shutdown().await.unwrap();

    let p = start(dir.path()).await;
    let (_, after) = get(&p, &query).await;
    assert_eq!(
        windows_of(&after),
        windows_of(&before),
        "a restart changed the rollups"
    );
    // The same readings again (a device resending after the restart) and new ones.
    let second: Vec<_> = (25..100)
        .map(|i| (topic.clone(), reading(i, t0 + i as i64, 1.0)))
        .collect();
    publish_acked(&p, "dev-1", &second).await;
    let body = wait_for(&p, "/v1/stats", Duration::from_secs(20), |b| {
        b["accepted_readings"] == 100
    })
    .await;
    assert_eq!(body["duplicate_readings"], 25);
    let (_, after) = get(&p, &query).await;
    let total: u64 = windows_of(&after).iter().map(|w| w.1).sum();
    assert_eq!(total, 100);
    p.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_too_late_dead_letter_keeps_the_raw_payload_and_client_id() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path()).await;
    // Two hours old: its minute window was final an hour ago. The spacing and
    // key order are the device's own, which a re-serialised reading would lose.
    let ts = now_ms() - 2 * 3_600_000;
    let raw = format!(r#"{{ "metrics": {{"temperature": 21.50}},  "ts": {ts}, "seq": 4 }}"#);
    let topic = "dt/plant/dev-9/telemetry".to_string();
    publish_acked(&p, "late-client-1", &[(topic, raw.clone().into_bytes())]).await;
    wait_for(&p, "/v1/stats", Duration::from_secs(20), |b| {
        b["rejected"]["too_late"] == 1
    })
    .await;
    let (status, body) = get(&p, "/v1/dead-letters?reason=too_late").await;
    assert_eq!(status, 200);
    let letter = &body["dead_letters"][0];
    assert_eq!(letter["client_id"], "late-client-1", "{body}");
    assert_eq!(letter["payload"], raw.as_str(), "{body}");
    assert_eq!(letter["payload_bytes"], raw.len(), "{body}");
    assert_eq!(letter["device_id"], "dev-9", "{body}");
    p.shutdown().await.unwrap();
}
