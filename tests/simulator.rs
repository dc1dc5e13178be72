//! The simulator against the whole pipeline, in-process on port 0: every
//! device and fleet window at 1m, 1h and 1d must match what was sent.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use device_sim::{BrokerAddr, Rate, SimConfig, Stop};

fn sim(p: &iotpipe::Pipeline) -> SimConfig {
    SimConfig {
        broker: BrokerAddr {
            host: p.mqtt_addr.ip().to_string(),
            port: p.mqtt_addr.port(),
        },
        verify: Some(format!("http://{}", p.http_addr)),
        verify_timeout: Duration::from_secs(60),
        ..SimConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_devices_verify_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let p = support::start(dir.path()).await;
    let summary = device_sim::run(SimConfig {
        devices: 200,
        rate: Rate::PerDevice(5.0),
        stop: Stop::After(Duration::from_secs(10)),
        qos: 1,
        seed: 7,
        ..sim(&p)
    })
    .await
    .unwrap();
    println!("{summary:#?}");
    assert_eq!(summary.failed, 0, "{summary:?}");
    assert_eq!(summary.acked, summary.messages_sent);
    assert!(summary.messages_sent >= 200 * 5 * 10 - 200, "{summary:?}");
    let verify = summary.verify.expect("verify ran");
    assert!(verify.ok, "verify failed: {:#?}", verify.mismatches);
    assert!(verify.windows > 1000, "{verify:?}");
    p.shutdown().await.unwrap();
}
