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

use std::sync::Arc;

use aws_lambda_events::event::kinesis::{KinesisEvent, KinesisEventRecord};
use aws_lambda_events::event::streams::KinesisEventResponse;
use bytes::Bytes;
use lambda_runtime::{LambdaEvent, service_fn};
use stream::Record;
use stream::kinesis::seq;

use crate::config::AggregateConfig;
use crate::metrics::ProcessorMetrics;
use crate::run::process_batch;
use crate::store::RollupStore;

/// What the handler works with; built once per process.
#[derive(Clone)]
pub struct AggregateHandler {
    pub store: Arc<dyn RollupStore>,
    pub cfg: Arc<AggregateConfig>,
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
    pub fn new(store: Arc<dyn RollupStore>, cfg: AggregateConfig) -> Self {
        AggregateHandler {
            store,
            cfg: Arc::new(cfg),
        }
    }

    /// Processes one event; never fails as a whole, so that Lambda retries
    /// exactly from the reported record rather than the whole batch.
    pub async fn handle(&self, event: KinesisEvent) -> KinesisEventResponse {
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
        let metrics = ProcessorMetrics::default();
        for (shard, records) in groups {
            if let Some(failed) = self.process_shard(shard, &records, &metrics).await {
                response.add_failure(failed);
            }
        }
        response
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
            match seq::parse(&r.kinesis.sequence_number) {
                Ok(seq) => batch.push(Record {
                    seq,
                    partition_key: r.kinesis.partition_key.clone(),
                    data: Bytes::from(r.kinesis.data.0.clone()),
                    arrival_ms: r.kinesis.approximate_arrival_timestamp.0.timestamp_millis(),
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
        match process_batch(shard, &batch, self.store.as_ref(), &self.cfg, metrics).await {
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

/// Runs the function: serves Kinesis events until the runtime stops.
pub async fn run(handler: AggregateHandler) -> Result<(), lambda_runtime::Error> {
    let handler = Arc::new(handler);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<KinesisEvent>| {
        let handler = handler.clone();
        async move { Ok::<_, lambda_runtime::Error>(handler.handle(event.payload).await) }
    }))
    .await
}
