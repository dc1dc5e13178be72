//! Alerts end to end: readings over MQTT, rules evaluated on the stored
//! windows, and a webhook receiver in the test that checks every
//! notification's signature and counts each alert id.
//!
//! The same alerts reach an MQTT client watching `iotpipe/alerts/#` on the
//! endpoint's live tap, once each.
//!
//! One-second windows keep the runs short: the readings are stamped in
//! seconds that have not begun when they are published, so they are on time
//! whatever the scheduling, and the late ones are published only once the
//! API shows their window judged at revision 0.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use iotpipe::{Config, Pipeline};
use serde_json::{Value, json};
use support::webhook::{Hook, SECRET, receiver, signature_is_valid, start_with_hook};
use support::{publish_acked, publish_acked_to, wait_for};
use testkit::up::RoleProcess;
use tokio::sync::mpsc;

const FLEET: &str = "hot-f";
const SEC: i64 = 1000;

/// The config file: one-second windows (and minutes above them), a minute
/// of lateness, the rule `hot` (a fleet second whose average is above 30)
/// and a webhook at `url`; short leases for role processes.
fn settings(url: &str) -> String {
    format!(
        r#"
        [aggregate]
        resolutions = ["1s", "1m"]
        retention = "1s=1d,1m=1d"
        allowed_lateness = "60s"
        watermark_slack = "200ms"
        [backend]
        lease_duration = "4s"
        [alerts]
        evaluate_every = "100ms"
        [[alerts.rules]]
        name = "hot"
        fleet = "{FLEET}"
        metric = "temp"
        resolution = "1s"
        aggregate = "avg"
        comparison = ">"
        threshold = 30.0
        [alerts.webhook]
        url = "{url}"
        secret = "{SECRET}"
        retry_initial = "100ms"
        retry_max = "1s"
        "#
    )
}

/// [`settings`] for `iotpipe up` in `dir`.
fn config(dir: &std::path::Path, url: &str) -> Config {
    let file: Config = toml::from_str(&settings(url)).unwrap();
    Config {
        aggregate: file.aggregate,
        alerts: file.alerts,
        ..support::config(dir)
    }
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

/// Publishes one reading by `device` hot enough to fire `hot` on its own,
/// in a second ahead; returns that second's start.
async fn publish_one_hot(p: &Pipeline, device: &str) -> i64 {
    let b = seconds_ahead();
    publish_acked(p, device, &[reading(device, 1, b + 100, 70.0)]).await;
    b
}

/// [`publish_one_hot`], then waits until `GET /v1/alerts` lists its alert,
/// the only one, as delivered; returns the second's start.
async fn one_alert_delivered(p: &Pipeline, device: &str) -> i64 {
    let b = publish_one_hot(p, device).await;
    let body = wait_for(p, "/v1/alerts", Duration::from_secs(60), |body| {
        !listed(body).is_empty() && all_delivered(body)
    })
    .await;
    assert_eq!(listed(&body), BTreeSet::from([(b, 0)]), "{body}");
    b
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

/// An MQTT client watching every alert on the pipeline's live tap; the
/// subscription is acknowledged when this returns. Each message arrives on
/// the receiver as (topic, body); the receiver ends when the connection does.
async fn watch_alerts(addr: SocketAddr) -> mpsc::UnboundedReceiver<(String, Value)> {
    let opts = rumqttc::MqttOptions::new("alert-watcher", addr.ip().to_string(), addr.port());
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 10);
    client
        .subscribe("iotpipe/alerts/#", rumqttc::QoS::AtMostOnce)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let event = tokio::time::timeout_at(deadline, events.poll()).await;
        if let rumqttc::Event::Incoming(rumqttc::Packet::SubAck(ack)) = event.unwrap().unwrap() {
            assert!(
                matches!(
                    ack.return_codes[..],
                    [rumqttc::SubscribeReasonCode::Success(_)]
                ),
                "{ack:?}"
            );
            break;
        }
    }
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        // Holds the client, so that the connection lives as long as this.
        let _client = client;
        while let Ok(event) = events.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(m)) = event {
                let body = serde_json::from_slice(&m.payload).unwrap();
                if tx.send((m.topic.clone(), body)).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// The tap carried each of `expected` once, on `iotpipe/alerts/hot`, with
/// the body the webhook received for it.
fn tapped_once_each_as_posted(
    on_tap: &[(String, Value)],
    expected: &BTreeSet<String>,
    posted: &[support::webhook::Seen],
) {
    let id = |a: &Value| format!("hot/{}/{}", a["window_start"], a["revision"]);
    let ids: Vec<String> = on_tap.iter().map(|(_, a)| id(a)).collect();
    assert_eq!(ids.len(), expected.len(), "each alert once: {on_tap:#?}");
    assert_eq!(&ids.iter().cloned().collect::<BTreeSet<_>>(), expected);
    for (topic, body) in on_tap {
        assert_eq!(topic, "iotpipe/alerts/hot");
        let webhook = posted.iter().find(|s| s.id == id(body)).unwrap();
        assert_eq!(body, &webhook.body, "the tap and the webhook say the same");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_fire_exactly_for_the_crossing_windows_and_arrive_once_signed() {
    let (_dir, p, hook) = start_with_hook(Hook::Http { fail_first: 0 }, config).await;
    let mut tap = watch_alerts(p.mqtt_addr).await;
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

    // The tap got each alert as it fired, with the webhook's body, and
    // nothing more until the pipeline closed the connection.
    let mut on_tap = Vec::new();
    while on_tap.len() < 4 {
        let m = tokio::time::timeout(within, tap.recv()).await.unwrap();
        on_tap.push(m.expect("the tap connection lives until shutdown"));
    }
    p.shutdown().await.unwrap();
    while let Some(m) = tap.recv().await {
        on_tap.push(m);
    }
    tapped_once_each_as_posted(&on_tap, &expected_ids, &seen);
}

/// `iotpipe ingest` apart from two `iotpipe process` instances, on NATS
/// and PostgreSQL: the holder of the alerts lease alone delivers each
/// alert, and a watcher on the ingest process's tap gets each once, read
/// from the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apart_from_ingest_one_of_two_processes_delivers_and_the_tap_relays_each_alert_once() {
    let nats = testkit::nats::NatsServer::start().unwrap();
    let db = testkit::postgres::database().await.unwrap();
    let (url, hook) = receiver(0).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("iotpipe.toml");
    std::fs::write(&file, settings(&url)).unwrap();
    let (stream_name, db_url) = (testkit::unique_name("alerts"), db.url());
    let args = [
        "--config",
        file.to_str().unwrap(),
        "--stream",
        "nats",
        "--nats-url",
        nats.url(),
        "--store",
        "postgres",
        "--postgres-url",
        &db_url,
        "--stream-name",
        &stream_name,
        "--shards",
        "2",
        "--mqtt-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ];
    let bin: &std::path::Path = env!("CARGO_BIN_EXE_iotpipe").as_ref();
    let start = |role: &str, name: &str| {
        RoleProcess::spawn(bin, role, &dir.path().join(name), &args).unwrap()
    };
    let ingest = start("ingest", "ingest");
    let processes = [start("process", "p1"), start("process", "p2")];
    let mqtt = ingest.mqtt.unwrap();
    let mut tap = watch_alerts(mqtt).await;

    let b = seconds_ahead();
    let w = |i: i64| b + i * SEC;
    let readings = [
        reading("dev-a", 1, w(0) + 100, 20.0),
        reading("dev-a", 2, w(1) + 100, 40.0),
        reading("dev-a", 3, w(2) + 100, 25.0),
        reading("dev-a", 4, w(3) + 100, 50.0),
    ];
    publish_acked_to(mqtt, "dev-a", &readings).await;
    let expected: BTreeSet<String> = [w(1), w(3)]
        .iter()
        .map(|start| format!("hot/{start}/0"))
        .collect();
    let ids = |seen: &[support::webhook::Seen]| -> BTreeSet<String> {
        seen.iter().map(|s| s.id.clone()).collect()
    };
    testkit::eventually("both alerts delivered", Duration::from_secs(60), || {
        ids(&hook.seen()) == expected
    })
    .await
    .unwrap();

    let mut on_tap = Vec::new();
    while on_tap.len() < 2 {
        let m = tokio::time::timeout(Duration::from_secs(60), tap.recv()).await;
        on_tap.push(
            m.unwrap()
                .expect("the tap connection lives until ingest stops"),
        );
    }
    // Whatever else either process would send has been sent by the time
    // they stop.
    for p in processes {
        assert!(
            p.terminate().unwrap(),
            "iotpipe process did not stop cleanly"
        );
    }
    assert!(
        ingest.terminate().unwrap(),
        "iotpipe ingest did not stop cleanly"
    );
    while let Some(m) = tap.recv().await {
        on_tap.push(m);
    }
    let seen = hook.seen();
    assert_eq!(
        seen.len(),
        2,
        "each alert once, from one process: {seen:#?}"
    );
    tapped_once_each_as_posted(&on_tap, &expected, &seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_answered_500_is_sent_again_and_listed_once() {
    let (_dir, p, hook) = start_with_hook(Hook::Http { fail_first: 1 }, config).await;
    let b = one_alert_delivered(&p, "dev-b").await;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_webhook_behind_a_private_ca_gets_each_alert_once_signed() {
    let pki = testkit::Pki::new().unwrap();
    let trusting_the_ca = |dir: &std::path::Path, url: &str| {
        let mut config = config(dir, url);
        config.alerts.webhook.as_mut().unwrap().ca_file = Some(pki.ca_cert.clone());
        config
    };
    let (_dir, p, hook) = start_with_hook(Hook::Https(&pki), trusting_the_ca).await;
    let b = one_alert_delivered(&p, "dev-s").await;
    let seen: Vec<(String, u16, bool)> = hook
        .seen()
        .iter()
        .map(|s| (s.id.clone(), s.status, s.signed))
        .collect();
    assert_eq!(seen, [(format!("hot/{b}/0"), 200, true)]);
    p.shutdown().await.unwrap();
}

/// Without the private CA, the receiver's certificate is refused: nothing
/// reaches it, each attempt counts as a failure, and the alert stays
/// listed as not delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_webhook_whose_certificate_is_not_trusted_gets_nothing() {
    let pki = testkit::Pki::new().unwrap();
    let (_dir, p, hook) = start_with_hook(Hook::Https(&pki), config).await;
    let b = publish_one_hot(&p, "dev-u").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while metric(&p, "iotpipe_alert_delivery_failures_total").await < 2.0 {
        assert!(tokio::time::Instant::now() < deadline, "no failed delivery");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, body) = support::get(&p, "/v1/alerts").await;
    assert_eq!(listed(&body), BTreeSet::from([(b, 0)]), "{body}");
    assert!(!all_delivered(&body), "{body}");
    assert!(hook.seen().is_empty(), "{:#?}", hook.seen());
    assert_eq!(metric(&p, "iotpipe_alert_deliveries_total").await, 0.0);
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
