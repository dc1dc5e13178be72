//! Processes that scale out: `iotpipe ingest`, `process` and `api` run as
//! separate processes against a NATS JetStream stream and a PostgreSQL
//! store, the `process` instances sharing the stream's partitions by
//! leases; and what a role says when its backend belongs to one process.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use device_sim::{BrokerAddr, Rate, SimConfig, Stop};
use stream::kinesis::KinesisStream;
use stream::lease::LeasedStream;
use stream::nats::{NatsConfig, NatsStream};
use testkit::nats::{NatsCluster, NatsServer};
use testkit::unique_name;
use testkit::up::RoleProcess;

const BIN: &str = env!("CARGO_BIN_EXE_iotpipe");
const PARTITIONS: u32 = 4;
/// The consumer name the processors lease partitions under.
const CONSUMER: &str = "processors";

/// One deployment's shared settings: every role process is started with the
/// same config file and flags, each in a data directory of its own.
struct Deployment {
    dir: tempfile::TempDir,
    args: Vec<String>,
    stream_name: String,
}

impl Deployment {
    /// `config` for the file; `backend`: the flags naming the stream and
    /// the store.
    fn new(config: &str, backend: &[&str], stream_name: String) -> Deployment {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("iotpipe.toml");
        std::fs::write(&file, config).unwrap();
        let mut args = vec!["--config".to_string(), file.to_str().unwrap().to_string()];
        args.extend(backend.iter().map(|a| a.to_string()));
        let shards = PARTITIONS.to_string();
        let common = [
            "--stream-name",
            &stream_name,
            "--shards",
            &shards,
            "--mqtt-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ];
        args.extend(common.iter().map(|a| a.to_string()));
        Deployment {
            dir,
            args,
            stream_name,
        }
    }

    /// On NATS and PostgreSQL, with short leases, so that a dead process's
    /// partitions move within seconds.
    fn nats(nats_url: &str, replicas: usize, postgres_url: &str) -> Deployment {
        let config = format!("[backend]\nnats_replicas = {replicas}\nlease_duration = \"4s\"\n");
        let backend = [
            "--stream",
            "nats",
            "--nats-url",
            nats_url,
            "--store",
            "postgres",
            "--postgres-url",
            postgres_url,
        ];
        Deployment::new(&config, &backend, unique_name("scale"))
    }

    /// `iotpipe ROLE` in data directory `name`.
    fn start(&self, role: &str, name: &str) -> RoleProcess {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        RoleProcess::spawn(BIN.as_ref(), role, &self.dir.path().join(name), &args).unwrap()
    }
}

/// The NATS stream at `url`, as the test reads its lease bucket.
async fn nats_stream(url: &str, name: &str, replicas: usize) -> NatsStream {
    let client = stream::nats::connect(url).await.unwrap();
    let config = NatsConfig {
        partitions: PARTITIONS,
        replicas,
        ..NatsConfig::default()
    };
    NatsStream::open(client, name, &config).await.unwrap()
}

/// The owners holding the partitions' leases, when every partition has
/// one; `None` when some lease is free or the table cannot be read now (a
/// node is down, a leader is being elected).
async fn holders(stream: &dyn LeasedStream) -> Option<BTreeSet<String>> {
    let leases = stream.lease_store().snapshot(CONSUMER).await.ok()?.leases;
    if leases.len() != PARTITIONS as usize {
        return None;
    }
    leases.into_iter().map(|l| l.owner).collect()
}

/// Polls the async `condition` every 200 ms until it holds; panics after
/// `within`.
async fn until<F, Fut>(what: &str, within: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn broker(addr: Option<SocketAddr>) -> BrokerAddr {
    let addr = addr.expect("an ingest process has an MQTT endpoint");
    BrokerAddr {
        host: addr.ip().to_string(),
        port: addr.port(),
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
    let d = Deployment::nats(server.url(), 1, &db.url());
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

/// Must-show 1 of the scale-out work: the simulator, spread over two ingest
/// endpoints, verifies every window through two `process` instances and
/// one `api` on a three-node cluster, while one `process` and one NATS node
/// are killed with SIGKILL and restarted mid-run; the surviving `process`
/// takes the killed one's partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkills_of_a_process_and_a_nats_node_lose_nothing_and_count_nothing_twice() {
    let mut cluster = NatsCluster::start(3).unwrap();
    let db = testkit::postgres::database().await.unwrap();
    let d = Deployment::nats(&cluster.url(), 3, &db.url());
    let api = d.start("api", "api");
    let mut processes = vec![
        d.start("process", "process-0"),
        d.start("process", "process-1"),
    ];
    let ingest = [d.start("ingest", "ingest-0"), d.start("ingest", "ingest-1")];
    let leases = nats_stream(&cluster.url(), &d.stream_name, 3).await;
    until(
        "the two processes share the partitions",
        Duration::from_secs(30),
        || async { holders(&leases).await.is_some_and(|h| h.len() == 2) },
    )
    .await;

    let sim = SimConfig {
        broker: broker(ingest[0].mqtt),
        more_brokers: vec![broker(ingest[1].mqtt)],
        devices: 40,
        rate: Rate::PerDevice(5.0),
        stop: Stop::After(Duration::from_secs(20)),
        qos: 1,
        seed: 1919,
        verify: Some(format!("http://{}", api.http)),
        verify_timeout: Duration::from_secs(120),
        ack_timeout: Duration::from_secs(60),
        ..SimConfig::default()
    };
    // The kills run beside the simulator, which runs here.
    let api_http = api.http;
    let chaos = tokio::spawn(async move {
        until(
            "the API counts readings",
            Duration::from_secs(30),
            || async {
                let stats = get(api_http, "/v1/stats").await;
                stats.is_some_and(|(_, s)| s["accepted_readings"].as_u64().unwrap_or(0) > 200)
            },
        )
        .await;
        let victim = format!("-{}-", processes[0].child.id());
        processes[0].kill().unwrap();
        cluster.kill(1).unwrap();
        eprintln!("iotpipe process and NATS node 1 killed with SIGKILL");
        until(
            "the surviving process holds every partition",
            Duration::from_secs(60),
            || async {
                let held = holders(&leases).await;
                held.is_some_and(|h| h.len() == 1 && h.iter().all(|o| !o.contains(&victim)))
            },
        )
        .await;
        cluster.start_again(1).unwrap();
        processes[0] = d.start("process", "process-0");
        eprintln!("NATS node 1 and the process restarted");
        (cluster, processes, d)
    });
    let summary = device_sim::run(sim).await.unwrap();
    let _still_running = chaos.await.unwrap();
    // Every publish acknowledged, and verify ran and found every window
    // exact: nothing lost, nothing counted twice.
    assert!(summary.verify.is_some() && summary.ok(), "{summary}");
    // Each endpoint took its half of the fleet: 20 devices' 2,000 messages.
    for endpoint in &ingest {
        let metrics = reqwest::get(format!("http://{}/metrics", endpoint.http))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let acks: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("iotpipe_mqtt_acks_sent_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0);
        assert!(acks >= 2_000.0, "an ingest endpoint acknowledged {acks}");
    }
}

/// The same roles on Kinesis and DynamoDB (moto): two `process` instances
/// split the shards by leases in the DynamoDB lease table, and the
/// simulator verifies every window through them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_roles_share_a_kinesis_stream_by_leases_and_verify_exactly() {
    let endpoint = testkit::moto::moto_endpoint().unwrap();
    let lease_table = unique_name("leases");
    let config = format!("[backend]\nlease_table = \"{lease_table}\"\nlease_duration = \"4s\"\n");
    let table = unique_name("rollups");
    let backend = [
        "--stream",
        "kinesis",
        "--store",
        "dynamodb",
        "--endpoint-url",
        &endpoint,
        "--table-name",
        &table,
    ];
    let d = Deployment::new(&config, &backend, unique_name("scale"));
    let api = d.start("api", "api");
    let _processes = [
        d.start("process", "process-0"),
        d.start("process", "process-1"),
    ];
    let ingest = d.start("ingest", "ingest");
    let aws = testkit::moto::moto_config().unwrap();
    let kinesis = KinesisStream::connect(&aws, &d.stream_name, &lease_table).await;
    until(
        "the two processes share the shards",
        Duration::from_secs(60),
        || async { holders(&kinesis).await.is_some_and(|h| h.len() == 2) },
    )
    .await;
    let summary = device_sim::run(SimConfig {
        broker: broker(ingest.mqtt),
        devices: 10,
        rate: Rate::PerDevice(2.0),
        stop: Stop::After(Duration::from_secs(5)),
        qos: 1,
        seed: 2020,
        verify: Some(format!("http://{}", api.http)),
        verify_timeout: Duration::from_secs(120),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    assert!(summary.verify.is_some() && summary.ok(), "{summary}");
}
