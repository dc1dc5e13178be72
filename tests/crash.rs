//! `iotpipe up` killed with SIGKILL five times under QoS 1 load and restarted
//! on the same data dir: every acknowledged reading must be counted exactly
//! once. The simulator keeps publishing through the crashes (its devices
//! reconnect and resend what was not acknowledged) and then verifies every
//! window.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use device_sim::{BrokerAddr, Rate, SimConfig, Stop};
use rand::{Rng, SeedableRng};

/// A child `iotpipe up` and the addresses it printed.
struct Up {
    child: Child,
    mqtt: SocketAddr,
    http: SocketAddr,
}

fn spawn(dir: &Path, mqtt: &str, http: &str) -> Up {
    let mut child = Command::new(env!("CARGO_BIN_EXE_iotpipe"))
        .args(["up", "--data-dir"])
        .arg(dir)
        .args([
            "--mqtt-listen",
            mqtt,
            "--http-listen",
            http,
            "--log-format",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The first line says where it listens, once it accepts connections.
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        words.get(..2),
        Some(&["iotpipe", "up:"][..]),
        "unexpected first line: {line}"
    );
    let addr = |w: &str, scheme: &str| w.strip_prefix(scheme).unwrap().parse().unwrap();
    Up {
        mqtt: addr(words[2], "mqtt://"),
        http: addr(words[3], "http://"),
        child,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_sigkills_lose_nothing_and_count_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = spawn(dir.path(), "127.0.0.1:0", "127.0.0.1:0");
    let (mqtt, http) = (up.mqtt.to_string(), up.http.to_string());
    let sim = SimConfig {
        broker: BrokerAddr {
            host: up.mqtt.ip().to_string(),
            port: up.mqtt.port(),
        },
        devices: 50,
        rate: Rate::PerDevice(10.0),
        stop: Stop::After(Duration::from_secs(12)),
        qos: 1,
        seed: 11,
        verify: Some(format!("http://{http}")),
        verify_timeout: Duration::from_secs(60),
        ack_timeout: Duration::from_secs(60),
        ..SimConfig::default()
    };
    // The killer runs on a thread of its own while the simulator runs here:
    // the moments are random but seeded, and nothing waits on them.
    let dir_path = dir.path().to_path_buf();
    let killer = std::thread::spawn(move || {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2026);
        for kill in 1..=5 {
            std::thread::sleep(Duration::from_millis(rng.random_range(600..1800)));
            up.child.kill().unwrap();
            up.child.wait().unwrap();
            eprintln!("kill {kill}: iotpipe up killed with SIGKILL; restarting");
            up = spawn(&dir_path, &mqtt, &http);
        }
        up
    });
    let summary = device_sim::run(sim).await.unwrap();
    eprintln!("{summary:#?}");
    let mut up = killer.join().unwrap();
    up.child.kill().unwrap();
    up.child.wait().unwrap();
    assert_eq!(summary.failed, 0, "some publishes were never acknowledged");
    assert!(
        summary.reconnects > 0,
        "devices did not ride through the crashes: {summary:?}"
    );
    let verify = summary.verify.expect("verify ran");
    assert!(
        verify.ok,
        "lost or double-counted readings: {:#?}",
        verify.mismatches
    );
}
