//! The whole pipeline on a NATS JetStream stream (a `nats-server -js` these
//! tests start): the simulator verifies every rollup exactly, also when the
//! server is killed with SIGKILL and restarted under load.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use device_sim::{BrokerAddr, Rate, SimConfig, Stop};
use iotpipe::config::StreamKind;
use rand::{Rng, SeedableRng};
use testkit::moto::unique_name;
use testkit::nats::NatsServer;

fn config(dir: &std::path::Path, server: &NatsServer) -> iotpipe::Config {
    let mut config = support::config(dir);
    config.backend.stream = StreamKind::Nats;
    config.backend.nats_url = server.url().to_string();
    config.backend.stream_name = unique_name("telemetry");
    config.stream.shards = 2;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_verifies_exactly_on_jetstream() {
    let server = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = iotpipe::start(&config(dir.path(), &server)).await.unwrap();
    let summary = device_sim::run(SimConfig {
        broker: BrokerAddr {
            host: p.mqtt_addr.ip().to_string(),
            port: p.mqtt_addr.port(),
        },
        devices: 20,
        rate: Rate::PerDevice(2.0),
        stop: Stop::After(Duration::from_secs(5)),
        qos: 1,
        seed: 5,
        verify: Some(format!("http://{}", p.http_addr)),
        verify_timeout: Duration::from_secs(60),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    assert!(summary.ok(), "{summary}");
    p.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkills_of_the_nats_server_lose_nothing_and_count_nothing_twice() {
    let mut server = NatsServer::start().unwrap();
    if !server.is_local() {
        eprintln!(
            "skipped: the server at {} is not this test's to kill",
            server.url()
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = iotpipe::start(&config(dir.path(), &server)).await.unwrap();
    let sim = support::load_through_crashes(p.mqtt_addr, p.http_addr, 17);
    // The killer runs on a thread of its own while the simulator runs here:
    // the moments are random but seeded, and nothing waits on them.
    let killer = std::thread::spawn(move || {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2026);
        for kill in 1..=3 {
            std::thread::sleep(Duration::from_millis(rng.random_range(1500..3000)));
            server.kill()?;
            eprintln!("kill {kill}: nats-server killed with SIGKILL; restarting");
            server.start_again()?;
        }
        anyhow::Ok(server)
    });
    let summary = device_sim::run(sim).await.unwrap();
    eprintln!("{summary:#?}");
    let _server = killer.join().unwrap().unwrap();
    assert_eq!(summary.failed, 0, "some publishes were never acknowledged");
    let verify = summary.verify.expect("verify ran");
    assert!(
        verify.ok,
        "lost or double-counted readings: {:#?}",
        verify.mismatches
    );
    p.shutdown().await.unwrap();
}
