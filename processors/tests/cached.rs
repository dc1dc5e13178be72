//! The write-behind cache's bookkeeping, against a store that fails: an
//! integration test because the failing store is the test kit's, which
//! implements this crate's `RollupStore` as the kit sees it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use processors::store::RollupStore;
use processors::store::cached::{CacheConfig, CachedStore};
use processors::store::memory::MemoryStore;
use rollup::{Commit, Condition};
use testkit::store_conformance::{self, write};
use testkit::store_fault::{FaultyStore, StoreFaults};

/// A commit of counter `name`'s value `n` under `condition`.
fn counter(name: &str, condition: Condition, n: u64) -> Commit {
    Commit {
        writes: vec![write(store_conformance::counter("s", name), condition, n)],
        then: vec![],
    }
}

/// Commits `c` to the cache, which takes it without touching the store.
async fn commit(cache: &impl RollupStore, c: Commit) {
    cache.commit(c).await.unwrap();
}

/// The flush policy reads the dirty count after every batch, so it is
/// kept as a count; it must stay equal to the dirty items through
/// rewrites, flushes and failed flushes.
#[tokio::test]
async fn the_dirty_count_follows_rewrites_flushes_and_failed_flushes() {
    let failing = StoreFaults {
        commit_error_before: 1.0,
        ..StoreFaults::default()
    };
    let inner = Arc::new(FaultyStore::new(Arc::new(MemoryStore::new()), failing));
    let cache = CachedStore::new(inner, CacheConfig::default());
    commit(&cache, counter("a", Condition::Absent, 1)).await;
    commit(&cache, counter("a", Condition::Version(1), 2)).await;
    commit(&cache, counter("b", Condition::Absent, 1)).await;
    assert_eq!(cache.unflushed(), 2, "a rewritten item counts once");
    assert!(cache.flush().await.is_err());
    assert_eq!(cache.unflushed(), 2, "a failed flush leaves both dirty");

    let cache = CachedStore::new(Arc::new(MemoryStore::new()), CacheConfig::default());
    commit(&cache, counter("a", Condition::Absent, 1)).await;
    commit(&cache, counter("b", Condition::Absent, 1)).await;
    assert_eq!(cache.flush().await.unwrap(), 2);
    assert_eq!(cache.unflushed(), 0);
    commit(&cache, counter("a", Condition::Version(1), 2)).await;
    assert_eq!(cache.unflushed(), 1);
}

/// A write-once item looked up first (an alert, or its delivery mark) is
/// taken, counted dirty, flushed as write-once, and keeps its first value.
#[tokio::test]
async fn a_write_once_item_looked_up_first_is_written_and_flushed_once() {
    let inner = Arc::new(MemoryStore::new());
    let cache = CachedStore::new(inner.clone(), CacheConfig::default());
    let key = store_conformance::counter("s", "once");
    assert!(cache.load(std::slice::from_ref(&key)).await.unwrap()[0].is_none());
    commit(&cache, counter("once", Condition::InsertOnce, 1)).await;
    commit(&cache, counter("once", Condition::InsertOnce, 2)).await;
    assert_eq!(cache.unflushed(), 1);
    assert_eq!(cache.flush().await.unwrap(), 1);
    let stored = inner.load(std::slice::from_ref(&key)).await.unwrap()[0]
        .clone()
        .expect("flushed");
    assert_eq!(store_conformance::value(&stored.item), 1);
}
