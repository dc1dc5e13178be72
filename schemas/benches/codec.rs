//! Payload decoding and packed-record coding.
//!
//! `cargo bench -p schemas --bench codec`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use schemas::{PackedRecord, decode_payload, decode_record};

fn single() -> Vec<u8> {
    br#"{"seq": 42, "ts": 1767225600123, "metrics": {"temperature": 21.5, "humidity": 40.25}}"#
        .to_vec()
}

fn batch(n: usize) -> Vec<u8> {
    let readings: Vec<String> = (0..n)
        .map(|i| format!(r#"{{"seq": {i}, "ts": {}, "metrics": {{"temperature": 21.{i}, "humidity": 40.25}}}}"#, 1_767_225_600_000i64 + i as i64 * 50))
        .collect();
    format!(r#"{{"readings": [{}]}}"#, readings.join(",")).into_bytes()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("payload");
    let one = single();
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode single reading (readings/s)", |b| {
        b.iter(|| decode_payload(&one).unwrap())
    });
    let twenty = batch(20);
    g.throughput(Throughput::Elements(20));
    g.bench_function("decode 20-reading batch (readings/s)", |b| {
        b.iter(|| decode_payload(&twenty).unwrap())
    });
    g.finish();

    let mut g = c.benchmark_group("packed");
    for (name, payload, n) in [("1 reading", one, 1u64), ("20 readings", twenty, 20)] {
        let record = PackedRecord {
            device_id: "dev-00042".into(),
            fleet: "bench".into(),
            received_at: 1_767_225_601_000,
            readings: decode_payload(&payload).unwrap(),
        };
        let bytes = record.encode();
        g.throughput(Throughput::Elements(n));
        g.bench_function(format!("encode {name} (readings/s)"), |b| {
            b.iter(|| record.encode())
        });
        g.bench_function(format!("decode {name} (readings/s)"), |b| {
            b.iter(|| decode_record(&bytes).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
