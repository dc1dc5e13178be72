//! The local processor loop: a thin shell around the core, one task per shard.
//!
//! It reads a batch, folds it into the store with [`process_batch`] (the same
//! function the Lambda handler calls), and only then checkpoints.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rollup::AggregateConfig;
use rollup::aggregate::{self, ApplyError, BatchStats};
use schemas::shard::Record;
use stream::ShardReader;
use tokio::sync::watch;

use crate::metrics::ProcessorMetrics;
use crate::store::{RollupStore, StoreError};

/// How a processor reads and retries.
#[derive(Debug, Clone)]
pub struct ProcessorConfig {
    /// Most records per batch; bigger batches pre-aggregate more.
    pub batch_max_records: usize,
    /// How long a read waits for the first record before looking at shutdown.
    pub poll_wait: Duration,
    /// First retry delay after a store error; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// How often applied batches are flushed and checkpointed. Longer means
    /// fewer store writes with a write-behind store, and a longer replay
    /// after a crash.
    pub flush_interval: Duration,
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        ProcessorConfig {
            batch_max_records: 10_000,
            poll_wait: Duration::from_millis(250),
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_secs(5),
            flush_interval: Duration::from_secs(1),
        }
    }
}

/// Why a batch was not applied.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The core refused the loaded items; see [`ApplyError`].
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

impl BatchError {
    /// Whether retrying the batch from a fresh load may succeed: a store that
    /// was unavailable may come back, an item the core cannot read will not.
    pub fn is_retryable(&self) -> bool {
        match self {
            BatchError::Store(e) => e.is_retryable(),
            BatchError::Apply(_) => false,
        }
    }
}

/// Folds one batch of one shard into the store: plan, load, apply, commit.
/// A conflict (someone else wrote an item) reloads and tries again once;
/// other errors go back to the caller, which retries the whole batch: a
/// partial commit is safe to retry because every item remembers what it holds.
pub async fn process_batch(
    shard: &str,
    records: &[Record],
    store: &dyn RollupStore,
    cfg: &AggregateConfig,
    metrics: &ProcessorMetrics,
) -> Result<BatchStats, BatchError> {
    let mut conflicts = 0;
    loop {
        let plan = aggregate::plan(shard, records, cfg);
        let loaded = store.load(plan.keys()).await?;
        let applied = aggregate::apply(plan, loaded, cfg)?;
        let writes = applied.commit.len();
        let started = Instant::now();
        match store.commit(applied.commit).await {
            Ok(()) => {
                metrics.store_write_seconds.observe(started.elapsed());
                metrics.record_batch(&applied.stats, writes);
                return Ok(applied.stats);
            }
            Err(StoreError::Conflict(key)) if conflicts < 1 => {
                conflicts += 1;
                tracing::warn!(
                    shard,
                    key,
                    "A conditional write failed; reloading the batch."
                );
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Processes one shard until `shutdown` turns true, then drains what is left
/// in the shard and returns. Checkpoints only after the store has flushed
/// the batches it covers.
pub async fn run_shard(
    mut reader: Box<dyn ShardReader>,
    store: Arc<dyn RollupStore>,
    cfg: Arc<AggregateConfig>,
    pcfg: ProcessorConfig,
    metrics: Arc<ProcessorMetrics>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), stream::ReadError> {
    let shard = reader.shard_id().to_string();
    let lag = metrics.shard_lag(&shard);
    let mut draining = *shutdown.borrow();
    let mut read_retries = 0u32;
    // The last record applied but not yet checkpointed, and when the store
    // was last flushed.
    let mut pending: Option<stream::SeqNo> = None;
    let mut last_flush = Instant::now();
    loop {
        let wait = if draining {
            Duration::ZERO
        } else {
            pcfg.poll_wait
        };
        let batch = tokio::select! {
            batch = reader.next_batch(pcfg.batch_max_records, wait) => batch,
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
                metrics
                    .read_retries
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let backoff = retry_delay(&pcfg, read_retries);
                tracing::warn!(shard, error = %e, backoff_ms = backoff.as_millis() as u64, "Reading the shard failed; retrying.");
                tokio::time::sleep(backoff).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        read_retries = 0;
        let behind = reader.lag();
        lag.records_behind.store(
            behind.records_behind + batch.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        let oldest = batch
            .first()
            .map(|r| r.arrival_ms)
            .or(behind.oldest_unread_arrival_ms);
        lag.oldest_unprocessed_ms
            .store(oldest.unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
        let Some(last) = batch.last().map(|r| r.seq) else {
            // Nothing new: a good moment to make what is applied durable.
            if let Some(seq) = pending.take() {
                durable(&shard, &mut reader, store.as_ref(), seq, &pcfg, &metrics).await?;
                last_flush = Instant::now();
            }
            if draining {
                tracing::info!(shard, "Shard drained; processor stops.");
                return Ok(());
            }
            continue;
        };
        let started = Instant::now();
        let mut backoff = pcfg.initial_backoff;
        loop {
            match process_batch(&shard, &batch, store.as_ref(), &cfg, &metrics).await {
                Ok(_) => break,
                Err(e) if e.is_retryable() => {
                    metrics
                        .batch_retries
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(shard, error = %e, backoff_ms = backoff.as_millis() as u64, "Batch failed; retrying.");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(pcfg.max_backoff);
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
        pending = Some(last);
        if last_flush.elapsed() >= pcfg.flush_interval {
            if let Some(seq) = pending.take() {
                durable(&shard, &mut reader, store.as_ref(), seq, &pcfg, &metrics).await?;
            }
            last_flush = Instant::now();
        }
    }
}

/// Flushes the store, then checkpoints `seq`: the checkpoint must never pass
/// an effect that a crash could still lose.
async fn durable(
    shard: &str,
    reader: &mut Box<dyn ShardReader>,
    store: &dyn RollupStore,
    seq: stream::SeqNo,
    pcfg: &ProcessorConfig,
    metrics: &ProcessorMetrics,
) -> Result<(), stream::ReadError> {
    let mut attempt = 0u32;
    loop {
        let started = Instant::now();
        match store.flush().await {
            Ok(written) => {
                metrics.flush_seconds.observe(started.elapsed());
                metrics
                    .store_flushed
                    .fetch_add(written as u64, std::sync::atomic::Ordering::Relaxed);
                break;
            }
            Err(e) if e.is_retryable() => {
                attempt += 1;
                metrics
                    .batch_retries
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let backoff = retry_delay(pcfg, attempt);
                tracing::warn!(shard, error = %e, backoff_ms = backoff.as_millis() as u64, "Flushing the store failed; retrying.");
                tokio::time::sleep(backoff).await;
            }
            Err(e) => {
                tracing::error!(shard, error = %e, "The store cannot be flushed; the shard processor stops.");
                return Err(stream::ReadError::Io(e.to_string()));
            }
        }
    }
    // The effects are durable now; a failed checkpoint only means a restart
    // would replay them, which the store absorbs. Retry anyway, so that the
    // replay stays short.
    let mut attempt = 0u32;
    while let Err(e) = reader.checkpoint(seq).await {
        match e {
            stream::ReadError::Io(_) if attempt < 10 => {
                attempt += 1;
                metrics
                    .read_retries
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let backoff = retry_delay(pcfg, attempt);
                tracing::warn!(shard, error = %e, backoff_ms = backoff.as_millis() as u64, "Checkpoint failed; retrying.");
                tokio::time::sleep(backoff).await;
            }
            other => return Err(other),
        }
    }
    Ok(())
}

/// Exponential backoff from `initial_backoff`, capped at `max_backoff`.
fn retry_delay(pcfg: &ProcessorConfig, attempt: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(16));
    (pcfg.initial_backoff * factor).min(pcfg.max_backoff)
}
