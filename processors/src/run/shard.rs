//! The per-shard loop: read a batch, apply it with retries, checkpoint what
//! a flush made durable, and move the watermark of a shard with nothing to
//! read.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rollup::AggregateConfig;
use schemas::shard::Record;
use stream::ShardReader;
use tokio::sync::watch;

use super::{Durability, ProcessorConfig, advance_idle_watermark, process_batch, retry_delay};
use crate::metrics::{ProcessorMetrics, ShardLag};
use crate::store::RollupStore;

/// How often a shard with nothing to read moves its watermark to now.
const IDLE_WATERMARK_EVERY: Duration = Duration::from_secs(1);

/// Processes one shard until `shutdown` turns true, then drains what is left
/// in the shard and returns. Checkpoints only batches that a flush of the
/// store made durable (see [`Durability`]); [`super::run_flusher`] decides when.
pub async fn run_shard(
    mut reader: Box<dyn ShardReader>,
    store: Arc<dyn RollupStore>,
    aggregate_config: Arc<AggregateConfig>,
    processor_config: ProcessorConfig,
    metrics: Arc<ProcessorMetrics>,
    durability: Arc<Durability>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), stream::ReadError> {
    let shard = reader.shard_id().to_string();
    let lag = metrics.shard_lag(&shard);
    let mut draining = *shutdown.borrow();
    let mut read_retries = 0u32;
    // Batches applied but not yet checkpointed: their last record and the
    // durability mark taken after their commit, oldest first.
    let mut unflushed: VecDeque<(stream::SeqNo, u64)> = VecDeque::new();
    let mut idle_since = Instant::now();
    loop {
        let wait = if draining {
            Duration::ZERO
        } else {
            processor_config.poll_wait
        };
        let batch = tokio::select! {
            batch = reader.next_batch(processor_config.batch_max_records, wait) => batch,
            changed = shutdown.changed(), if !draining => {
                // A dropped sender means the process is going away: drain too.
                draining = changed.is_err() || *shutdown.borrow();
                continue;
            }
        };
        let batch = match batch {
            Ok(batch) => batch,
            Err(e @ stream::ReadError::Io(_)) => {
                // Throttling or a passing I/O error: nothing was consumed, so
                // waiting and reading again loses nothing.
                read_retries += 1;
                metrics.read_retries.fetch_add(1, Ordering::Relaxed);
                let backoff = retry_delay(&processor_config, read_retries);
                tracing::warn!(shard, error = %e, backoff_ms = backoff.as_millis() as u64, "Reading the shard failed; retrying.");
                tokio::time::sleep(backoff).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        read_retries = 0;
        record_lag(&lag, reader.as_ref(), &batch);
        match batch.last().map(|r| r.seq) {
            None => {
                if draining {
                    // Drained: make the rest durable now rather than wait for
                    // the flusher, which may already have stopped.
                    if let Some(&(seq, _)) = unflushed.back() {
                        durability
                            .flush(&shard, store.as_ref(), &processor_config, &metrics)
                            .await
                            .map_err(|e| stream::ReadError::Io(e.to_string()))?;
                        checkpoint(&shard, &mut reader, seq, &processor_config, &metrics).await?;
                    }
                    tracing::info!(shard, "Shard drained; processor stops.");
                    return Ok(());
                }
                if idle_since.elapsed() >= IDLE_WATERMARK_EVERY {
                    idle_since = Instant::now();
                    advance_idle(&shard, store.as_ref(), &aggregate_config).await;
                }
            }
            Some(last) => {
                apply_batch(
                    &shard,
                    &batch,
                    store.as_ref(),
                    &aggregate_config,
                    &processor_config,
                    &metrics,
                )
                .await?;
                unflushed.push_back((last, durability.mark()));
            }
        }
        // Idle or not, checkpoint what flushes have made durable since.
        checkpoint_flushed(
            &shard,
            &mut reader,
            &mut unflushed,
            &durability,
            &processor_config,
            &metrics,
        )
        .await?;
    }
}

/// Moves the watermark of a shard with nothing to read up to now; a failure
/// only leaves it for the next try.
async fn advance_idle(shard: &str, store: &dyn RollupStore, aggregate_config: &AggregateConfig) {
    let now = chrono::Utc::now().timestamp_millis();
    if let Err(e) = advance_idle_watermark(shard, store, aggregate_config, now).await {
        tracing::warn!(shard, error = %e, "Advancing an idle shard's watermark failed; will retry.");
    }
}

/// How far behind the shard is with `batch` read and not yet applied.
fn record_lag(lag: &ShardLag, reader: &dyn ShardReader, batch: &[Record]) {
    let behind = reader.lag();
    lag.records_behind.store(
        behind.records_behind + batch.len() as u64,
        Ordering::Relaxed,
    );
    let oldest = batch
        .first()
        .map(|r| r.arrival_ms)
        .or(behind.oldest_unread_arrival_ms);
    lag.oldest_unprocessed_ms
        .store(oldest.unwrap_or(0), Ordering::Relaxed);
}

/// [`process_batch`] until it succeeds or fails for good, with the batch's
/// timing and freshness recorded.
async fn apply_batch(
    shard: &str,
    batch: &[Record],
    store: &dyn RollupStore,
    aggregate_config: &AggregateConfig,
    processor_config: &ProcessorConfig,
    metrics: &ProcessorMetrics,
) -> Result<(), stream::ReadError> {
    let started = Instant::now();
    let mut backoff = processor_config.initial_backoff;
    loop {
        match process_batch(shard, batch, store, aggregate_config, metrics).await {
            Ok(_) => break,
            Err(e) if e.is_retryable() => {
                metrics.batch_retries.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(shard, error = %e, backoff_ms = backoff.as_millis() as u64, "Batch failed; retrying.");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(processor_config.max_backoff);
            }
            Err(e) => {
                // An unreadable stored item cannot heal by retrying; stop
                // this shard loudly rather than skip readings silently.
                tracing::error!(shard, error = %e, "Batch cannot be applied; the shard processor stops.");
                return Err(stream::ReadError::Io(e.to_string()));
            }
        }
    }
    metrics.batch_seconds.observe(started.elapsed());
    if let Some(first) = batch.first() {
        let now = chrono::Utc::now().timestamp_millis();
        metrics
            .freshness_seconds
            .observe(Duration::from_millis((now - first.arrival_ms).max(0) as u64));
    }
    Ok(())
}

/// Checkpoints the newest of `unflushed` that a flush has made durable, and
/// forgets every batch up to it.
async fn checkpoint_flushed(
    shard: &str,
    reader: &mut Box<dyn ShardReader>,
    unflushed: &mut VecDeque<(stream::SeqNo, u64)>,
    durability: &Durability,
    processor_config: &ProcessorConfig,
    metrics: &ProcessorMetrics,
) -> Result<(), stream::ReadError> {
    let mut newest = None;
    while let Some(&(seq, mark)) = unflushed.front() {
        if !durability.covers(mark) {
            break;
        }
        newest = Some(seq);
        unflushed.pop_front();
    }
    match newest {
        Some(seq) => checkpoint(shard, reader, seq, processor_config, metrics).await,
        None => Ok(()),
    }
}

/// Checkpoints `seq`, whose effects are durable already: a failed checkpoint
/// only means a restart would replay them, which the store absorbs. Retried
/// anyway, so that the replay stays short.
async fn checkpoint(
    shard: &str,
    reader: &mut Box<dyn ShardReader>,
    seq: stream::SeqNo,
    processor_config: &ProcessorConfig,
    metrics: &ProcessorMetrics,
) -> Result<(), stream::ReadError> {
    let mut attempt = 0u32;
    while let Err(e) = reader.checkpoint(seq).await {
        match e {
            stream::ReadError::Io(_) if attempt < 10 => {
                attempt += 1;
                metrics.read_retries.fetch_add(1, Ordering::Relaxed);
                let backoff = retry_delay(processor_config, attempt);
                tracing::warn!(shard, error = %e, backoff_ms = backoff.as_millis() as u64, "Checkpoint failed; retrying.");
                tokio::time::sleep(backoff).await;
            }
            other => return Err(other),
        }
    }
    Ok(())
}
