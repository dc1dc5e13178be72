//! The local processor loop: a thin shell around the core, one task per shard,
//! and one flusher for the store they share.
//!
//! A shard reads a batch and folds it into the store with [`process_batch`]
//! (the same function the Lambda handler calls). [`run_flusher`] flushes the
//! store by the [`FlushPolicy`]; a shard checkpoints a batch only once a flush
//! has made it durable ([`Durability`]).
//!
//! - `flush`: the flush policy, the flusher and the durability marks shards
//!   checkpoint by;
//! - `shard`: the per-shard loop: read, apply with retries, checkpoint what
//!   a flush covered, move an idle shard's watermark.
//!
//! Here: [`process_batch`], the sweep of quiet devices and the idle
//! watermark step, which the loop, the Lambda handler and `iotpipe up` share.

mod flush;
mod shard;

pub use flush::{Durability, FlushPolicy, run_flusher};
pub use shard::run_shard;

use std::time::{Duration, Instant};

use rollup::AggregateConfig;
use rollup::aggregate::{self, ApplyError, BatchStats};
use schemas::shard::Record;

use crate::metrics::ProcessorMetrics;
use crate::store::{RollupStore, Scan, StoreError};

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
        let page = query
            .scan_prefix(Scan::new("d|", after.clone(), 1000))
            .await?;
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

/// Exponential backoff from `initial_backoff`, capped at `max_backoff`.
fn retry_delay(processor_config: &ProcessorConfig, attempt: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(16));
    (processor_config.initial_backoff * factor).min(processor_config.max_backoff)
}
