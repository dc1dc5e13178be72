//! External broker mode under crashes: devices publish QoS 1 to Mosquitto,
//! `iotpipe up --broker` bridges it into the pipeline and is killed with
//! SIGKILL five times at seeded random moments. Mosquitto keeps the bridge's
//! persistent session throughout, so every acknowledged reading must be
//! counted exactly once.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::net::SocketAddr;
use std::path::Path;

use testkit::mosquitto::Mosquitto;
use testkit::up::{Up, kill_and_restart};

fn spawn(dir: &Path, broker: SocketAddr, http: &str) -> anyhow::Result<Up> {
    let bin = Path::new(env!("CARGO_BIN_EXE_iotpipe"));
    let broker = format!("mqtt://{broker}");
    let args = [
        "--mqtt-listen",
        "127.0.0.1:0",
        "--http-listen",
        http,
        "--broker",
        &broker,
        "--broker-client-id",
        "iotpipe-broker-test",
    ];
    Up::spawn(bin, dir, &args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_sigkills_of_the_bridge_lose_nothing_and_count_nothing_twice() {
    // Queue and in-flight limits as docs/mosquitto.conf sets them: with
    // Mosquitto's defaults it drops messages for a session that is away.
    let broker = Mosquitto::start(
        "max_inflight_messages 1000\nmax_queued_messages 1000000\nmax_queued_bytes 0",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let up = spawn(dir.path(), broker.addr, "127.0.0.1:0").unwrap();
    let sim = support::load_through_crashes(broker.addr, up.http, 12);
    let http = up.http.to_string();
    let addr = broker.addr;
    let dir_path = dir.path().to_path_buf();
    let killer = kill_and_restart(up, 5, 2027, move || spawn(&dir_path, addr, &http));
    let summary = device_sim::run(sim).await.unwrap();
    eprintln!("{summary:#?}");
    killer.join().unwrap().unwrap().kill().unwrap();
    assert_eq!(summary.failed, 0, "some publishes were never acknowledged");
    let log = broker.log_text();
    assert!(
        !log.contains("Outgoing messages are being dropped"),
        "Mosquitto dropped messages for the bridge"
    );
    support::verified(summary.verify);
}
