//! The simulator's tools for soaks and real data, against the stand-in
//! pipeline (`testkit::standin`): its Prometheus endpoint scraped while a
//! run goes on, and a recorded file replayed and verified.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use device_sim::exporter::{self, Live};
use device_sim::replay::{ReplayConfig, Speed, TimeMode};
use device_sim::{SimConfig, Stop};
use testkit::standin::Harness;
use tokio::net::TcpListener;
use tokio::time::Instant;

mod common;
use common::config;

/// One sample's value in Prometheus text, by its full name and labels.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

async fn scrape(url: &str) -> String {
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_scraped_during_a_run_and_agree_with_its_summary() {
    let h = Harness::start().await;
    let live = Live::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/metrics", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(exporter::serve(listener, live.clone(), async move {
        let _ = stopped.await;
    }));
    // 20 devices × 10 msgs/s for 3 s.
    let cfg = SimConfig {
        stop: Stop::Count(30),
        live: Some(live),
        ..config(&h, "m1")
    };
    // Scrape until something is published while the run still publishes.
    let scraper = async {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut poll = tokio::time::interval(Duration::from_millis(20));
        loop {
            poll.tick().await;
            let text = scrape(&url).await;
            let published = sample(&text, "device_sim_messages_published_total").unwrap();
            let phase = |p: &str| sample(&text, &format!("device_sim_phase{{phase=\"{p}\"}}"));
            if published > 0.0 && phase("publishing") == Some(1.0) {
                return text;
            }
            assert_eq!(phase("done"), Some(0.0), "the run ended unseen:\n{text}");
            assert!(
                Instant::now() < deadline,
                "nothing published in time:\n{text}"
            );
        }
    };
    let (s, during) = tokio::join!(device_sim::run(cfg), scraper);
    assert_eq!(sample(&during, "device_sim_devices"), Some(20.0));
    assert_eq!(sample(&during, "device_sim_messages_planned"), Some(600.0));
    assert!(
        sample(&during, "device_sim_messages_published_total").unwrap() < 600.0,
        "{during}"
    );

    let s = s.unwrap();
    assert!(s.ok(), "{s}");
    let after = scrape(&url).await;
    for (name, want) in [
        ("device_sim_messages_published_total", s.messages_sent),
        ("device_sim_messages_acknowledged_total", s.acked),
        ("device_sim_messages_failed_total", s.failed),
        ("device_sim_messages_refused_total", s.refused),
        ("device_sim_reconnects_total", s.reconnects),
        ("device_sim_messages_retransmitted_total", s.retransmissions),
        ("device_sim_devices_connected", u64::from(s.devices)),
        (
            "device_sim_puback_latency_seconds_count",
            s.puback.unwrap().count,
        ),
        ("device_sim_verify_ok", 1),
    ] {
        assert_eq!(sample(&after, name), Some(want as f64), "{name}:\n{after}");
    }
    assert_eq!(s.messages_sent, 600);
    assert_eq!(
        sample(&after, "device_sim_phase{phase=\"done\"}"),
        Some(1.0),
        "{after}"
    );
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

/// 4 devices, 301 rows of temperature and humidity over 3 s, rows out of
/// order across devices, and one row of meter-c recorded 2 minutes before
/// its neighbours.
fn recorded() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/replay.csv")
}

fn replay(h: &Harness, fleet: &str, file: std::path::PathBuf, speed: Speed) -> SimConfig {
    SimConfig {
        replay: Some(ReplayConfig {
            file,
            speed,
            time: TimeMode::Shift,
        }),
        stop: Stop::Count(u64::MAX),
        ..config(h, fleet)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_file_replays_and_verifies_exactly() {
    let h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger.jsonl");
    let first = SimConfig {
        ledger: Some(ledger.clone()),
        ..replay(&h, "rp1", recorded(), Speed::Factor(1.0))
    };
    let s = device_sim::run(first.clone()).await.unwrap();
    assert!(s.ok(), "{s}");
    assert_eq!((s.devices, s.readings_sent, s.acked), (4, 301, 301), "{s}");
    // The recorded pace: 3 s of rows take about 3 s.
    assert!(s.rate_span_ms > 2500.0, "{s}");
    let v = s.verify.as_ref().unwrap();
    assert_eq!(v.devices, 4);
    // 4 devices and the fleet, 2 metrics, 3 resolutions.
    assert_eq!(v.series, 5 * 2 * 3, "{v}");
    // meter-c's old row reached a window that had ended: late, and counted.
    assert_eq!(h.pipeline.accepted_seqs("meter-c").len(), 76);
    assert_eq!(h.pipeline.stats.lock().unwrap().accepted_readings, 301);

    // Again as fast as the window allows, continuing the ledger: the union
    // verifies, the file read again from the ledger's record of it.
    let second = SimConfig {
        replay: Some(ReplayConfig {
            speed: Speed::Max,
            ..first.replay.clone().unwrap()
        }),
        ..first
    };
    let s = device_sim::run(second).await.unwrap();
    assert!(s.ok(), "{s}");
    assert_eq!((s.run, s.readings_sent), (2, 301));
    assert_eq!(h.pipeline.stats.lock().unwrap().accepted_readings, 602);
    assert_eq!(
        h.pipeline.accepted_seqs("meter-a"),
        (0..150).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_file_with_a_bad_row_is_refused_with_its_line() {
    let h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.csv");
    let mut text = std::fs::read_to_string(recorded()).unwrap();
    text = text.replacen("meter-b,1764000000047,", "meter-b,1764000000047x,", 1);
    std::fs::write(&bad, &text).unwrap();
    let line = text
        .lines()
        .position(|l| l.contains("1764000000047x"))
        .unwrap()
        + 1;
    let err = device_sim::run(replay(&h, "rp2", bad, Speed::Factor(1.0)))
        .await
        .unwrap_err();
    let err = format!("{err:#}");
    assert!(err.contains(&format!("line {line}:")), "{err}");
    assert!(err.contains("bad.csv"), "{err}");
    assert!(
        h.pipeline.peers.lock().unwrap().is_empty(),
        "nothing connected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_templated_payload_verifies_exactly() {
    let h = Harness::start().await;
    // Fields reordered, whitespace, and one reading sent as a batch of one.
    let template = device_sim::template::Template::parse(
        r#"{ "readings": [ { "metrics": {{metrics}}, "ts": {{ts}}, "seq": {{seq}} } ] }"#,
    )
    .unwrap();
    let cfg = SimConfig {
        payload_template: Some(template),
        ..config(&h, "tp1")
    };
    let s = device_sim::run(cfg).await.unwrap();
    assert!(s.ok(), "{s}");
    assert_eq!(s.readings_sent, 200);
    let v = s.verify.as_ref().unwrap();
    assert_eq!(v.series, 21 * 2 * 3, "{v}");
    assert_eq!(h.pipeline.stats.lock().unwrap().accepted_readings, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_the_pipeline_refuses_is_verified_as_refused() {
    let h = Harness::start().await;
    // Its closing brace is missing: not JSON.
    let template = device_sim::template::Template::parse(
        r#"{"seq": {{seq}}, "ts": {{ts}}, "metrics": {{metrics}}"#,
    )
    .unwrap();
    let cfg = SimConfig {
        payload_template: Some(template.clone()),
        ..config(&h, "tp2")
    };
    let s = device_sim::run(cfg).await.unwrap();
    assert!(s.ok(), "{s}");
    let v = s.verify.as_ref().unwrap();
    let refused = s.stat("rejected.malformed_json").unwrap();
    assert_eq!(refused.got, 200, "{v}");
    assert_eq!(
        h.pipeline
            .stats
            .lock()
            .unwrap()
            .rejected
            .get("malformed_json"),
        Some(&200)
    );
    assert_eq!(h.pipeline.stats.lock().unwrap().accepted_readings, 0);

    // A template that is valid but drops `seq`: verify cannot know what
    // the pipeline keeps, and says so before publishing.
    let no_seq =
        device_sim::template::Template::parse(r#"{"ts": {{ts}}, "metrics": {{metrics}}}"#).unwrap();
    let err = device_sim::run(SimConfig {
        payload_template: Some(no_seq),
        ..config(&h, "tp3")
    })
    .await
    .unwrap_err();
    assert!(format!("{err:#}").contains("seq"), "{err:#}");
}
