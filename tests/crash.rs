//! `iotpipe up` killed with SIGKILL five times under QoS 1 load and restarted
//! on the same data dir: every acknowledged reading must be counted exactly
//! once. The simulator keeps publishing through the crashes (its devices
//! reconnect and resend what was not acknowledged) and then verifies every
//! window.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::Path;

use testkit::up::{Up, kill_and_restart};

fn spawn(dir: &Path, mqtt: &str, http: &str) -> anyhow::Result<Up> {
    let bin = Path::new(env!("CARGO_BIN_EXE_iotpipe"));
    Up::spawn(bin, dir, &["--mqtt-listen", mqtt, "--http-listen", http])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_sigkills_lose_nothing_and_count_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let up = spawn(dir.path(), "127.0.0.1:0", "127.0.0.1:0").unwrap();
    let sim = support::load_through_crashes(up.mqtt, up.http, 11);
    let (mqtt, http) = (up.mqtt.to_string(), up.http.to_string());
    // The killer runs on a thread of its own while the simulator runs here:
    // the moments are random but seeded, and nothing waits on them.
    let dir_path = dir.path().to_path_buf();
    let killer = kill_and_restart(up, 5, 2026, move || spawn(&dir_path, &mqtt, &http));
    let summary = device_sim::run(sim).await.unwrap();
    eprintln!("{summary:#?}");
    killer.join().unwrap().unwrap().kill().unwrap();
    assert_eq!(summary.failed, 0, "some publishes were never acknowledged");
    assert!(
        summary.reconnects > 0,
        "devices did not ride through the crashes: {summary:?}"
    );
    support::verified(summary.verify);
}
