//! Instructions per reading of the aggregation core, for use under
//! `valgrind --tool=callgrind`, whose counts do not depend on what else the
//! machine is doing (unlike a timed benchmark on a shared 2-core machine).
//!
//! `cargo build --release -p processors --example core_cost &&
//!  valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out \
//!    target/release/examples/core_cost 20 && callgrind_annotate /tmp/cg.out | head`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use processors::store::RollupStore;
use processors::store::memory::MemoryStore;
use rollup::AggregateConfig;
use rollup::aggregate::fold;
use rollup::keys::ItemKey;
use schemas::shard::Record;
use schemas::{Metric, PackedRecord, Reading};

// The allocator iotpipe's binaries use: the core allocates per batch, and
// glibc's malloc costs several times more under this churn.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const T0: i64 = 1_767_225_600_000;

fn batch(records: usize, devices: usize, per_record: usize, first: usize) -> Vec<Record> {
    (0..records)
        .map(|i| {
            let device = format!("dev-{:05}", i % devices);
            let base = (first + i / devices) * per_record;
            let readings: Vec<Reading> = (0..per_record)
                .map(|k| {
                    let seq = (base + k) as u64;
                    Reading {
                        seq: Some(seq),
                        ts: T0 + seq as i64 * 50,
                        metrics: vec![
                            Metric {
                                name: "temperature".into(),
                                value: 20.0 + (seq % 17) as f64 * 0.1,
                            },
                            Metric {
                                name: "humidity".into(),
                                value: 40.0 + (seq % 13) as f64,
                            },
                        ],
                    }
                })
                .collect();
            let received_at = readings.last().map_or(T0, |r| r.ts + 20);
            let data = PackedRecord {
                device_id: device.clone(),
                fleet: "bench".into(),
                received_at,
                readings,
            }
            .encode();
            Record {
                seq: ((first * devices + i + 1) as u64).into(),
                partition_key: device,
                data: Bytes::from(data),
                arrival_ms: T0,
            }
        })
        .collect()
}

fn main() {
    let per_record: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1);
    let records = 20_000 / per_record;
    let cfg = AggregateConfig::default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let store = MemoryStore::new();
    let warm = batch(records, 1000, per_record, 0);
    let load = |keys: &[ItemKey]| rt.block_on(store.load(keys)).unwrap();
    let warmed = fold("shard-0000", &warm, &cfg, load).unwrap();
    rt.block_on(store.commit(warmed.commit)).unwrap();
    let next = batch(records, 1000, per_record, records / 1000);
    let started = std::time::Instant::now();
    let out = fold("shard-0000", &next, &cfg, load).unwrap();
    let elapsed = started.elapsed();
    println!(
        "{} readings in {} records, {} writes, {:?} ({:.0} readings/s)",
        records * per_record,
        records,
        out.commit.len(),
        elapsed,
        (records * per_record) as f64 / elapsed.as_secs_f64()
    );
}
