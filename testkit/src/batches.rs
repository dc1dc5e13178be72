//! Batches shaped like a busy shard's, for the core's benchmarks and its
//! instruction counts: the same records wherever the core is measured, so
//! figures from the two agree. [`fleet_round`] is the other shape measured:
//! a whole fleet's one reading each, as the store's flush sees it.

use bytes::Bytes;
use processors::store::RollupStore;
use processors::store::memory::MemoryStore;
use rollup::AggregateConfig;
use rollup::aggregate::fold;
use schemas::shard::Record;
use schemas::{Metric, PackedRecord, Reading};

/// The first reading's time: 2026-01-01T00:00:00Z.
pub const T0: i64 = 1_767_225_600_000;

/// `readings` as the stream carries them: one packed record, `seq` in its
/// shard, arriving when it was received.
pub fn packed(seq: u64, readings: PackedRecord) -> Record {
    Record {
        seq: u128::from(seq).into(),
        partition_key: readings.device_id.clone(),
        arrival_ms: readings.received_at,
        data: Bytes::from(readings.encode()),
    }
}

/// One record holding one reading of metric `t` by `device`: `seq` is its
/// sequence number in the shard and the device's, and it was received
/// 10 ms after `ts`. The shape the API's and retention's tests build on.
pub fn one_reading(seq: u64, device: &str, fleet: &str, ts: i64, value: f64) -> Record {
    one_reading_received(seq, device, fleet, ts, value, ts + 10)
}

/// [`one_reading`], received at `received_at`: after its window's end, a
/// late reading.
pub fn one_reading_received(
    seq: u64,
    device: &str,
    fleet: &str,
    ts: i64,
    value: f64,
    received_at: i64,
) -> Record {
    packed(
        seq,
        PackedRecord {
            device_id: device.into(),
            fleet: fleet.into(),
            received_at,
            readings: vec![Reading {
                seq: Some(seq),
                ts,
                metrics: vec![Metric {
                    name: "t".into(),
                    value,
                }],
            }],
        },
    )
}

/// `records` packed records from `devices` devices, `per_record` readings
/// each at two metrics, 50 ms apart, received on time. `round` says how
/// many records of each device came before, so round `n + k` continues
/// round `n`'s windows (warm, as in steady state) with fresh readings.
pub fn busy_shard(records: usize, devices: usize, per_record: usize, round: usize) -> Vec<Record> {
    (0..records)
        .map(|i| {
            let device = format!("dev-{:05}", i % devices);
            let base = (round + i / devices) * per_record;
            let readings: Vec<Reading> = (0..per_record)
                .map(|k| reading((base + k) as u64))
                .collect();
            let data = PackedRecord {
                device_id: device.clone(),
                fleet: "bench".into(),
                // Received just after its last reading: on time, not late.
                received_at: readings.last().map_or(T0, |r| r.ts + 20),
                readings,
            }
            .encode();
            Record {
                seq: ((round * devices + i + 1) as u64).into(),
                partition_key: device,
                data: Bytes::from(data),
                arrival_ms: T0,
            }
        })
        .collect()
}

/// A store that already holds round 0 of [`busy_shard`] (the windows exist,
/// as in steady state), and the round after it, to measure against it.
///
/// # Panics
/// If the core or the memory store fails: a benchmark has nothing to
/// measure then.
#[allow(clippy::expect_used)]
pub fn warm_busy_shard(
    rt: &tokio::runtime::Runtime,
    cfg: &AggregateConfig,
    records: usize,
    per_record: usize,
) -> (MemoryStore, Vec<Record>) {
    let store = MemoryStore::new();
    let warm = busy_shard(records, 1000, per_record, 0);
    let warmed = fold("shard-0000", &warm, cfg, |keys| {
        rt.block_on(store.load(keys)).expect("memory store load")
    })
    .expect("core folds the warm-up round");
    rt.block_on(store.commit(warmed.commit))
        .expect("memory store commit");
    let next = busy_shard(records, 1000, per_record, records / 1000);
    (store, next)
}

/// The metric names [`fleet_round`] takes its first `metrics` from.
pub const FLEET_METRICS: [&str; 3] = ["temperature", "humidity", "battery"];

/// One record per device of a fleet of `devices` (`fleet-d00000`, …), each
/// holding the device's `k`-th reading, one second after its previous one,
/// at the first `metrics` of [`FLEET_METRICS`], received on time.
pub fn fleet_round(devices: usize, k: u64, metrics: usize) -> Vec<Record> {
    (0..devices)
        .map(|i| {
            let device = format!("fleet-d{i:05}");
            let ts = T0 + k as i64 * 1000 + i as i64 % 1000;
            let reading = Reading {
                seq: Some(k),
                ts,
                metrics: FLEET_METRICS[..metrics]
                    .iter()
                    .enumerate()
                    .map(|(m, name)| Metric {
                        name: (*name).into(),
                        value: 20.0 + ((i + m) % 17) as f64 * 0.1 + k as f64,
                    })
                    .collect(),
            };
            packed(
                k * devices as u64 + i as u64 + 1,
                PackedRecord {
                    device_id: device,
                    fleet: "fleet".into(),
                    received_at: ts + 20,
                    readings: vec![reading],
                },
            )
        })
        .collect()
}

fn reading(seq: u64) -> Reading {
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
}
