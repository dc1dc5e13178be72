//! How many QoS 1 publishes per second the endpoint acknowledges, and at what
//! CPU cost, with a stream that only counts (no disk).
//!
//! N rumqttc publishers, each keeping 100 publishes in flight with 100-byte
//! valid payloads, against `serve` on its own runtime thread(s); the clients
//! run on another runtime. Server CPU is read from /proc for the server's
//! threads only.
//!
//! ```text
//! cargo run --release -p ingest --example endpoint_rate -- \
//!     [--publishers 4,16] [--secs 10] [--server-threads 1]
//! ```

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use async_trait::async_trait;
use ingest::{EndpointConfig, IngestMetrics, serve};
use stream::{ProduceError, PutOutcome, PutRecord, StreamProducer};

/// A stream that stores nothing: it measures the endpoint, not a disk.
#[derive(Default)]
struct CountingProducer {
    records: AtomicU64,
}

#[async_trait]
impl StreamProducer for CountingProducer {
    async fn put(&self, records: Vec<PutRecord>) -> Result<Vec<PutOutcome>, ProduceError> {
        let n = records.len();
        let first = self.records.fetch_add(n as u64, Ordering::Relaxed);
        Ok((0..n)
            .map(|i| PutOutcome::Stored {
                shard: "shardId-000000000000".into(),
                seq: (u128::from(first) + i as u128 + 1).into(),
            })
            .collect())
    }
}

struct Args {
    publishers: Vec<usize>,
    secs: u64,
    server_threads: usize,
}

fn args() -> Result<Args> {
    let mut a = Args {
        publishers: vec![4, 16],
        secs: 10,
        server_threads: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--publishers" => {
                a.publishers = value.split(',').map(str::parse).collect::<Result<_, _>>()?
            }
            "--secs" => a.secs = value.parse()?,
            "--server-threads" => a.server_threads = value.parse()?,
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

/// CPU seconds used so far by this process's threads whose name starts with
/// `prefix`, from /proc (Linux only).
fn thread_cpu_secs(prefix: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return f64::NAN;
    };
    let mut ticks = 0u64;
    for task in tasks.flatten() {
        let path = task.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
        // Fields after the parenthesised name: state is field 3, utime 14,
        // stime 15.
        if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
            ticks += field(14).unwrap_or(0) + field(15).unwrap_or(0);
        }
    }
    // USER_HZ is 100 on every Linux this runs on.
    ticks as f64 / 100.0
}

fn main() -> Result<()> {
    let args = args()?;
    println!("publishers  acked/s   server CPU  client CPU  mean batch  mean put latency");
    for &n in &args.publishers {
        run(n, &args)?;
    }
    Ok(())
}

fn run(publishers: usize, args: &Args) -> Result<()> {
    let server_rt = common::runtime("endpoint", args.server_threads)?;
    let client_rt = common::runtime("client", 2)?;

    let metrics = Arc::new(IngestMetrics::new());
    let producer = Arc::new(CountingProducer::default());
    let listener = server_rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = server_rt.spawn(serve(
        listener,
        producer,
        EndpointConfig::default(),
        metrics.clone(),
        async move {
            let _ = stop_rx.await;
        },
    ));

    let acked = Arc::new(AtomicU64::new(0));
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    for p in 0..publishers {
        let acked = acked.clone();
        let running = running.clone();
        client_rt.spawn(async move {
            let (client, mut eventloop, topic) = common::publisher(addr, &format!("dev-{p}"));
            tokio::spawn(common::publish_while(client, topic, running, |_| true));
            while let Ok(event) = eventloop.poll().await {
                if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = event {
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }

    // Warm up, then measure.
    std::thread::sleep(Duration::from_secs(1));
    let (a0, s0, c0, m0) = (
        acked.load(Ordering::Relaxed),
        thread_cpu_secs("endpoint"),
        thread_cpu_secs("client"),
        metrics.snapshot(),
    );
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(args.secs));
    let elapsed = t0.elapsed().as_secs_f64();
    let (a1, s1, c1, m1) = (
        acked.load(Ordering::Relaxed),
        thread_cpu_secs("endpoint"),
        thread_cpu_secs("client"),
        metrics.snapshot(),
    );
    running.store(false, Ordering::Relaxed);

    let appends = (m1.appends - m0.appends).max(1);
    let batch = (m1.records_appended - m0.records_appended) as f64 / appends as f64;
    let latency_ms = (m1.append_latency_sum - m0.append_latency_sum).as_secs_f64() * 1e3
        / (m1.append_latency_count - m0.append_latency_count).max(1) as f64;
    println!(
        "{publishers:>10}  {:>8.0}  {:>9.0}%  {:>9.0}%  {batch:>10.1}  {latency_ms:>13.3} ms",
        (a1 - a0) as f64 / elapsed,
        (s1 - s0) / elapsed * 100.0,
        (c1 - c0) / elapsed * 100.0,
    );
    if m1.rejected_total() > 0 {
        bail!("{} payloads were refused", m1.rejected_total());
    }

    let _ = stop_tx.send(());
    server_rt.block_on(server)??;
    client_rt.shutdown_timeout(Duration::from_secs(1));
    server_rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}
