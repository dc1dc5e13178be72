//! iotpipe's endpoint against embedded rumqttd 0.20, on the same machine in
//! the same run, both writing the real embedded log with fdatasync.
//!
//! - **endpoint**: `ingest::serve` appending to `EmbeddedLog`; a PUBACK leaves
//!   once the record is durable.
//! - **rumqttd**: rumqttd acknowledging on receipt, and a bridge on its
//!   in-process link (`Broker::link`, `dt/+/+/telemetry`) packing each
//!   message as the endpoint does and appending batches to `EmbeddedLog`.
//!
//! Two measurements:
//!
//! ```text
//! # sustained QoS 1 acks/s and durable appends/s, N publishers, 100-byte payloads;
//! # the endpoint's group commit can be set to compare settings
//! cargo run --release -p ingest --example vs_rumqttd -- throughput [--publishers 4] [--secs 10] \
//!     [--commit-interval-us N] [--puts-in-flight N] [--commit-max-records N] [--server-workers N]
//! # the loss window: SIGKILL the server under QoS 1 load, then count
//! # messages that were PUBACKed but are not in the log after reopening it
//! cargo run --release -p ingest --example vs_rumqttd -- loss [--runs 5] [--seed 7]
//! ```
//!
//! `loss` runs the server in a child process (this example, `serve`), so the
//! kill is a real SIGKILL of the process that owns the log.
//!
//! ```text
//! # external broker mode: publishers → Mosquitto → ingest::bridge → log, the
//! # bridge killed with SIGKILL and restarted; every message Mosquitto
//! # acknowledged must reach the log (needs `mosquitto` on PATH)
//! cargo run --release -p ingest --example vs_rumqttd -- loss-bridge [--kills 5] [--seed 7]
//! ```

mod common;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use ingest::{EndpointConfig, GroupCommit, IngestMetrics};
use rand::{Rng, SeedableRng};
use schemas::{PackedRecord, StreamRecord, Topic};
use stream::embedded::{EmbeddedConfig, EmbeddedLog};
use stream::{PutRecord, ShardReader, StreamProducer};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Endpoint,
    Rumqttd,
    /// `ingest::bridge` subscribed to a Mosquitto on the given port.
    Bridge,
}

impl Target {
    fn parse(s: &str) -> Result<Target> {
        match s {
            "endpoint" => Ok(Target::Endpoint),
            "rumqttd" => Ok(Target::Rumqttd),
            "bridge" => Ok(Target::Bridge),
            other => bail!("unknown target {other}"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Target::Endpoint => "endpoint",
            Target::Rumqttd => "rumqttd",
            Target::Bridge => "bridge",
        }
    }
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |name: &str, default: u64| -> Result<u64> {
        flag(&args, name).map_or(Ok(default), |v| Ok(v.parse()?))
    };
    match args.first().map(String::as_str) {
        Some("throughput") => {
            let publishers = num("--publishers", 4)? as usize;
            let secs = num("--secs", 10)?;
            let defaults = GroupCommit::default();
            let endpoint = EndpointConfig {
                group_commit: GroupCommit {
                    commit_interval: Duration::from_micros(num(
                        "--commit-interval-us",
                        defaults.commit_interval.as_micros() as u64,
                    )?),
                    max_puts_in_flight: num("--puts-in-flight", defaults.max_puts_in_flight as u64)?
                        as usize,
                    commit_max_records: num(
                        "--commit-max-records",
                        defaults.commit_max_records as u64,
                    )? as usize,
                    ..defaults
                },
                ..EndpointConfig::default()
            };
            // Both servers share this runtime: the endpoint runs on it, and so
            // does the bridge behind rumqttd (which adds threads of its own).
            let server_workers = num("--server-workers", 1)? as usize;
            println!(
                "endpoint: commit interval {:?}, {} puts in flight; server runtime: {server_workers} worker(s)",
                endpoint.group_commit.commit_interval, endpoint.group_commit.max_puts_in_flight
            );
            println!("target     publishers  acked/s  appended/s  server CPU");
            for target in [Target::Endpoint, Target::Rumqttd] {
                throughput(target, publishers, secs, server_workers, endpoint.clone())?;
            }
            Ok(())
        }
        Some("loss") => {
            let runs = num("--runs", 5)?;
            let seed = num("--seed", 7)?;
            println!("target     runs  acked     acked but lost");
            for target in [Target::Rumqttd, Target::Endpoint] {
                loss(target, runs, seed)?;
            }
            Ok(())
        }
        Some("loss-bridge") => loss_bridge(num("--kills", 5)?, num("--seed", 7)?),
        Some("serve") => {
            let target = Target::parse(&flag(&args, "--target").context("--target")?)?;
            let dir = PathBuf::from(flag(&args, "--dir").context("--dir")?);
            let port: u16 = flag(&args, "--port").context("--port")?.parse()?;
            serve_child(target, &dir, port)
        }
        _ => bail!("usage: vs_rumqttd throughput|loss [flags]"),
    }
}

fn open_log(dir: &Path) -> Result<Arc<EmbeddedLog>> {
    Ok(EmbeddedLog::open(
        dir,
        EmbeddedConfig {
            shards: 4,
            sync: true,
            ..EmbeddedConfig::default()
        },
    )?)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// New ingest metrics whose durable appends are copied into `appended`
/// every 50 ms, for as long as the process runs.
fn mirrored_metrics(appended: &Arc<AtomicU64>) -> Arc<IngestMetrics> {
    let metrics = Arc::new(IngestMetrics::new());
    let (mirrored, appended) = (metrics.clone(), appended.clone());
    std::thread::spawn(move || {
        loop {
            appended.store(mirrored.snapshot().records_appended, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    metrics
}

/// Starts the server side of `target` on `port`, appending to `log`; the
/// returned counter tracks records appended (durable).
fn start_server(
    target: Target,
    port: u16,
    log: Arc<EmbeddedLog>,
    rt: &tokio::runtime::Runtime,
    endpoint: EndpointConfig,
) -> Result<Arc<AtomicU64>> {
    let appended = Arc::new(AtomicU64::new(0));
    match target {
        Target::Endpoint => {
            let listener = rt.block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))?;
            let metrics = mirrored_metrics(&appended);
            rt.spawn(ingest::serve(
                listener,
                log,
                endpoint,
                metrics,
                std::future::pending(),
            ));
        }
        Target::Bridge => {
            let mut config =
                ingest::bridge::BridgeConfig::new(&format!("mqtt://127.0.0.1:{port}"))?;
            config.client_id = "iotpipe-loss-bridge".into();
            let metrics = mirrored_metrics(&appended);
            rt.spawn(ingest::bridge::run(
                config,
                log,
                metrics,
                std::future::pending(),
            ));
        }
        Target::Rumqttd => {
            let (_link_tx, mut link_rx) = testkit::rumqttd::start(
                &format!("127.0.0.1:{port}"),
                10010,
                100,
                "iotpipe-bridge",
                "dt/+/+/telemetry",
            )?;
            let counter = appended.clone();
            rt.spawn(async move {
                loop {
                    // Everything the router has handed over joins one append.
                    let mut batch = Vec::new();
                    match link_rx.next().await {
                        Ok(Some(n)) => batch.extend(pack(n)),
                        Ok(None) => {}
                        Err(e) => {
                            eprintln!("the link failed: {e}");
                            return;
                        }
                    }
                    while let Ok(Some(n)) = link_rx.recv_deadline(Instant::now()) {
                        batch.extend(pack(n));
                    }
                    // Without this the router stops forwarding after a few
                    // hundred messages.
                    let _ = link_rx.ready();
                    if batch.is_empty() {
                        continue;
                    }
                    let n = batch.len() as u64;
                    let mut todo = batch;
                    while !todo.is_empty() {
                        match log.put(todo.clone()).await {
                            Ok(outcomes) => {
                                todo = todo
                                    .into_iter()
                                    .zip(outcomes)
                                    .filter(|(_, o)| {
                                        !matches!(o, stream::PutOutcome::Stored { .. })
                                    })
                                    .map(|(r, _)| r)
                                    .collect();
                            }
                            Err(e) => {
                                eprintln!("append failed: {e}");
                                return;
                            }
                        }
                    }
                    counter.fetch_add(n, Ordering::Relaxed);
                }
            });
        }
    }
    Ok(appended)
}

/// One forwarded message as the record the endpoint would have made.
fn pack(n: rumqttd::Notification) -> Option<PutRecord> {
    let rumqttd::Notification::Forward(f) = n else {
        return None;
    };
    let topic = std::str::from_utf8(&f.publish.topic).ok()?;
    let topic = Topic::parse(topic).ok()?;
    let readings = schemas::decode_payload(&f.publish.payload).ok()?;
    let record = PackedRecord {
        device_id: topic.device_id.to_string(),
        fleet: topic.fleet.to_string(),
        received_at: testkit::now_ms(),
        readings,
    };
    Some(PutRecord {
        partition_key: record.device_id.clone(),
        data: Bytes::from(record.encode()),
    })
}

/// Publishers that keep 100 QoS 1 publishes in flight each and record which
/// (device, seq) were acknowledged.
struct Publishers {
    acked: Arc<AtomicU64>,
    acked_ids: Arc<Mutex<HashSet<(String, u64)>>>,
    running: Arc<AtomicBool>,
}

impl Publishers {
    /// The (device, seq) acknowledged so far.
    fn acked_set(&self) -> HashSet<(String, u64)> {
        self.acked_ids
            .lock()
            .map(|ids| ids.clone())
            .unwrap_or_default()
    }
}

/// The loss runs' load: four publishers to `127.0.0.1:port` on a runtime of
/// their own, recording which (device, seq) were acknowledged.
fn loss_publishers(port: u16) -> Result<(tokio::runtime::Runtime, Publishers)> {
    let rt = common::runtime("client", 2)?;
    let pubs = start_publishers(&rt, SocketAddr::from(([127, 0, 0, 1], port)), 4, true);
    Ok((rt, pubs))
}

fn start_publishers(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    n: usize,
    record_ids: bool,
) -> Publishers {
    let p = Publishers {
        acked: Arc::new(AtomicU64::new(0)),
        acked_ids: Arc::new(Mutex::new(HashSet::new())),
        running: Arc::new(AtomicBool::new(true)),
    };
    for i in 0..n {
        let (acked, ids, running) = (p.acked.clone(), p.acked_ids.clone(), p.running.clone());
        rt.spawn(async move {
            let device = format!("dev-{i}");
            let (client, mut eventloop, topic) = common::publisher(addr, &device);
            // Publish requests leave in the order they are made, so the
            // n-th outgoing PUBLISH carries the n-th seq sent here.
            let (seq_tx, mut seq_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
            tokio::spawn(common::publish_while(client, topic, running, move |seq| {
                seq_tx.send(seq).is_ok()
            }));
            let mut by_pkid: HashMap<u16, u64> = HashMap::new();
            let mut unsent: VecDeque<u64> = VecDeque::new();
            while let Ok(event) = eventloop.poll().await {
                match event {
                    rumqttc::Event::Outgoing(rumqttc::Outgoing::Publish(pkid)) if record_ids => {
                        while let Ok(s) = seq_rx.try_recv() {
                            unsent.push_back(s);
                        }
                        if let Some(seq) = unsent.pop_front() {
                            by_pkid.insert(pkid, seq);
                        }
                    }
                    rumqttc::Event::Incoming(rumqttc::Packet::PubAck(a)) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                        if let Some(seq) = by_pkid.remove(&a.pkid)
                            && let Ok(mut ids) = ids.lock()
                        {
                            ids.insert((device.clone(), seq));
                        }
                    }
                    _ => {}
                }
            }
        });
    }
    p
}

/// CPU seconds used so far by this process's threads, except the
/// publishers' (`client`) and the main thread: the server side, whatever
/// threads it runs on (rumqttd starts its own).
fn server_cpu_secs() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return f64::NAN;
    };
    let mut ticks = 0u64;
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.starts_with("client") || comm.starts_with("vs_rumqttd") {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
            ticks += field(14).unwrap_or(0) + field(15).unwrap_or(0);
        }
    }
    ticks as f64 / 100.0
}

fn throughput(
    target: Target,
    publishers: usize,
    secs: u64,
    server_workers: usize,
    endpoint: EndpointConfig,
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let log = open_log(dir.path())?;
    let server_rt = common::runtime("server", server_workers)?;
    let client_rt = common::runtime("client", 2)?;
    let port = free_port()?;
    let appended = start_server(target, port, log, &server_rt, endpoint)?;
    std::thread::sleep(Duration::from_millis(300));
    let pubs = start_publishers(
        &client_rt,
        SocketAddr::from(([127, 0, 0, 1], port)),
        publishers,
        false,
    );
    std::thread::sleep(Duration::from_secs(1));
    let server_cpu = server_cpu_secs;
    let (a0, p0, c0) = (
        pubs.acked.load(Ordering::Relaxed),
        appended.load(Ordering::Relaxed),
        server_cpu(),
    );
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let elapsed = t0.elapsed().as_secs_f64();
    let (a1, p1, c1) = (
        pubs.acked.load(Ordering::Relaxed),
        appended.load(Ordering::Relaxed),
        server_cpu(),
    );
    pubs.running.store(false, Ordering::Relaxed);
    println!(
        "{:<9}  {publishers:>10}  {:>7.0}  {:>10.0}  {:>9.0}%",
        target.name(),
        (a1 - a0) as f64 / elapsed,
        (p1 - p0) as f64 / elapsed,
        (c1 - c0) / elapsed * 100.0
    );
    client_rt.shutdown_timeout(Duration::from_millis(200));
    server_rt.shutdown_timeout(Duration::from_millis(200));
    Ok(())
}

/// The child of `loss`: serves until killed.
fn serve_child(target: Target, dir: &Path, port: u16) -> Result<()> {
    let rt = common::runtime("server", 1)?;
    let log = open_log(dir)?;
    start_server(target, port, log, &rt, EndpointConfig::default())?;
    println!("ready");
    loop {
        std::thread::park();
    }
}

fn spawn_server(target: Target, port: u16, dir: &Path) -> Result<Child> {
    let mut child = Command::new(std::env::current_exe()?)
        .args([
            "serve",
            "--target",
            target.name(),
            "--port",
            &port.to_string(),
            "--dir",
        ])
        .arg(dir)
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().context("stdout")?),
        &mut line,
    )?;
    if line.trim() != "ready" {
        bail!("the server did not start: {line}");
    }
    Ok(child)
}

fn loss_bridge(kills: u64, seed: u64) -> Result<()> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let broker = testkit::mosquitto::Mosquitto::start(
        "max_inflight_messages 1000\nmax_queued_messages 10000000\nmax_queued_bytes 0",
    )?;
    let port = broker.addr.port();
    let log_dir = broker.dir().join("log");
    let mut child = spawn_server(Target::Bridge, port, &log_dir)?;
    std::thread::sleep(Duration::from_millis(300));
    let (client_rt, pubs) = loss_publishers(port)?;
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(rng.random_range(500..2000)));
        child.kill()?;
        child.wait()?;
        child = spawn_server(Target::Bridge, port, &log_dir)?;
    }
    std::thread::sleep(Duration::from_millis(500));
    pubs.running.store(false, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(500));
    client_rt.shutdown_timeout(Duration::from_millis(200));
    let acked = pubs.acked_set();
    // Let the bridge drain the broker's queue, then check with the log
    // closed (one process at a time may hold it).
    let mut missing = acked.len();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(2));
        child.kill()?;
        child.wait()?;
        let stored = read_all(&log_dir)?;
        missing = acked.difference(&stored).count();
        if missing == 0 {
            break;
        }
        child = spawn_server(Target::Bridge, port, &log_dir)?;
    }
    let _ = child.kill();
    let _ = child.wait();
    drop(broker);
    println!(
        "bridge: {kills} SIGKILLs, {} messages acknowledged by Mosquitto, {missing} not in the log",
        acked.len()
    );
    Ok(())
}

fn loss(target: Target, runs: u64, seed: u64) -> Result<()> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (mut acked_total, mut lost_total) = (0usize, 0usize);
    for _ in 0..runs {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let mut child = spawn_server(target, port, dir.path())?;
        std::thread::sleep(Duration::from_millis(200));
        let (client_rt, pubs) = loss_publishers(port)?;
        std::thread::sleep(Duration::from_millis(rng.random_range(1000..3000)));
        child.kill()?;
        child.wait()?;
        pubs.running.store(false, Ordering::Relaxed);
        client_rt.shutdown_timeout(Duration::from_millis(200));
        let acked = pubs.acked_set();
        let stored = read_all(dir.path())?;
        acked_total += acked.len();
        lost_total += acked.difference(&stored).count();
    }
    println!(
        "{:<9}  {runs:>4}  {acked_total:>8}  {lost_total:>8}",
        target.name()
    );
    Ok(())
}

/// Every (device, seq) in the log, reopened as after a restart.
fn read_all(dir: &Path) -> Result<HashSet<(String, u64)>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let log = open_log(dir)?;
        let mut out = HashSet::new();
        for shard in log.shard_ids() {
            let mut reader = log.reader(&shard, "loss-check")?;
            loop {
                let batch = reader.next_batch(10_000, Duration::ZERO).await?;
                if batch.is_empty() {
                    break;
                }
                for r in batch {
                    if let Ok(StreamRecord::Readings(p)) = schemas::decode_record(&r.data) {
                        for reading in p.readings {
                            if let Some(seq) = reading.seq {
                                out.insert((p.device_id.clone(), seq));
                            }
                        }
                    }
                }
            }
        }
        log.close().await?;
        Ok(out)
    })
}
