//! The load both endpoint benchmarks (`endpoint_rate`, `vs_rumqttd`) put on a
//! server, written once so that their figures measure the same publishers.

use std::net::SocketAddr;
use std::time::Duration;

/// A valid payload of exactly 100 bytes.
pub fn payload(seq: u64) -> Vec<u8> {
    let head = format!(
        r#"{{"seq":{seq},"ts":1764240000123,"metrics":{{"temperature":21.5,"humidity":40.2,"pad":"#
    );
    let tail = "}}";
    let digits = 100usize.saturating_sub(head.len() + tail.len()).max(1);
    format!("{head}{}{tail}", "1".repeat(digits)).into_bytes()
}

/// A publisher as `device` with 100 QoS 1 publishes in flight, and the topic
/// it publishes telemetry to.
pub fn publisher(
    addr: SocketAddr,
    device: &str,
) -> (rumqttc::AsyncClient, rumqttc::EventLoop, String) {
    let mut options = rumqttc::MqttOptions::new(device, addr.ip().to_string(), addr.port());
    options.set_inflight(100);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, eventloop) = rumqttc::AsyncClient::new(options, 100);
    (client, eventloop, format!("dt/bench/{device}/telemetry"))
}
