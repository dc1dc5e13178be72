//! The whole pipeline on a NATS JetStream stream (a `nats-server -js` this
//! test starts): the simulator verifies every rollup exactly.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use device_sim::{BrokerAddr, Rate, SimConfig, Stop};
use iotpipe::config::StreamKind;
use testkit::moto::unique_name;
use testkit::nats::NatsServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_verifies_exactly_on_jetstream() {
    let server = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = support::config(dir.path());
    config.backend.stream = StreamKind::Nats;
    config.backend.nats_url = server.url().to_string();
    config.backend.stream_name = unique_name("telemetry");
    config.stream.shards = 2;
    let p = iotpipe::start(&config).await.unwrap();
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
