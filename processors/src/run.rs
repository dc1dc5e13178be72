//! The local processor loop: a thin shell around the core, one task per shard,
//! and one flusher for the store they share.
//!
//! A shard reads a batch and folds it into the store with [`process_batch`]
//! (the same function the Lambda handler calls). [`run_flusher`] flushes the
//! store by the [`FlushPolicy`]; a shard checkpoints a batch only once a flush
//! has made it durable ([`Durability`]).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// When applied batches are flushed, and so checkpointed.
    pub flush: FlushPolicy,
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        ProcessorConfig {
            batch_max_records: 10_000,
            poll_wait: Duration::from_millis(250),
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_secs(5),
            flush: FlushPolicy::default(),
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

/// When the write-behind store is flushed. Every flush rewrites each item
/// that changed since the last one, so at a fleet's shape (one reading per
/// device between flushes) the interval decides how many readings share one
/// write of a device's windows. Queries read through the cache, so the
/// interval does not delay what the API shows; it lengthens the replay after
/// a crash, because shards checkpoint only what a flush made durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlushPolicy {
    /// The longest an applied batch waits to be flushed.
    pub interval: Duration,
    /// Flush early once this many items wait: bounds the cache's dirty
    /// memory and how long one flush takes.
    pub max_dirty_items: usize,
}

impl Default for FlushPolicy {
    fn default() -> Self {
        FlushPolicy {
            interval: Duration::from_secs(10),
            max_dirty_items: 500_000,
        }
    }
}

impl FlushPolicy {
    /// Whether to flush now, `since_last` after the last flush started, with
    /// `dirty` items waiting.
    pub fn due(&self, since_last: Duration, dirty: usize) -> bool {
        since_last >= self.interval || dirty >= self.max_dirty_items
    }
}

/// How often the flusher looks at the dirty count between flushes.
const FLUSH_CHECK_EVERY: Duration = Duration::from_millis(100);

/// Which commits a flush has made durable, shared by the flusher and the
/// shard loops. Flushes are numbered from 1 as they start; a flush makes
/// durable everything committed before it started. A shard takes a
/// [`Durability::mark`] after each batch's commit and checkpoints the batch
/// once a later-started flush has succeeded, whoever ran it.
#[derive(Debug, Default)]
pub struct Durability {
    started: AtomicU64,
    /// The highest-numbered flush that succeeded.
    durable: AtomicU64,
}

impl Durability {
    /// A mark covering everything committed before this call.
    pub fn mark(&self) -> u64 {
        self.started.load(Ordering::SeqCst)
    }

    /// Whether everything committed before `mark` was taken is durable.
    pub fn covers(&self, mark: u64) -> bool {
        self.durable.load(Ordering::SeqCst) > mark
    }

    /// Flushes `store`, retrying passing errors; returns the items written.
    /// Flushes may overlap (the store serialises them): a flush that started
    /// later covers everything an earlier one would have.
    pub async fn flush(
        &self,
        who: &str,
        store: &dyn RollupStore,
        processor_config: &ProcessorConfig,
        metrics: &ProcessorMetrics,
    ) -> Result<usize, StoreError> {
        let mut attempt = 0u32;
        loop {
            let number = self.started.fetch_add(1, Ordering::SeqCst) + 1;
            let started = Instant::now();
            match store.flush().await {
                Ok(written) => {
                    self.durable.fetch_max(number, Ordering::SeqCst);
                    metrics.flush_seconds.observe(started.elapsed());
                    metrics
                        .store_flushed
                        .fetch_add(written as u64, Ordering::Relaxed);
                    return Ok(written);
                }
                Err(e) if e.is_retryable() => {
                    attempt += 1;
                    metrics.batch_retries.fetch_add(1, Ordering::Relaxed);
                    let backoff = retry_delay(processor_config, attempt);
                    tracing::warn!(who, error = %e, backoff_ms = backoff.as_millis() as u64, "Flushing the store failed; retrying.");
                    tokio::time::sleep(backoff).await;
                }
                Err(e) => {
                    tracing::error!(who, error = %e, "The store cannot be flushed.");
                    return Err(e);
                }
            }
        }
    }
}

/// Flushes `store` by `processor_config.flush` until `shutdown` turns true. The one
/// place that decides when to flush: shards only checkpoint what the flushes
/// covered, and flush once more themselves when they drain.
pub async fn run_flusher(
    store: Arc<dyn RollupStore>,
    durability: Arc<Durability>,
    processor_config: ProcessorConfig,
    metrics: Arc<ProcessorMetrics>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), stream::ReadError> {
    let check = FLUSH_CHECK_EVERY
        .min(processor_config.flush.interval)
        .max(Duration::from_millis(1));
    let mut last = tokio::time::Instant::now();
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        tokio::select! {
            () = tokio::time::sleep(check) => {}
            changed = shutdown.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                continue;
            }
        }
        let tick = tokio::time::Instant::now();
        if flush_if_due(
            store.as_ref(),
            &durability,
            &processor_config,
            &metrics,
            tick - last,
        )
        .await
        .map_err(|e| stream::ReadError::Io(e.to_string()))?
        {
            last = tick;
        }
    }
}

/// One look of the flusher, `since_last` after the last flush started:
/// flushes if the policy says so, and says whether it did.
async fn flush_if_due(
    store: &dyn RollupStore,
    durability: &Durability,
    processor_config: &ProcessorConfig,
    metrics: &ProcessorMetrics,
    since_last: Duration,
) -> Result<bool, StoreError> {
    if !processor_config.flush.due(since_last, store.unflushed()) {
        return Ok(false);
    }
    durability
        .flush("flusher", store, processor_config, metrics)
        .await?;
    Ok(true)
}

/// Folds one batch of one shard into the store: plan, load each round the
/// plan asks for, apply, commit.
/// A conflict (someone else wrote an item) reloads and tries again once;
/// other errors go back to the caller, which retries the whole batch: a
/// partial commit is safe to retry because every item remembers what it holds.
pub async fn process_batch(
    shard: &str,
    records: &[Record],
    store: &dyn RollupStore,
    aggregate_config: &AggregateConfig,
    metrics: &ProcessorMetrics,
) -> Result<BatchStats, BatchError> {
    let mut conflicts = 0;
    loop {
        let mut plan = aggregate::plan(shard, records, aggregate_config);
        while !plan.keys().is_empty() {
            let loaded = store.load(plan.keys()).await?;
            plan.receive(loaded, aggregate_config)?;
        }
        let applied = aggregate::apply(plan, aggregate_config)?;
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

/// Compacts the final pending windows of every device, for devices that
/// stopped publishing and so never start the span whose batch would. Runs
/// beside the shard processors: its writes are conditional, so a device
/// that publishes meanwhile wins and is swept another time. Returns how
/// many devices it compacted.
pub async fn sweep_quiet_devices(
    store: &dyn RollupStore,
    query: &dyn crate::store::RollupQuery,
    aggregate_config: &AggregateConfig,
) -> Result<u64, BatchError> {
    use rollup::keys::DEVICE_SK;
    use schemas::state::ItemState;

    let watermarks = crate::store::watermarks(query).await?;
    let mut swept = 0;
    let mut after = None;
    loop {
        let page = query.scan_prefix("d|", after.clone(), 1000).await?;
        let full = page.len() == 1000;
        for (pk, sk, item) in page {
            after = Some((pk.clone(), sk.clone()));
            let (Some(device), true) = (pk.strip_prefix("d|"), sk == DEVICE_SK) else {
                continue;
            };
            let ItemState::Device(state) = &item.state else {
                continue;
            };
            let Some(&watermark) = watermarks.get(&state.shard) else {
                continue;
            };
            let keys = rollup::sweep::sweep_keys(device, state, watermark, aggregate_config);
            if keys.is_empty() {
                continue;
            }
            // Load the device through the writer too, for its version.
            let mut with_device = vec![rollup::keys::ItemKey::Device {
                device: device.to_string(),
            }];
            with_device.extend(keys.iter().cloned());
            let mut loaded = store.load(&with_device).await?;
            let Some(current) = loaded.remove(0) else {
                continue;
            };
            let Some(commit) =
                rollup::sweep::sweep(device, &current, watermark, &keys, loaded, aggregate_config)?
            else {
                continue;
            };
            match store.commit(commit).await {
                Ok(()) => swept += 1,
                Err(StoreError::Conflict(key)) => {
                    tracing::debug!(
                        device,
                        key,
                        "A batch wrote the device during its sweep; next time."
                    );
                }
                Err(e) => return Err(e.into()),
            }
        }
        if !full {
            return Ok(swept);
        }
    }
}

/// How often a shard with nothing to read moves its watermark to now.
const IDLE_WATERMARK_EVERY: Duration = Duration::from_secs(1);

/// Moves an idle shard's watermark up to `now` less the slack, so that it
/// does not hold fleet windows short of final.
pub async fn advance_idle_watermark(
    shard: &str,
    store: &dyn RollupStore,
    aggregate_config: &AggregateConfig,
    now: i64,
) -> Result<(), BatchError> {
    let key = rollup::keys::ItemKey::Watermark {
        shard: shard.to_string(),
    };
    let loaded = store.load(std::slice::from_ref(&key)).await?;
    let current = loaded.into_iter().next().flatten();
    if let Some(write) = aggregate::idle_watermark(shard, current, now, aggregate_config)? {
        store
            .commit(rollup::Commit {
                writes: Vec::new(),
                then: vec![write],
            })
            .await?;
    }
    Ok(())
}

/// Processes one shard until `shutdown` turns true, then drains what is left
/// in the shard and returns. Checkpoints only batches that a flush of the
/// store made durable (see [`Durability`]); [`run_flusher`] decides when.
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
        let Some(last) = batch.last().map(|r| r.seq) else {
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
            checkpoint_flushed(
                &shard,
                &mut reader,
                &mut unflushed,
                &durability,
                &processor_config,
                &metrics,
            )
            .await?;
            if idle_since.elapsed() >= IDLE_WATERMARK_EVERY {
                idle_since = Instant::now();
                let now = chrono::Utc::now().timestamp_millis();
                if let Err(e) =
                    advance_idle_watermark(&shard, store.as_ref(), &aggregate_config, now).await
                {
                    tracing::warn!(shard, error = %e, "Advancing an idle shard's watermark failed; will retry.");
                }
            }
            continue;
        };
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

/// Exponential backoff from `initial_backoff`, capped at `max_backoff`.
fn retry_delay(processor_config: &ProcessorConfig, attempt: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(16));
    (processor_config.initial_backoff * factor).min(processor_config.max_backoff)
}

#[cfg(test)]
mod tests {
    use schemas::state::{Item, ItemState};

    use super::*;
    use crate::store::cached::{CacheConfig, CachedStore};
    use crate::store::memory::MemoryStore;
    use rollup::keys::ItemKey;
    use rollup::{Commit, Condition, Write};

    fn counter(name: &str) -> Commit {
        Commit {
            writes: vec![Write {
                key: ItemKey::Counter {
                    shard: "s".into(),
                    name: name.into(),
                },
                condition: Condition::Absent,
                item: Item {
                    applied: Default::default(),
                    state: ItemState::Counter(1),
                },
                expires_at: None,
            }],
            then: vec![],
        }
    }

    fn policy(interval: Duration, max_dirty_items: usize) -> ProcessorConfig {
        ProcessorConfig {
            flush: FlushPolicy {
                interval,
                max_dirty_items,
            },
            ..ProcessorConfig::default()
        }
    }

    #[test]
    fn a_flush_is_due_at_the_interval_or_at_the_dirty_bound() {
        let p = policy(Duration::from_secs(10), 100).flush;
        assert!(!p.due(Duration::from_millis(9_999), 99));
        assert!(p.due(Duration::from_secs(10), 0));
        assert!(p.due(Duration::ZERO, 100));
    }

    #[tokio::test]
    async fn a_mark_is_covered_only_by_a_flush_that_started_after_it() {
        let store = CachedStore::new(Arc::new(MemoryStore::new()), CacheConfig::default());
        let (d, processor_config, metrics) = (
            Durability::default(),
            ProcessorConfig::default(),
            ProcessorMetrics::default(),
        );
        store.commit(counter("a")).await.unwrap();
        let before = d.mark();
        assert!(!d.covers(before));
        d.flush("test", &store, &processor_config, &metrics)
            .await
            .unwrap();
        assert!(d.covers(before));
        store.commit(counter("b")).await.unwrap();
        let after = d.mark();
        assert!(!d.covers(after), "b is not flushed yet");
        assert_eq!(store.unflushed(), 1);
    }

    /// The flusher waits for the interval, unless the dirty items reach the
    /// bound first; shards then see their batches covered.
    #[tokio::test]
    async fn the_flusher_flushes_at_the_dirty_bound_before_the_interval() {
        let store = CachedStore::new(Arc::new(MemoryStore::new()), CacheConfig::default());
        let (d, metrics) = (Durability::default(), ProcessorMetrics::default());
        let processor_config = policy(Duration::from_secs(3600), 3);
        let early = Duration::from_secs(5);
        store.commit(counter("a")).await.unwrap();
        store.commit(counter("b")).await.unwrap();
        let mark = d.mark();
        assert!(
            !flush_if_due(&store, &d, &processor_config, &metrics, early)
                .await
                .unwrap()
        );
        assert_eq!(store.dirty(), 2, "below the bound, nothing is flushed");
        assert!(!d.covers(mark));

        store.commit(counter("c")).await.unwrap();
        let mark = d.mark();
        assert!(
            flush_if_due(&store, &d, &processor_config, &metrics, early)
                .await
                .unwrap()
        );
        assert_eq!(store.dirty(), 0, "at the bound, everything is flushed");
        assert!(d.covers(mark));
        assert_eq!(metrics.store_flushed.load(Ordering::Relaxed), 3);

        store.commit(counter("d")).await.unwrap();
        let interval = Duration::from_secs(3600);
        assert!(
            flush_if_due(&store, &d, &processor_config, &metrics, interval)
                .await
                .unwrap()
        );
        assert_eq!(store.dirty(), 0, "at the interval, everything is flushed");
    }
}
