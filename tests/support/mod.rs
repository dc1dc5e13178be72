//! What the end-to-end tests share: a pipeline on port 0 in a temp dir, an
//! API client, and waiting on API conditions with a deadline.

#![allow(dead_code)]

pub mod webhook;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use device_sim::{BrokerAddr, Rate, SimConfig, Stop, VerifyReport};
use iotpipe::{Config, Pipeline};
use serde_json::Value;

/// A config on port 0 in `dir`, with a small shard count.
pub fn config(dir: &Path) -> Config {
    let mut c = Config {
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    c.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    c.http.listen = "127.0.0.1:0".parse().unwrap();
    c
}

/// The simulator publishing to `mqtt` and verifying against the API at
/// `http`, otherwise at its defaults.
pub fn sim(mqtt: SocketAddr, http: SocketAddr) -> SimConfig {
    SimConfig {
        broker: BrokerAddr {
            host: mqtt.ip().to_string(),
            port: mqtt.port(),
        },
        verify: Some(format!("http://{http}")),
        ..SimConfig::default()
    }
}

/// QoS 1 load that rides through SIGKILLs: 50 devices at 10 msg/s each for
/// 12 s, patient with PUBACKs and with verify while the pipeline restarts.
pub fn load_through_crashes(mqtt: SocketAddr, http: SocketAddr, seed: u64) -> SimConfig {
    SimConfig {
        devices: 50,
        rate: Rate::PerDevice(10.0),
        stop: Stop::After(Duration::from_secs(12)),
        qos: 1,
        seed,
        verify_timeout: Duration::from_secs(60),
        ack_timeout: Duration::from_secs(60),
        ..sim(mqtt, http)
    }
}

/// What every backend's end-to-end test asks of the whole pipeline: 20
/// devices at 2 msg/s for 5 s at QoS 1, verified exactly.
pub async fn a_short_run_verifies(p: &Pipeline, seed: u64) {
    let summary = device_sim::run(SimConfig {
        devices: 20,
        rate: Rate::PerDevice(2.0),
        stop: Stop::After(Duration::from_secs(5)),
        qos: 1,
        seed,
        verify_timeout: Duration::from_secs(90),
        ..sim(p.mqtt_addr, p.http_addr)
    })
    .await
    .unwrap();
    assert!(summary.ok(), "{summary}");
}

pub async fn start(dir: &Path) -> Pipeline {
    start_edited(dir, |_| {}).await
}

/// [`start`], with [`config`] changed by `edit` first.
pub async fn start_edited(dir: &Path, edit: impl FnOnce(&mut Config)) -> Pipeline {
    let mut c = config(dir);
    edit(&mut c);
    iotpipe::start(&c).await.unwrap()
}

pub async fn get(p: &Pipeline, path: &str) -> (u16, Value) {
    let url = format!("http://{}{path}", p.http_addr);
    let resp = reqwest::get(&url).await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Polls the API until `cond` holds for the body at `path`, or panics after
/// `within` with the last body. Polling the API is how a user waits too.
pub async fn wait_for(
    p: &Pipeline,
    path: &str,
    within: Duration,
    cond: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let (status, body) = get(p, path).await;
        if status == 200 && cond(&body) {
            return body;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting on {path}; last answer {status}: {body}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The pipeline's `/metrics`, as text.
pub async fn metrics_text(p: &Pipeline) -> String {
    reqwest::get(format!("http://{}/metrics", p.http_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// A connected MQTT 3.1.1 client whose event loop runs in the background.
pub async fn mqtt_client(p: &Pipeline, id: &str) -> rumqttc::AsyncClient {
    let mut opts = rumqttc::MqttOptions::new(id, p.mqtt_addr.ip().to_string(), p.mqtt_addr.port());
    opts.set_max_packet_size(256 * 1024, 256 * 1024);
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 100);
    tokio::spawn(async move { while events.poll().await.is_ok() {} });
    client
}

/// Publishes at QoS 1 and waits for every PUBACK, on a client of its own.
pub async fn publish_acked(p: &Pipeline, id: &str, messages: &[(String, Vec<u8>)]) {
    publish_acked_to(p.mqtt_addr, id, messages).await;
}

/// [`publish_acked`] to the MQTT endpoint at `mqtt`.
pub async fn publish_acked_to(mqtt: SocketAddr, id: &str, messages: &[(String, Vec<u8>)]) {
    let mut opts = rumqttc::MqttOptions::new(id, mqtt.ip().to_string(), mqtt.port());
    opts.set_max_packet_size(256 * 1024, 256 * 1024);
    let (client, mut events) = rumqttc::AsyncClient::new(opts, messages.len().max(10));
    for (topic, payload) in messages {
        client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload.clone())
            .await
            .unwrap();
    }
    let mut acked = 0;
    // A deadline, not a rate: on the AWS backends each append is a call to
    // moto, one Python process that the other tests of the binary share
    // (their devices' connects and disconnects are appends too), and under
    // a full CI run 310 publishes have taken over 20 s.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while acked < messages.len() {
        let event = tokio::time::timeout_at(deadline, events.poll()).await;
        match event {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("MQTT connection failed after {acked} acks: {e}"),
            Err(_) => panic!(
                "only {acked} of {} publishes acknowledged in time",
                messages.len()
            ),
        }
    }
    client.disconnect().await.unwrap();
}

/// The simulator's verify report, which must exist and have found every
/// reading counted exactly once.
pub fn verified(verify: Option<VerifyReport>) -> VerifyReport {
    let verify = verify.expect("verify ran");
    assert!(
        verify.ok,
        "lost or double-counted readings: {:#?}",
        verify.mismatches
    );
    verify
}
