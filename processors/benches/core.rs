//! The aggregation core and the store backends, measured apart from I/O.
//!
//! `cargo bench -p processors --bench core`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use processors::store::RollupStore;
use processors::store::memory::MemoryStore;
use processors::store::sqlite::SqliteStore;
use rollup::AggregateConfig;
use rollup::aggregate::fold;
use rollup::keys::ItemKey;
use testkit::batches::{busy_shard, warm_busy_shard};

// The allocator iotpipe's binaries use: the core allocates per batch, and
// glibc's malloc costs several times more under this churn.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn bench_core(c: &mut Criterion) {
    let cfg = AggregateConfig::default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("core");
    for (name, records, per_record) in [
        ("1-reading records", 10_000, 1),
        ("20-reading records", 1_000, 20),
    ] {
        // A warm store: the windows exist, as in steady state.
        let (store, next) = warm_busy_shard(&rt, &cfg, records, per_record);
        let load = |keys: &[ItemKey]| rt.block_on(store.load(keys)).unwrap();
        g.throughput(Throughput::Elements((records * per_record) as u64));
        // Loads from memory included: the core needs two rounds of them.
        g.bench_function(format!("plan+load+apply, {name} (readings/s)"), |b| {
            b.iter(|| fold("shard-0000", &next, &cfg, load).unwrap())
        });
    }
    g.finish();
}

fn bench_store(c: &mut Criterion) {
    let cfg = AggregateConfig::default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let stores: Vec<(&str, Arc<dyn RollupStore>)> = vec![
        ("memory", Arc::new(MemoryStore::new())),
        (
            "sqlite",
            Arc::new(SqliteStore::open(&dir.path().join("bench.db")).unwrap()),
        ),
    ];
    let mut g = c.benchmark_group("store");
    g.sample_size(10);
    for (name, store) in stores {
        // Each batch of 2,000 records is two more of every device.
        let mut round = 0;
        // Each iteration folds a fresh batch into warm windows: load + commit.
        let probe = busy_shard(2_000, 1000, 1, 0);
        let writes = {
            let c = fold("shard-0000", &probe, &cfg, |keys| {
                rt.block_on(store.load(keys)).unwrap()
            })
            .unwrap()
            .commit;
            let n = c.len();
            rt.block_on(store.commit(c)).unwrap();
            n
        };
        g.throughput(Throughput::Elements(writes as u64));
        g.bench_function(format!("{name}: load+commit (items/s)"), |b| {
            b.iter(|| {
                round += 2;
                let records = busy_shard(2_000, 1000, 1, round);
                let c = fold("shard-0000", &records, &cfg, |keys| {
                    rt.block_on(store.load(keys)).unwrap()
                })
                .unwrap()
                .commit;
                rt.block_on(store.commit(c)).unwrap();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_core, bench_store);
criterion_main!(benches);
