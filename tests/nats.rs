//! The whole pipeline on a NATS JetStream stream (a `nats-server -js` these
//! tests start): the simulator verifies every rollup exactly, also when the
//! server is killed with SIGKILL and restarted under load.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

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
    support::a_short_run_verifies(&p, 5).await;
    p.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkills_of_the_nats_server_lose_nothing_and_count_nothing_twice() {
    let Some(mut server) = NatsServer::start_killable().unwrap() else {
        return;
    };
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
