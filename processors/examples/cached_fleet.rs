//! The processors' cost per reading at a fleet's shape, through the store the
//! embedded pipeline runs: `process_batch` over a `CachedStore<SqliteStore>`,
//! one reading per device per round, flushed every few rounds as the
//! flusher would.
//!
//! `cargo build --release --workspace --example cached_fleet`, then, for
//! instruction counts that do not depend on what else the machine runs:
//!
//! ```text
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out \
//!   target/release/examples/cached_fleet [devices] [rounds] [flush_every] [metrics] [batch]
//! ```
//!
//! The defaults are 19,000 devices, 20 rounds, a flush every 10 rounds (a
//! 10 s flush interval at one message per device per second), two metrics
//! and a round in one batch. A smaller `batch` splits each round into
//! batches of that many records, as a shard reading a live log sees them
//! (tens of records at a time), so the cost each batch pays once shows.
//! Before the measured rounds it runs one round and a flush, so every
//! device's items exist; the difference between two runs with
//! different `rounds` (multiples of `flush_every`) divided by the readings
//! between them is the cost per reading, flushes included.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use processors::metrics::ProcessorMetrics;
use processors::run::process_batch;
use processors::store::RollupStore;
use processors::store::cached::{CacheConfig, CachedStore};
use processors::store::sqlite::SqliteStore;
use rollup::AggregateConfig;
use testkit::batches::{FLEET_METRICS, fleet_round};

// The allocator iotpipe's binaries use.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SHARD: &str = "shard-0000";

fn arg(n: usize, default: usize) -> usize {
    std::env::args()
        .nth(n)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let devices = arg(1, 19_000);
    let rounds = arg(2, 20);
    let flush_every = arg(3, 10).max(1);
    let metrics = arg(4, 2).clamp(1, FLEET_METRICS.len());
    let batch = arg(5, devices).max(1);
    let cfg = AggregateConfig::default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Arc::new(SqliteStore::open(&dir.path().join("rollups.db")).unwrap());
    let store = CachedStore::new(sqlite, CacheConfig::default());
    let stats = ProcessorMetrics::default();

    let warm = fleet_round(devices, 0, metrics);
    rt.block_on(process_batch(SHARD, &warm, &store, &cfg, &stats))
        .unwrap();
    rt.block_on(store.flush()).unwrap();

    let (mut batches, mut flushes) = (Duration::ZERO, Duration::ZERO);
    let mut flushed = 0;
    for k in 1..=rounds as u64 {
        let records = fleet_round(devices, k, metrics);
        let started = Instant::now();
        for chunk in records.chunks(batch) {
            rt.block_on(process_batch(SHARD, chunk, &store, &cfg, &stats))
                .unwrap();
        }
        batches += started.elapsed();
        if k % flush_every as u64 == 0 {
            let started = Instant::now();
            flushed += rt.block_on(store.flush()).unwrap();
            flushes += started.elapsed();
        }
    }
    let readings = (devices * rounds) as f64;
    println!(
        "{devices} devices x {rounds} rounds, {metrics} metrics, batches of {batch}: batches {:.2} us/reading, \
         flushes {:.2} us/reading ({flushed} items flushed), {} items cached",
        batches.as_secs_f64() * 1e6 / readings,
        flushes.as_secs_f64() * 1e6 / readings,
        store.len(),
    );
}
