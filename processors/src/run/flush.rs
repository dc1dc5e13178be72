//! When the write-behind store is flushed, and which commits a flush has
//! made durable: the flusher alone decides when, and a shard checkpoints a
//! batch only once a flush that started after its commit succeeded.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::{ProcessorConfig, retry_delay};
use crate::metrics::ProcessorMetrics;
use crate::store::{RollupStore, StoreError};

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
    /// later covers everything an earlier one would have. The write-behind
    /// cache writes a flush in several transactions; it returns `Ok` only
    /// once all of them succeeded, so a mark is covered only then.
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
