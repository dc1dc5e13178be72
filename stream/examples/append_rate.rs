//! Append rate of the embedded log with 100-byte records: calls of 1 and of
//! 1000 records from one task, and 64 tasks putting 1 record per call (the
//! case group commit is for).
//!
//! ```text
//! cargo run --release -p stream --example append_rate -- [DIR] [SECONDS]
//! ```
//!
//! DIR defaults to a temporary directory under the current one (so the
//! numbers are for the disk the project lives on, not a tmpfs); SECONDS is
//! the length of each run (default 3).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use stream::embedded::{EmbeddedConfig, EmbeddedLog};
use stream::{PutOutcome, PutRecord, StreamProducer};

const RECORD_BYTES: usize = 100;
const DEVICES: usize = 10_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let base = args.next().unwrap_or_else(|| ".".to_owned());
    let seconds: f64 = match args.next() {
        Some(s) => s.parse().context("SECONDS must be a number")?,
        None => 3.0,
    };
    let run_for = Duration::from_secs_f64(seconds);
    let scratch =
        tempfile::tempdir_in(&base).with_context(|| format!("creating a directory in {base}"))?;
    println!(
        "embedded log, {RECORD_BYTES}-byte records, 4 shards, {seconds} s per run, in {}",
        scratch.path().display()
    );
    println!(
        "{:<44} {:>12} {:>10} {:>10} {:>10}",
        "run", "records/s", "p50 ms", "p99 ms", "max ms"
    );

    for sync in [true, false] {
        let label = if sync { "sync" } else { "no sync" };
        run(
            scratch.path(),
            &format!("{label}: 1 task, 1 record per call"),
            sync,
            1,
            1,
            run_for,
        )
        .await?;
        run(
            scratch.path(),
            &format!("{label}: 1 task, 1000 records per call"),
            sync,
            1,
            1000,
            run_for,
        )
        .await?;
        run(
            scratch.path(),
            &format!("{label}: 64 tasks, 1 record per call"),
            sync,
            64,
            1,
            run_for,
        )
        .await?;
        run(
            scratch.path(),
            &format!("{label}: 64 tasks, 100 records per call"),
            sync,
            64,
            100,
            run_for,
        )
        .await?;
    }
    Ok(())
}

/// Puts `per_call` records per call from `tasks` tasks for `run_for`, into a
/// fresh log, and prints the rate and the latency of a `put` call.
async fn run(
    scratch: &Path,
    label: &str,
    sync: bool,
    tasks: usize,
    per_call: usize,
    run_for: Duration,
) -> anyhow::Result<()> {
    let dir = scratch.join(format!("log-{}", label.replace([' ', ':', ','], "-")));
    let config = EmbeddedConfig {
        sync,
        ..EmbeddedConfig::default()
    };
    let log = EmbeddedLog::open(&dir, config)?;
    let payload = Bytes::from(vec![b'x'; RECORD_BYTES]);
    let started = Instant::now();
    let deadline = started + run_for;
    let mut handles = Vec::new();
    for t in 0..tasks {
        let log = Arc::clone(&log);
        let payload = payload.clone();
        handles.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = t;
            while Instant::now() < deadline {
                let records: Vec<PutRecord> = (0..per_call)
                    .map(|i| PutRecord {
                        partition_key: format!("dev-{}", (n + i * 7919) % DEVICES),
                        data: payload.clone(),
                    })
                    .collect();
                n += tasks;
                let call = Instant::now();
                let outcomes = log.put(records).await?;
                latencies.push(call.elapsed());
                if let Some(PutOutcome::Failed { message, .. }) = outcomes
                    .iter()
                    .find(|o| matches!(o, PutOutcome::Failed { .. }))
                {
                    bail!("a record failed: {message}");
                }
            }
            Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for handle in handles {
        latencies.extend(handle.await??);
    }
    let elapsed = started.elapsed();
    log.close().await?;
    drop(log);
    std::fs::remove_dir_all(&dir)?;

    latencies.sort();
    let records = latencies.len() * per_call;
    let at = |q: f64| {
        let i = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i].as_secs_f64() * 1000.0
    };
    println!(
        "{label:<44} {:>12.0} {:>10.3} {:>10.3} {:>10.3}",
        records as f64 / elapsed.as_secs_f64(),
        at(0.50),
        at(0.99),
        at(1.0)
    );
    Ok(())
}
