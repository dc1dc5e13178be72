//! The load both endpoint benchmarks (`endpoint_rate`, `vs_rumqttd`) put on a
//! server, written once so that their figures measure the same publishers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// Publishes `payload(0)`, `payload(1)`, … at QoS 1 to `topic` while
/// `running` holds, telling `sending` each seq before its publish request is
/// made; stops when `sending` returns false or the client is gone.
pub async fn publish_while(
    client: rumqttc::AsyncClient,
    topic: String,
    running: Arc<AtomicBool>,
    mut sending: impl FnMut(u64) -> bool,
) {
    let mut seq = 0u64;
    while running.load(Ordering::Relaxed) {
        if !sending(seq)
            || client
                .publish(&topic, rumqttc::QoS::AtLeastOnce, false, payload(seq))
                .await
                .is_err()
        {
            break;
        }
        seq += 1;
    }
}

/// A multi-thread runtime of `workers` threads named `name`, so that each
/// side's CPU time can be told apart in /proc.
pub fn runtime(name: &str, workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(name)
        .enable_all()
        .build()
}
