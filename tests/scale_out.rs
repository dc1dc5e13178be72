//! Processes that scale out: `iotpipe ingest`, `process` and `api` run as
//! separate processes against a NATS JetStream stream and a PostgreSQL
//! store, the `process` instances sharing the stream's partitions by
//! leases; and what a role says when its backend belongs to one process.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::process::Command;

use testkit::nats::NatsServer;
use testkit::unique_name;
use testkit::up::RoleProcess;

const BIN: &str = env!("CARGO_BIN_EXE_iotpipe");
const PARTITIONS: u32 = 4;

/// One deployment's shared settings: every role process is started with the
/// same config file and flags, each in a data directory of its own.
struct Deployment {
    dir: tempfile::TempDir,
    args: Vec<String>,
}

impl Deployment {
    fn new(nats_url: &str, replicas: usize, postgres_url: &str) -> Deployment {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("iotpipe.toml");
        // Short leases, so that a dead process's partitions move within
        // seconds.
        std::fs::write(
            &config,
            format!("[backend]\nnats_replicas = {replicas}\nlease_duration = \"4s\"\n"),
        )
        .unwrap();
        let stream_name = unique_name("scale");
        let args = [
            "--config",
            config.to_str().unwrap(),
            "--stream",
            "nats",
            "--nats-url",
            nats_url,
            "--stream-name",
            &stream_name,
            "--store",
            "postgres",
            "--postgres-url",
            postgres_url,
            "--shards",
            &PARTITIONS.to_string(),
            "--mqtt-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ]
        .map(str::to_string)
        .to_vec();
        Deployment { dir, args }
    }

    /// `iotpipe ROLE` in data directory `name`.
    fn start(&self, role: &str, name: &str) -> RoleProcess {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        RoleProcess::spawn(BIN.as_ref(), role, &self.dir.path().join(name), &args).unwrap()
    }
}

async fn get(addr: SocketAddr, path: &str) -> Option<(u16, serde_json::Value)> {
    let response = reqwest::get(format!("http://{addr}{path}")).await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.json().await.unwrap_or_default()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_starts_serves_its_port_and_stops_cleanly() {
    let server = NatsServer::start().unwrap();
    let db = testkit::postgres::database().await.unwrap();
    let d = Deployment::new(server.url(), 1, &db.url());
    for role in ["api", "process", "ingest"] {
        let p = d.start(role, role);
        assert_eq!(p.mqtt.is_some(), role == "ingest", "{role}");
        let (status, health) = get(p.http, "/healthz").await.unwrap();
        assert_eq!((status, &health["status"]), (200, &"ok".into()), "{role}");
        let (status, _) = get(p.http, "/metrics").await.unwrap();
        assert_eq!(status, 200, "{role}");
        let (status, _) = get(p.http, "/v1/stats").await.unwrap();
        assert_eq!(status == 200, role == "api", "{role} and the query API");
        assert!(
            p.terminate().unwrap(),
            "iotpipe {role} did not stop cleanly"
        );
    }
}

/// `iotpipe ROLE ARGS…` in a fresh data directory, expected to refuse to
/// start: what it said.
fn refusal(role: &str, args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .arg(role)
        .arg("--data-dir")
        .arg(dir.path())
        .args([
            "--mqtt-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "iotpipe {role} {args:?} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_role_on_a_backend_only_one_process_can_use_is_refused_in_words() {
    let said = refusal("process", &[]);
    assert!(
        said.contains("iotpipe process needs a stream that other processes share")
            && said.contains("embedded log")
            && said.contains("--stream nats"),
        "{said}"
    );
    let said = refusal("ingest", &[]);
    assert!(said.contains("embedded log"), "{said}");
    let said = refusal("api", &[]);
    assert!(
        said.contains("iotpipe api needs a store that other processes share")
            && said.contains("SQLite"),
        "{said}"
    );
}
