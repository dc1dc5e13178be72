//! Batches shaped like a busy shard's, for the core's benchmarks and its
//! instruction counts: the same records wherever the core is measured, so
//! figures from the two agree.

use bytes::Bytes;
use schemas::shard::Record;
use schemas::{Metric, PackedRecord, Reading};

/// The first reading's time: 2026-01-01T00:00:00Z.
pub const T0: i64 = 1_767_225_600_000;

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
