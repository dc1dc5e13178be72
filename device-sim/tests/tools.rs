//! The simulator's tools for soaks and real data, against the stand-in
//! pipeline (`testkit::standin`): its Prometheus endpoint scraped while a
//! run goes on.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use device_sim::exporter::{self, Live};
use device_sim::{BrokerAddr, Rate, SimConfig, Stop};
use testkit::standin::Harness;
use tokio::net::TcpListener;
use tokio::time::Instant;

fn config(h: &Harness, fleet: &str) -> SimConfig {
    SimConfig {
        broker: BrokerAddr {
            host: h.mqtt.ip().to_string(),
            port: h.mqtt.port(),
        },
        devices: 20,
        rate: Rate::PerDevice(10.0),
        stop: Stop::Count(10),
        fleet: fleet.into(),
        verify: Some(h.api_url()),
        verify_timeout: Duration::from_secs(10),
        ack_timeout: Duration::from_secs(10),
        ..SimConfig::default()
    }
}

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
