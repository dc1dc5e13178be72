//! Rows per second of one write-behind flush into SQLite, at fleet shape:
//! every device has one new reading, so every one of its items is rewritten.
//! The items come from the aggregation core itself, so their sizes are real.
//!
//! `cargo run --release -p processors --example sqlite_flush -- [rows]`
//!
//! Prints, for a first flush (every row inserted) and a second one (every row
//! updated under its version condition, what a running pipeline does), the
//! rows, the time of the one transaction, rows per second and the bytes the
//! flush added to the database and its write-ahead log.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Instant;

use processors::store::RollupStore;
use processors::store::memory::MemoryStore;
use processors::store::sqlite::SqliteStore;
use rollup::aggregate::fold;
use rollup::{AggregateConfig, Commit};
use schemas::shard::Record;
use testkit::batches::fleet_round;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SHARD: &str = "shard-0000";

/// The commit the core makes for `records` against `memory`, which it then
/// also applies to `memory`, so that the next one is conditional on it.
fn core_commit(
    rt: &tokio::runtime::Runtime,
    memory: &MemoryStore,
    records: &[Record],
    cfg: &AggregateConfig,
) -> Commit {
    let commit = fold(SHARD, records, cfg, |keys| {
        rt.block_on(memory.load(keys)).unwrap()
    })
    .unwrap()
    .commit;
    rt.block_on(memory.commit(commit.clone())).unwrap();
    commit
}

fn disk_bytes(db: &Path) -> u64 {
    let wal = db.with_extension("db-wal");
    [db, wal.as_path()]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

fn timed_flush(
    rt: &tokio::runtime::Runtime,
    store: &SqliteStore,
    db: &Path,
    what: &str,
    c: Commit,
) {
    let rows = c.len();
    let before = disk_bytes(db);
    let started = Instant::now();
    rt.block_on(store.commit(c)).unwrap();
    let elapsed = started.elapsed();
    println!(
        "{what}: {rows} rows in one transaction, {:.0} ms, {:.0} rows/s, file growth {:.1} MB",
        elapsed.as_secs_f64() * 1e3,
        rows as f64 / elapsed.as_secs_f64(),
        disk_bytes(db).saturating_sub(before) as f64 / 1e6,
    );
}

fn main() {
    let rows: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200_000);
    let cfg = AggregateConfig::default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    // Nine items per device and reading: six windows, the dedup set, the
    // latest values and the fleet membership (written once).
    let devices = rows.div_ceil(9);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("rollups.db");
    let store = SqliteStore::open(&db).unwrap();
    let memory = MemoryStore::new();
    let first = core_commit(&rt, &memory, &fleet_round(devices, 0, 2), &cfg);
    let second = core_commit(&rt, &memory, &fleet_round(devices, 1, 2), &cfg);
    timed_flush(&rt, &store, &db, "insert", first);
    timed_flush(&rt, &store, &db, "update", second);
}
