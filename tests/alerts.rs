//! Alerts end to end: readings over MQTT, rules evaluated on the stored
//! windows, and a webhook receiver in the test that checks every
//! notification's signature and counts each alert id.
//!
//! One-second windows keep the runs short: the readings are stamped in
//! seconds that have not begun when they are published, so they are on time
//! whatever the scheduling, and the late ones are published only once the
//! API shows their window judged at revision 0.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use iotpipe::config::{AlertsConfig, RetentionSetting};
use iotpipe::{Config, Pipeline};
use serde_json::{Value, json};
use support::webhook::{SECRET, receiver, signature_is_valid};
use support::{publish_acked, wait_for};

const FLEET: &str = "hot-f";
const SEC: i64 = 1000;

/// One-second windows (and minutes above them), a minute of lateness, and
/// the rule `hot`: a fleet second whose average is above 30.
fn config(dir: &std::path::Path, url: &str) -> Config {
    let mut c = support::config(dir);
    c.aggregate.resolutions = vec!["1s".into(), "1m".into()];
    c.aggregate.retention = RetentionSetting::Named("1s=1d,1m=1d".into());
    c.aggregate.allowed_lateness = Duration::from_secs(60);
    c.aggregate.watermark_slack = Duration::from_millis(200);
    c.alerts = toml::from_str::<AlertsConfig>(&format!(
        r#"
        evaluate_every = "100ms"
        [[rules]]
        name = "hot"
        fleet = "{FLEET}"
        metric = "temp"
        resolution = "1s"
        aggregate = "avg"
        comparison = ">"
        threshold = 30.0
        [webhook]
        url = "{url}"
        secret = "{SECRET}"
        retry_initial = "100ms"
        retry_max = "1s"
        "#
    ))
    .unwrap();
    c
}

/// The start of a second far enough ahead that readings stamped in it and
/// the next few are published before it begins.
fn seconds_ahead() -> i64 {
    (testkit::now_ms() / SEC + 3) * SEC
}

/// A reading of `temp` by device `d` in fleet `FLEET`.
fn reading(device: &str, seq: u64, ts: i64, temp: f64) -> (String, Vec<u8>) {
    (
        format!("dt/{FLEET}/{device}/telemetry"),
        json!({"seq": seq, "ts": ts, "metrics": {"temp": temp}})
            .to_string()
            .into_bytes(),
    )
}

/// (window start, revision) of every alert `GET /v1/alerts` lists.
fn listed(body: &Value) -> BTreeSet<(i64, u64)> {
    body["alerts"]
        .as_array()
        .map(|alerts| {
            alerts
                .iter()
                .map(|a| {
                    (
                        a["window_start"].as_i64().unwrap(),
                        a["revision"].as_u64().unwrap(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn all_delivered(body: &Value) -> bool {
    body["alerts"]
        .as_array()
        .is_some_and(|a| a.iter().all(|a| a["delivered"] == true))
}

async fn metric(p: &Pipeline, name: &str) -> f64 {
    support::metrics_text(p)
        .await
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_fire_exactly_for_the_crossing_windows_and_arrive_once_signed() {
    let dir = tempfile::tempdir().unwrap();
    let (url, hook) = receiver(0).await;
    let p = iotpipe::start(&config(dir.path(), &url)).await.unwrap();
    let b = seconds_ahead();
    let w = |i: i64| b + i * SEC;

    // On time, averages 20, 40, 25 and 50: seconds 1 and 3 cross.
    publish_acked(
        &p,
        "dev-a",
        &[
            reading("dev-a", 1, w(0) + 100, 20.0),
            reading("dev-a", 2, w(1) + 100, 40.0),
            reading("dev-a", 3, w(2) + 100, 25.0),
            reading("dev-a", 4, w(3) + 100, 50.0),
        ],
    )
    .await;
    let within = Duration::from_secs(60);
    wait_for(&p, "/v1/alerts?rule=hot", within, |body| {
        listed(body) == BTreeSet::from([(w(1), 0), (w(3), 0)])
    })
    .await;

    // Second 3 was judged at revision 0, and second 2 before it in the same
    // pass. One late reading each: second 2 crosses only at revision 1
    // (35), second 3 at both (55).
    publish_acked(
        &p,
        "dev-a",
        &[
            reading("dev-a", 5, w(2) + 500, 45.0),
            reading("dev-a", 6, w(3) + 500, 60.0),
        ],
    )
    .await;
    let expected = BTreeSet::from([(w(1), 0), (w(3), 0), (w(2), 1), (w(3), 1)]);
    let body = wait_for(&p, "/v1/alerts?rule=hot", within, |body| {
        listed(body) == expected && all_delivered(body)
    })
    .await;
    assert_eq!(body["alerts"].as_array().unwrap().len(), 4, "{body}");

    let seen = hook.seen();
    let ids: BTreeSet<String> = seen.iter().map(|s| s.id.clone()).collect();
    let expected_ids: BTreeSet<String> = expected
        .iter()
        .map(|(start, rev)| format!("hot/{start}/{rev}"))
        .collect();
    assert_eq!(ids, expected_ids, "{seen:#?}");
    assert_eq!(seen.len(), 4, "each alert exactly once: {seen:#?}");
    assert!(
        seen.iter().all(|s| s.signed && s.status == 200),
        "{seen:#?}"
    );
    let revised = seen
        .iter()
        .find(|s| s.id == format!("hot/{}/1", w(2)))
        .unwrap();
    assert_eq!(revised.body["value"], 35.0);
    assert_eq!(revised.body["late_count"], 1);
    assert_eq!(revised.body["window_end"], w(3));
    assert_eq!(revised.body["fleet"], FLEET);
    assert_eq!(metric(&p, "iotpipe_alert_firings_total").await, 4.0);
    assert_eq!(metric(&p, "iotpipe_alert_deliveries_total").await, 4.0);
    p.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_answered_500_is_sent_again_and_listed_once() {
    let dir = tempfile::tempdir().unwrap();
    let (url, hook) = receiver(1).await;
    let p = iotpipe::start(&config(dir.path(), &url)).await.unwrap();
    let b = seconds_ahead();
    publish_acked(&p, "dev-b", &[reading("dev-b", 1, b + 100, 70.0)]).await;
    let body = wait_for(&p, "/v1/alerts", Duration::from_secs(60), |body| {
        !listed(body).is_empty() && all_delivered(body)
    })
    .await;
    assert_eq!(listed(&body), BTreeSet::from([(b, 0)]), "{body}");

    let seen = hook.seen();
    let id = format!("hot/{b}/0");
    let statuses: Vec<(String, u16)> = seen.iter().map(|s| (s.id.clone(), s.status)).collect();
    assert_eq!(statuses, [(id.clone(), 500), (id, 200)], "{seen:#?}");
    assert!(seen.iter().all(|s| s.signed));
    assert_eq!(
        metric(&p, "iotpipe_alert_delivery_failures_total").await,
        1.0
    );
    assert_eq!(
        metric(&p, "iotpipe_alert_delivery_retries_total").await,
        1.0
    );
    assert_eq!(metric(&p, "iotpipe_alert_deliveries_total").await, 1.0);
    p.shutdown().await.unwrap();
}

#[test]
fn the_receivers_check_refuses_another_secrets_signature() {
    let body = br#"{"rule":"hot","value":35.0}"#;
    let sign = processors::alerts::webhook::sign;
    let good = sign(SECRET.as_bytes(), body);
    assert!(signature_is_valid(SECRET.as_bytes(), body, Some(&good)));
    let wrong = sign(b"another secret", body);
    assert!(!signature_is_valid(SECRET.as_bytes(), body, Some(&wrong)));
    let tampered = br#"{"rule":"hot","value":36.0}"#;
    assert!(!signature_is_valid(
        SECRET.as_bytes(),
        tampered,
        Some(&good)
    ));
    assert!(!signature_is_valid(SECRET.as_bytes(), body, None));
    assert!(!signature_is_valid(
        SECRET.as_bytes(),
        body,
        Some("sha256=zz")
    ));
}
