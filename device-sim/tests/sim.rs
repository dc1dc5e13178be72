//! The simulator against a stand-in pipeline (`testkit::standin`): publish,
//! verify, and the fault paths, end to end over real sockets.

use std::time::Duration;

use device_sim::freshness::{FreshnessSample, Quantile};
use device_sim::plan::{FaultConfig, MINUTE_MS};
use device_sim::publish::codec::Protocol;
use device_sim::publish::transport::{ClientCert, TlsOptions};
use device_sim::scenario::Scenario;
use device_sim::{BrokerAddr, Rate, SimConfig, Stop};
use testkit::Pki;
use testkit::standin::Harness;

mod common;
use common::config;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_and_verifies_a_small_fleet() {
    let h = Harness::start().await;
    let s = device_sim::run(config(&h, "f1")).await.unwrap();
    assert!(s.ok(), "{s}");
    assert_eq!(
        (s.messages_sent, s.acked, s.failed, s.readings_sent),
        (200, 200, 0, 200)
    );
    assert_eq!(s.puback.unwrap().count, 200);
    let v = s.verify.as_ref().unwrap();
    assert!(v.caught_up);
    // 20 devices and the fleet, 2 metrics, 3 resolutions: at least one
    // window per series.
    assert_eq!(v.series, 21 * 2 * 3);
    assert!(v.windows >= v.series, "{v:?}");
    assert_eq!(h.pipeline.stats.lock().unwrap().accepted_readings, 200);
    let text = s.to_string();
    assert!(text.contains("verify: OK"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_each_wrong_window() {
    let h = Harness::start().await;
    h.pipeline.faults.lock().unwrap().corrupt_device = Some("f2-d00003".into());
    let cfg = SimConfig {
        verify_timeout: Duration::from_secs(1),
        ..config(&h, "f2")
    };
    let s = device_sim::run(cfg).await.unwrap();
    assert!(!s.ok());
    let v = s.verify.as_ref().unwrap();
    assert!(!v.ok);
    assert_eq!(v.mismatch_count, 2, "{v}");
    let count = &v.mismatches[0];
    assert_eq!(count.series, "device f2-d00003 humidity 1m");
    assert_eq!(count.field, "count");
    let want: u64 = count.expected.parse().unwrap();
    assert_eq!(count.got, (want + 1).to_string());
    let extra = &v.mismatches[1];
    assert_eq!(
        (extra.field.as_str(), extra.expected.as_str()),
        ("window", "no window")
    );
    assert!(
        s.to_string().contains("verify: FAILED (2 mismatches)"),
        "{s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_puback_is_retried_and_counted_once() {
    let h = Harness::start().await;
    h.pipeline
        .faults
        .lock()
        .unwrap()
        .drop_after
        .insert("f3-d00001".into(), 3);
    let s = device_sim::run(config(&h, "f3")).await.unwrap();
    assert!(s.ok(), "{s}");
    assert!(s.reconnects >= 1 && s.retransmissions >= 1, "{s}");
    assert_eq!(s.acked, 200);
    let stats = h.pipeline.stats.lock().unwrap();
    assert_eq!(stats.accepted_readings, 200);
    assert!(stats.duplicate_readings >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_continues_seqs_and_verifies_the_union() {
    let h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger.jsonl");
    let first = SimConfig {
        devices: 5,
        stop: Stop::Count(5),
        ledger: Some(ledger.clone()),
        ..config(&h, "f4")
    };
    let s1 = device_sim::run(first.clone()).await.unwrap();
    assert!(s1.ok(), "{s1}");
    // The second run has more devices and another seed.
    let second = SimConfig {
        devices: 7,
        seed: 99,
        ..first
    };
    let s2 = device_sim::run(second).await.unwrap();
    assert!(s2.ok(), "{s2}");
    assert_eq!(s2.run, 2);
    assert_eq!(s2.verify.as_ref().unwrap().devices, 7);
    assert_eq!(
        h.pipeline.accepted_seqs("f4-d00000"),
        (0..10).collect::<Vec<_>>()
    );
    let lines = std::fs::read_to_string(&ledger).unwrap();
    assert_eq!(lines.lines().count(), 4, "a start and a finish per run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_are_accounted_for() {
    let h = Harness::start().await;
    let cfg = SimConfig {
        devices: 10,
        stop: Stop::Count(30),
        faults: FaultConfig {
            duplicate_rate: 0.2,
            reorder_rate: 0.2,
            late_rate: 0.2,
            late_by_ms: 5 * MINUTE_MS,
            malformed_rate: 0.1,
        },
        ..config(&h, "f5")
    };
    let s = device_sim::run(cfg).await.unwrap();
    assert!(s.ok(), "{s}");
    assert!(s.duplicates_sent > 0 && s.malformed_sent > 0, "{s}");
    let v = s.verify.as_ref().unwrap();
    assert_eq!(v.stats.len(), 4);
    let malformed = s.stat("rejected.malformed_json").unwrap();
    assert_eq!(malformed.got, s.malformed_sent as i64);
    let stats = h.pipeline.stats.lock().unwrap();
    assert_eq!(stats.accepted_readings, 300);
    assert!(stats.duplicate_readings >= s.duplicates_sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_beyond_the_allowed_lateness_are_expected_rejected() {
    let h = Harness::start().await;
    let cfg = SimConfig {
        devices: 10,
        faults: FaultConfig {
            late_rate: 0.3,
            late_by_ms: 120 * MINUTE_MS,
            ..FaultConfig::default()
        },
        ..config(&h, "f6")
    };
    let s = device_sim::run(cfg).await.unwrap();
    assert!(s.ok(), "{s}");
    let too_late = s.stat("rejected.too_late").unwrap();
    assert!(too_late.expected_lo > 0 && too_late.ok(), "{too_late:?}");
    assert_eq!(
        h.pipeline.stats.lock().unwrap().accepted_readings as i64 + too_late.got,
        100
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos0_batches_verify_and_report_json() {
    let h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let cfg = SimConfig {
        devices: 10,
        qos: 0,
        readings_per_message: 4,
        report_json: Some(report.clone()),
        ..config(&h, "f7")
    };
    let s = device_sim::run(cfg).await.unwrap();
    assert!(s.ok(), "{s}");
    assert_eq!(s.readings_sent, 400);
    assert!(s.puback.is_none(), "QoS 0 has no PUBACKs");
    let j: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(j["readings_sent"], 400);
    assert_eq!(j["verify"]["ok"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_over_mutual_tls_with_a_certificate_per_device() {
    let pki = Pki::new().unwrap();
    let h = Harness::start_tls(&pki, true).await;
    let certs = tempfile::tempdir().unwrap();
    for i in 0..6 {
        pki.client_in(&format!("t1-d{i:05}"), certs.path()).unwrap();
    }
    let cfg = SimConfig {
        broker: BrokerAddr {
            host: "localhost".into(),
            port: h.mqtt.port(),
        },
        devices: 6,
        protocol: Protocol::V5,
        tls: Some(TlsOptions {
            ca: Some(pki.ca_cert.clone()),
            client_cert: ClientCert::PerDevice(certs.path().to_path_buf()),
            alpn: Vec::new(),
        }),
        ..config(&h, "t1")
    };
    let s = device_sim::run(cfg).await.unwrap();
    assert!(s.ok(), "{s}");
    assert_eq!((s.acked, s.protocol.as_str(), s.tls), (60, "5", true));
    assert_eq!(h.pipeline.protocols.lock().unwrap().get(&5), Some(&6));
    let with_certs = h
        .pipeline
        .client_certs
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(with_certs, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refuses_a_device_without_a_trusted_certificate() {
    let pki = Pki::new().unwrap();
    let h = Harness::start_tls(&pki, true).await;
    let other = Pki::new().unwrap();
    let stranger = other.client("stranger").unwrap();
    let base = SimConfig {
        broker: BrokerAddr {
            host: "localhost".into(),
            port: h.mqtt.port(),
        },
        devices: 3,
        stop: Stop::Count(2),
        connect_timeout: Some(Duration::from_secs(1)),
        ..config(&h, "t2")
    };
    // A certificate from another CA: the handshake fails, nobody connects.
    let cfg = SimConfig {
        tls: Some(TlsOptions {
            ca: Some(pki.ca_cert.clone()),
            client_cert: ClientCert::Shared {
                cert: stranger.cert,
                key: stranger.key,
            },
            alpn: Vec::new(),
        }),
        ..base.clone()
    };
    let err = device_sim::run(cfg).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("no device could connect"),
        "{err:#}"
    );
    // The right CA and one shared certificate: 3.1.1 over TLS works.
    let shared = pki.client("shared").unwrap();
    let cfg = SimConfig {
        tls: Some(TlsOptions {
            ca: Some(pki.ca_cert.clone()),
            client_cert: ClientCert::Shared {
                cert: shared.cert,
                key: shared.key,
            },
            alpn: Vec::new(),
        }),
        ..base
    };
    let s = device_sim::run(cfg).await.unwrap();
    assert!(s.ok(), "{s}");
    assert_eq!(h.pipeline.protocols.lock().unwrap().get(&4), Some(&3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_spread_over_source_addresses() {
    let h = Harness::start().await;
    let cfg = SimConfig {
        devices: 9,
        stop: Stop::Count(3),
        source_addrs: vec![
            "127.0.0.2".parse().unwrap(),
            "127.0.0.3".parse().unwrap(),
            "127.0.0.4".parse().unwrap(),
        ],
        ..config(&h, "s1")
    };
    let s = device_sim::run(cfg).await.unwrap();
    assert!(s.ok(), "{s}");
    let peers: Vec<String> = h
        .pipeline
        .peers
        .lock()
        .unwrap()
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert_eq!(peers, ["127.0.0.2", "127.0.0.3", "127.0.0.4"]);
}

/// Two fleets through every kind of stage; verify must account for the
/// storm's retransmissions and the backfill's late readings exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scenario_with_a_storm_and_a_backfill_verifies_exactly() {
    let h = Harness::start().await;
    let scenario: Scenario = toml::from_str(
        r#"
        [[fleets]]
        name = "sc-meters"
        devices = 16
        rate = 5.0
        signals = { humidity = "random-walk" }
        [[fleets]]
        name = "sc-trackers"
        devices = 6
        total_rate = 6.0
        metrics = ["speed"]
        readings_per_message = 3
        qos = 0
        [[stages]]
        type = "ramp"
        duration = "1500ms"
        [[stages]]
        type = "burst"
        duration = "1s"
        multiplier = 3
        [[stages]]
        type = "reconnect-storm"
        fraction = 0.5
        duration = "1500ms"
        [[stages]]
        type = "offline-then-backfill"
        fraction = 0.4
        duration = "3s"
        batch = 4
        [[stages]]
        type = "steady"
        duration = "1s"
        "#,
    )
    .unwrap();
    let cfg = SimConfig {
        scenario: Some(scenario),
        freshness_sample: FreshnessSample::Every(5),
        ..config(&h, "unused")
    };
    let s = device_sim::run(cfg).await.unwrap();
    println!("{s}");
    assert!(s.ok(), "{s}");
    assert_eq!(s.fleets.len(), 2);
    assert_eq!(s.devices, 22);
    // Half the fleet dropped at once, and those offline reconnected.
    assert!(s.reconnects >= 8, "{s}");
    let v = s.verify.as_ref().unwrap();
    assert!(v.caught_up && v.ok, "{v}");
    assert_eq!(v.devices, 22);
    let stats = h.pipeline.stats.lock().unwrap();
    assert_eq!(stats.accepted_readings, s.readings_sent);
    let f = s.freshness.as_ref().unwrap();
    assert!(f.visible > 0 && f.p50_ms.is_some(), "{f:?}");
    assert_eq!((f.dropped, f.missed), (0, 0), "{f:?}");
}

/// A broker that acknowledges one PUBLISH per 20 ms per connection allows
/// 50 msgs/s a device, whatever the schedule asks.
const SLOW_PUBACK: Duration = Duration::from_millis(20);

/// Four devices at 100 msgs/s each; the test makes the broker slow.
fn slow_broker_config(h: &Harness, fleet: &str) -> SimConfig {
    SimConfig {
        devices: 4,
        rate: Rate::PerDevice(100.0),
        verify: None,
        ..config(h, fleet)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_broker_shows_in_the_acknowledged_rate_and_the_verdict() {
    let h = Harness::start().await;
    *h.pipeline.puback_every.lock().unwrap() = Some(SLOW_PUBACK);
    let cfg = SimConfig {
        stop: Stop::Count(60),
        ..slow_broker_config(&h, "slow1")
    };
    let s = device_sim::run(cfg).await.unwrap();
    assert!(s.ok(), "{s}");
    assert_eq!(s.acked, 240);
    // Each device's 60 PUBACKs come 20 ms apart, so they take at least
    // 1.18 s: about 200 msgs/s for the fleet, against 400 planned.
    let min_span = SLOW_PUBACK * 59;
    assert!((s.target_msgs_per_sec - 400.0).abs() < 1.0, "{s}");
    assert!(s.rate_span_ms >= min_span.as_secs_f64() * 1000.0, "{s}");
    assert!(
        s.achieved_msgs_per_sec <= 240.0 / min_span.as_secs_f64() * 1.001,
        "{s}"
    );
    // What the broker itself saw: from the first PUBLISH it received to
    // the last PUBACK it sent.
    let first = h.pipeline.first_publish.lock().unwrap().unwrap();
    let last = h.pipeline.last_puback.lock().unwrap().unwrap();
    let broker_rate = 240.0 / (last - first).as_secs_f64();
    assert!(
        (s.achieved_msgs_per_sec / broker_rate - 1.0).abs() < 0.05,
        "broker saw {broker_rate:.1} msgs/s: {s}"
    );
    assert!(s.achieved_msgs_per_sec < 0.6 * s.target_msgs_per_sec, "{s}");
    // Every publish went out on time: the broker alone fell behind.
    assert!(s.schedule_lag.unwrap().p99_ms < 1000.0, "{s}");
    assert!(
        s.verdict
            .starts_with("did not keep the schedule: publish lag p99"),
        "{s}"
    );
    assert!(s.verdict.contains("the broker is not keeping up"), "{s}");
    assert!(
        s.to_string().contains(" msgs/s acknowledged over 1."),
        "{s}"
    );
    assert!(
        s.to_string()
            .contains("(first publish to last PUBACK), target 400.0"),
        "{s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_held_back_by_a_full_window_count_as_schedule_lag() {
    let h = Harness::start().await;
    *h.pipeline.puback_every.lock().unwrap() = Some(SLOW_PUBACK);
    // Two in flight: each publish waits for the PUBACK two before it, so
    // the 150th goes out about 1.5 s behind its due time.
    let cfg = SimConfig {
        stop: Stop::Count(150),
        max_inflight: 2,
        ..slow_broker_config(&h, "slow2")
    };
    let s = device_sim::run(cfg).await.unwrap();
    assert!(s.ok(), "{s}");
    let lag = s.schedule_lag.unwrap();
    assert_eq!(lag.count, 600);
    assert!(lag.p99_ms > 1000.0 && lag.max_ms > 1300.0, "{s}");
    assert!(s.behind_schedule > 0, "{s}");
    assert!(lag.p50_ms < lag.p99_ms, "{s}");
    assert!(s.window_waits > 0, "{s}");
    assert!(
        s.verdict
            .starts_with("did not keep the schedule: publish lag p99 1."),
        "{s}"
    );
    assert!(s.verdict.contains("the broker is not keeping up"), "{s}");
    assert!(!s.verdict.contains("the simulator fell behind"), "{s}");
    let j = serde_json::to_value(&s).unwrap();
    assert!(j["schedule_lag"]["p99_ms"].as_f64().unwrap() > 1000.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freshness_counts_samples_the_api_never_shows_as_misses() {
    let h = Harness::start().await;
    h.pipeline
        .hidden_devices
        .lock()
        .unwrap()
        .extend(["fr1-d00003".to_string(), "fr1-d00007".to_string()]);
    let cfg = SimConfig {
        devices: 10,
        freshness_sample: FreshnessSample::Every(1),
        verify_timeout: Duration::from_secs(2),
        ..config(&h, "fr1")
    };
    let s = device_sim::run(cfg).await.unwrap();
    assert!(s.ok(), "{s}");
    let f = s.freshness.as_ref().unwrap();
    // Every publish sampled; the two hidden devices' 20 never seen.
    assert_eq!(
        (f.samples, f.visible, f.missed, f.timed_out, f.dropped),
        (100, 80, 20, 20, 0),
        "{f:?}"
    );
    assert!(matches!(f.p50_ms, Some(Quantile::Ms(_))), "{f:?}");
    assert_eq!(f.p99_ms, Some(Quantile::Missed));
    let text = s.to_string();
    assert!(text.contains("p99 missed"), "{text}");
    assert!(
        text.contains("20 missed: 0 dropped, 20 not visible"),
        "{text}"
    );
    let j = serde_json::to_value(&s).unwrap();
    assert_eq!(j["freshness"]["p99_ms"], "missed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freshness_polls_a_sample_only_once_its_puback_has_come() {
    let h = Harness::start().await;
    // The stand-in shows a reading the moment it arrives but acknowledges
    // one PUBLISH per 20 ms: PUBACKs fall further behind with each send.
    *h.pipeline.puback_every.lock().unwrap() = Some(SLOW_PUBACK);
    let cfg = SimConfig {
        stop: Stop::Count(40),
        freshness_sample: FreshnessSample::Every(1),
        verify: config(&h, "fr3").verify,
        ..slow_broker_config(&h, "fr3")
    };
    let s = device_sim::run(cfg).await.unwrap();
    assert!(s.ok(), "{s}");
    let f = s.freshness.as_ref().unwrap();
    let puback = s.puback.as_ref().unwrap();
    assert_eq!((f.samples, f.missed), (160, 0), "{f:?}");
    // Polled from the write, every sample would show within a poll; polled
    // from its PUBACK, none can show sooner than its PUBACK came (the
    // histogram rounds to three digits, hence the margin).
    let ms = |q: Option<Quantile>| q.and_then(Quantile::ms).unwrap();
    assert!(puback.p50_ms > 100.0, "{s}");
    assert!(ms(f.p50_ms) >= puback.p50_ms * 0.99, "{f:?} {puback:?}");
    assert!(ms(f.max_ms) >= puback.max_ms * 0.99, "{f:?} {puback:?}");
    assert!(f.poll_late_p99_ms.is_some(), "{f:?}");
    assert!(s.to_string().contains("ms late"), "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freshness_samples_every_nth_publish_when_messages_share_a_millisecond() {
    let h = Harness::start().await;
    // 4 messages per device per millisecond: only the first of each
    // millisecond can be told apart by the latest ts, so a sample's turn
    // passes to it rather than being lost.
    let cfg = SimConfig {
        devices: 2,
        rate: Rate::PerDevice(4000.0),
        stop: Stop::Count(400),
        freshness_sample: FreshnessSample::Every(20),
        ..config(&h, "fr2")
    };
    let s = device_sim::run(cfg).await.unwrap();
    assert!(s.ok(), "{s}");
    let f = s.freshness.as_ref().unwrap();
    assert!(f.samples >= 38 && f.samples <= 40, "{f:?}");
    assert_eq!(f.missed, 0, "{f:?}");
}

/// 20 devices, 3 messages each at 2 a second: their schedules are spread
/// over the 500 ms period, so the first device is done well before the last.
fn spread_config(h: &Harness, fleet: &str) -> SimConfig {
    SimConfig {
        rate: Rate::PerDevice(2.0),
        stop: Stop::Count(3),
        verify: None,
        ..config(h, fleet)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_connections_disconnect_only_after_the_fleets_last_publish() {
    // Without holding, the first device to finish leaves while others still
    // publish: the control that shows the broker's clocks can tell.
    let h = Harness::start().await;
    let s = device_sim::run(spread_config(&h, "leave1")).await.unwrap();
    assert!(s.ok(), "{s}");
    let last = h.pipeline.last_publish.lock().unwrap().unwrap();
    let first_bye = h.pipeline.first_of_disconnects(20).await;
    assert!(first_bye < last, "nobody left before the last PUBLISH: {s}");

    let h = Harness::start().await;
    let cfg = SimConfig {
        hold_connections: true,
        ..spread_config(&h, "hold1")
    };
    let s = device_sim::run(cfg).await.unwrap();
    assert!(s.ok(), "{s}");
    assert_eq!(s.acked, 60);
    let last = h.pipeline.last_publish.lock().unwrap().unwrap();
    // Every device says DISCONNECT in the end.
    let first_bye = h.pipeline.first_of_disconnects(20).await;
    assert!(
        first_bye > last,
        "a device left before the last PUBLISH: {s}"
    );
}
