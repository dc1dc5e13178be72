//! External broker mode under crashes: devices publish QoS 1 to Mosquitto,
//! `iotpipe up --broker` bridges it into the pipeline and is killed with
//! SIGKILL five times at seeded random moments. Mosquitto keeps the bridge's
//! persistent session throughout, so every acknowledged reading must be
//! counted exactly once.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use device_sim::{BrokerAddr, Rate, SimConfig, Stop};
use rand::{Rng, SeedableRng};

#[path = "../ingest/tests/support/mosquitto.rs"]
mod mosquitto;

/// A child `iotpipe up --broker` and the API address it printed.
struct Up {
    child: Child,
    http: SocketAddr,
}

fn spawn(dir: &Path, broker: SocketAddr, http: &str) -> Up {
    let mut child = Command::new(env!("CARGO_BIN_EXE_iotpipe"))
        .args(["up", "--data-dir"])
        .arg(dir)
        .args([
            "--mqtt-listen",
            "127.0.0.1:0",
            "--http-listen",
            http,
            "--broker",
            &format!("mqtt://{broker}"),
            "--broker-client-id",
            "iotpipe-broker-test",
            "--log-format",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The first line says where it listens, once it is up.
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let http = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http://"))
        .unwrap_or_else(|| panic!("no http:// address in the first line: {line}"))
        .parse()
        .unwrap();
    Up { child, http }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_sigkills_of_the_bridge_lose_nothing_and_count_nothing_twice() {
    // Queue and in-flight limits as docs/mosquitto.conf sets them: with
    // Mosquitto's defaults it drops messages for a session that is away.
    let broker = mosquitto::Mosquitto::start(
        "max_inflight_messages 1000\nmax_queued_messages 1000000\nmax_queued_bytes 0",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let up = spawn(dir.path(), broker.addr, "127.0.0.1:0");
    let http = up.http.to_string();
    let sim = SimConfig {
        broker: BrokerAddr {
            host: broker.addr.ip().to_string(),
            port: broker.addr.port(),
        },
        devices: 50,
        rate: Rate::PerDevice(10.0),
        stop: Stop::After(Duration::from_secs(12)),
        qos: 1,
        seed: 12,
        verify: Some(format!("http://{http}")),
        verify_timeout: Duration::from_secs(60),
        ack_timeout: Duration::from_secs(60),
        ..SimConfig::default()
    };
    let addr = broker.addr;
    let dir_path = dir.path().to_path_buf();
    let killer = std::thread::spawn(move || {
        let mut up = up;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2027);
        for kill in 1..=5 {
            std::thread::sleep(Duration::from_millis(rng.random_range(600..1800)));
            up.child.kill().unwrap();
            up.child.wait().unwrap();
            eprintln!("kill {kill}: iotpipe up --broker killed with SIGKILL; restarting");
            up = spawn(&dir_path, addr, &http);
        }
        up
    });
    let summary = device_sim::run(sim).await.unwrap();
    eprintln!("{summary:#?}");
    let mut up = killer.join().unwrap();
    up.child.kill().unwrap();
    up.child.wait().unwrap();
    assert_eq!(summary.failed, 0, "some publishes were never acknowledged");
    let log = broker.log_text();
    assert!(
        !log.contains("Outgoing messages are being dropped"),
        "Mosquitto dropped messages for the bridge"
    );
    let verify = summary.verify.expect("verify ran");
    assert!(
        verify.ok,
        "lost or double-counted readings: {:#?}",
        verify.mismatches
    );
}
