//! The `aggregate` function: a Kinesis event in, per-record failures out.
//!
//! The event source mapping hands over a batch of one shard. The handler
//! folds it into the store with [`process_batch`], the same function the
//! local loop calls, and reports success only once that returned, i.e. once
//! every write is durable. On a store failure it names the batch's first
//! record in `batchItemFailures`: Lambda then keeps the shard's checkpoint
//! before it and retries from there, and the applied marks make the retry
//! exact. Bad records never fail a batch: the core counts and dead-letters
//! them like any refused message.
//!
//! Every invocation prints one CloudWatch Embedded Metric Format line (see
//! [`super::emf`]) with the figures `/metrics` shows for the local loop.

use std::sync::Arc;
use std::time::Instant;

use aws_lambda_events::event::kinesis::{KinesisEvent, KinesisEventRecord};
use aws_lambda_events::event::streams::KinesisEventResponse;
use bytes::Bytes;
use rollup::AggregateConfig;
use schemas::shard::Record;

use super::Handler;
use super::emf::{self, EmfConfig, Invocation};
use crate::metrics::ProcessorMetrics;
use crate::run::process_batch;
use crate::store::RollupStore;

/// What the handler works with; built once per process.
#[derive(Clone)]
pub struct AggregateHandler {
    pub store: Arc<dyn RollupStore>,
    pub config: Arc<AggregateConfig>,
    /// Where the per-invocation metrics line says it belongs.
    pub emf: Arc<EmfConfig>,
}

/// The shard a record came from: its event id is `{shard id}:{sequence
/// number}`; the source ARN names only the stream.
pub fn shard_of(record: &KinesisEventRecord) -> &str {
    record
        .event_id
        .as_deref()
        .and_then(|id| id.split_once(':'))
        .map(|(shard, _)| shard)
        .unwrap_or("shardId-unknown")
}

impl AggregateHandler {
    pub fn new(store: Arc<dyn RollupStore>, config: AggregateConfig) -> Self {
        AggregateHandler {
            store,
            config: Arc::new(config),
            emf: Arc::new(EmfConfig::default()),
        }
    }

    /// Names the namespace and function the metrics line reports under.
    pub fn with_emf(mut self, emf: EmfConfig) -> Self {
        self.emf = Arc::new(emf);
        self
    }

    /// Processes one event; never fails as a whole, so that Lambda retries
    /// exactly from the reported record rather than the whole batch. Returns
    /// what the invocation did alongside the response.
    pub async fn process(&self, event: &KinesisEvent) -> (KinesisEventResponse, Invocation) {
        let started = Instant::now();
        let mut response = KinesisEventResponse::default();
        // Records of a shard stay in order; a batch holds one shard, but
        // grouping costs nothing and keeps the handler honest if it does not.
        let mut groups: Vec<(&str, Vec<&KinesisEventRecord>)> = Vec::new();
        for record in &event.records {
            let shard = shard_of(record);
            match groups.iter_mut().find(|(s, _)| *s == shard) {
                Some((_, records)) => records.push(record),
                None => groups.push((shard, vec![record])),
            }
        }
        let mut inv = Invocation {
            oldest_arrival_ms: event.records.iter().map(arrival_ms).min(),
            ..Invocation::default()
        };
        for (shard, records) in groups {
            match self.process_shard(shard, &records, &inv.metrics).await {
                Some(failed) => {
                    inv.failed_shards += 1;
                    response.add_failure(failed);
                }
                None => {
                    if let Some(oldest) = records.iter().map(|r| arrival_ms(r)).min() {
                        let so_far = inv.oldest_applied_ms.unwrap_or(oldest);
                        inv.oldest_applied_ms = Some(so_far.min(oldest));
                    }
                }
            }
        }
        inv.duration = started.elapsed();
        (response, inv)
    }

    /// Folds one shard's records in; returns the sequence number to report
    /// failed, if any: the first record whose effect is not durable.
    async fn process_shard(
        &self,
        shard: &str,
        records: &[&KinesisEventRecord],
        metrics: &ProcessorMetrics,
    ) -> Option<String> {
        let mut batch = Vec::with_capacity(records.len());
        let mut unreadable = None;
        for r in records {
            match aws::seq::parse(&r.kinesis.sequence_number) {
                Ok(seq) => batch.push(Record {
                    seq,
                    partition_key: r.kinesis.partition_key.clone(),
                    data: Bytes::from(r.kinesis.data.0.clone()),
                    arrival_ms: arrival_ms(r),
                }),
                Err(e) => {
                    // Without a position the record cannot be applied
                    // exactly once; stop before it and say so loudly.
                    tracing::error!(shard, error = %e, "A record's sequence number cannot be represented; the shard stops before it.");
                    unreadable = Some(r.kinesis.sequence_number.clone());
                    break;
                }
            }
        }
        if batch.is_empty() {
            return unreadable;
        }
        match process_batch(shard, &batch, self.store.as_ref(), &self.config, metrics).await {
            Ok(stats) => {
                tracing::info!(
                    shard,
                    records = stats.records,
                    accepted = stats.accepted_readings,
                    duplicate = stats.duplicate_readings,
                    late = stats.late_readings,
                    replayed = stats.replayed_readings,
                    "Batch applied."
                );
                unreadable
            }
            Err(e) => {
                tracing::warn!(shard, error = %e, "Batch not applied; Lambda retries it from its first record.");
                records.first().map(|r| r.kinesis.sequence_number.clone())
            }
        }
    }
}

impl Handler for AggregateHandler {
    type Event = KinesisEvent;
    type Response = KinesisEventResponse;

    /// Processes one event and prints its metrics line to stdout, where
    /// CloudWatch Logs picks it up.
    async fn handle(&self, event: KinesisEvent) -> KinesisEventResponse {
        let started_ms = now_ms();
        let (response, invocation) = self.process(&event).await;
        println!(
            "{}",
            emf::line(&self.emf, &invocation, started_ms, now_ms())
        );
        response
    }
}

/// When Kinesis received the record, ms since the epoch.
fn arrival_ms(r: &KinesisEventRecord) -> i64 {
    r.kinesis.approximate_arrival_timestamp.0.timestamp_millis()
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use schemas::{Metric, PackedRecord, Reading};
    use serde_json::{Value, json};

    use super::*;
    use crate::store::memory::MemoryStore;

    /// A minute boundary: 2025-11-27T10:40:00Z.
    const T0: i64 = 1_764_240_000_000;

    fn event_record(n: u64, data: &[u8], arrival_ms: i64) -> Value {
        let seq = (49_655_000_000_000_000_000_000_000_000_000_000_000u128 + n as u128).to_string();
        // A JSON value, so the test kit's copy of this crate's types never
        // meets this one's.
        testkit::lambda::kinesis_event_record(
            "shardId-000000000000",
            &seq,
            "dev-1",
            data,
            arrival_ms,
        )
    }

    #[tokio::test]
    async fn an_invocation_reports_what_it_did() {
        let reading = |seq: u64| Reading {
            seq: Some(seq),
            ts: T0 + seq as i64 * 1000,
            metrics: vec![Metric {
                name: "temperature".into(),
                value: 20.0 + seq as f64,
            }],
        };
        let packed = PackedRecord {
            device_id: "dev-1".into(),
            fleet: "f".into(),
            received_at: T0 + 5_000,
            readings: vec![reading(1), reading(2), reading(3)],
        }
        .encode();
        let event: KinesisEvent = serde_json::from_value(json!({
            "Records": [
                event_record(1, &packed, T0 + 5_000),
                event_record(2, b"\x00not a record", T0 + 6_000),
                // The same record again, as a retried put delivers it.
                event_record(3, &packed, T0 + 7_000),
            ]
        }))
        .unwrap();
        let handler =
            AggregateHandler::new(Arc::new(MemoryStore::new()), AggregateConfig::default());
        let (response, inv) = handler.process(&event).await;
        assert!(response.batch_item_failures.is_empty());
        let m = &inv.metrics;
        assert_eq!(m.records.load(std::sync::atomic::Ordering::Relaxed), 3);
        assert_eq!(
            m.readings_accepted
                .load(std::sync::atomic::Ordering::Relaxed),
            3
        );
        assert_eq!(
            m.readings_duplicate
                .load(std::sync::atomic::Ordering::Relaxed),
            3
        );
        assert_eq!(
            m.rejected[schemas::RejectReason::BadRecord.index()]
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        assert_eq!(inv.oldest_arrival_ms, Some(T0 + 5_000));
        assert_eq!(inv.oldest_applied_ms, Some(T0 + 5_000));
        assert_eq!(inv.failed_shards, 0);
        assert_eq!(m.store_write_seconds.count(), 1);

        let v: Value = serde_json::from_str(&emf::line(
            &EmfConfig::default(),
            &inv,
            T0 + 8_000,
            T0 + 8_250,
        ))
        .unwrap();
        assert_eq!(v["Records"], 3.0);
        assert_eq!(v["Rejected_bad_record"], 1.0);
        assert_eq!(v["IteratorAge"], 3_000.0);
        assert_eq!(v["Freshness"], 3_250.0);
    }
}
