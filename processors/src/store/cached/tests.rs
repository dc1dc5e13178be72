use std::sync::atomic::{AtomicUsize, Ordering};

use schemas::state::{Item, ItemState};

use super::flush::{FLUSH_CHUNK, FLUSH_TRANSACTION, transactions};
use super::*;
use crate::store::memory::MemoryStore;
use crate::store::test_items::{counter, counter_key, write};
use crate::store::{KeyedItem, Range, Scan};

/// A memory store whose `fail_at`-th commit (from 0) is refused as
/// unavailable.
struct FailingOnce {
    inner: MemoryStore,
    commits: AtomicUsize,
    fail_at: usize,
}

#[async_trait]
impl RollupStore for FailingOnce {
    async fn load(&self, keys: &[ItemKey]) -> Result<Vec<Option<LoadedItem>>, StoreError> {
        self.inner.load(keys).await
    }

    async fn commit(&self, commit: Commit) -> Result<(), StoreError> {
        if self.commits.fetch_add(1, Ordering::SeqCst) == self.fail_at {
            return Err(StoreError::Unavailable("refused by the test".into()));
        }
        self.inner.commit(commit).await
    }
}

#[async_trait]
impl RollupQuery for FailingOnce {
    async fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>, StoreError> {
        self.inner.get(pk, sk).await
    }

    async fn range(&self, range: Range) -> Result<Vec<(String, Item)>, StoreError> {
        self.inner.range(range).await
    }

    async fn scan_prefix(&self, scan: Scan) -> Result<Vec<KeyedItem>, StoreError> {
        self.inner.scan_prefix(scan).await
    }
}

/// A flush copies the dirty items a chunk at a time; items on both sides
/// of every chunk boundary reach the inner store, once each.
#[tokio::test]
async fn a_flush_larger_than_a_chunk_writes_every_dirty_item_once() {
    let inner = Arc::new(MemoryStore::new());
    let cache = CachedStore::new(inner.clone(), CacheConfig::default());
    let n = FLUSH_CHUNK * 2 + 7;
    for i in 0..n {
        cache
            .commit(counter(&format!("c{i:06}"), Condition::Absent, 1))
            .await
            .unwrap();
    }
    assert_eq!(cache.flush().await.unwrap(), n);
    assert_eq!(cache.unflushed(), 0);
    assert_eq!(cache.flush().await.unwrap(), 0, "nothing is written twice");
    for i in [0, FLUSH_CHUNK - 1, FLUSH_CHUNK, n - 1] {
        let pk = counter_key(&format!("c{i:06}"));
        assert!(
            inner.get(&pk.pk(), &pk.sk()).await.unwrap().is_some(),
            "counter {i} reached the inner store"
        );
    }
}

/// The inner store's transactions keep a commit's order: plain writes
/// first, then the items written last, the watermarks after every other.
#[test]
fn a_flushs_transactions_write_the_watermarks_last() {
    let watermark = ItemKey::Watermark { shard: "s".into() };
    let span = ItemKey::Span {
        device: "d".into(),
        start: 0,
    };
    let n = FLUSH_TRANSACTION + 3;
    let commit = Commit {
        writes: (0..n)
            .map(|i| write(counter_key(&format!("c{i:06}")), Condition::Absent, 1))
            .collect(),
        then: vec![
            write(watermark.clone(), Condition::Absent, 1),
            write(span.clone(), Condition::Absent, 1),
        ],
    };
    let sizes: Vec<usize> = transactions(commit.clone()).iter().map(Vec::len).collect();
    assert_eq!(sizes, [FLUSH_TRANSACTION, 3, 2]);
    let last: Vec<ItemKey> = transactions(commit)
        .pop()
        .unwrap()
        .into_iter()
        .map(|w| w.key)
        .collect();
    assert_eq!(last, [span, watermark]);
}

/// A flush whose second transaction fails keeps what the first wrote (its
/// items clean, their inner versions advanced) and leaves the rest dirty;
/// the next flush writes only the rest, under the right conditions.
#[tokio::test]
async fn a_flush_failing_part_way_leaves_only_the_unwritten_items_dirty() {
    let inner = Arc::new(FailingOnce {
        inner: MemoryStore::new(),
        commits: AtomicUsize::new(0),
        // The first flush's two transactions are commits 0 and 1.
        fail_at: 3,
    });
    let cache = CachedStore::new(inner.clone(), CacheConfig::default());
    let n = FLUSH_TRANSACTION + 5;
    let name = |i: usize| format!("c{i:06}");
    for i in 0..n {
        cache
            .commit(counter(&name(i), Condition::Absent, 1))
            .await
            .unwrap();
    }
    // The first flush inserts everything; the second rewrites every item
    // under a version condition and fails at its second transaction.
    assert_eq!(cache.flush().await.unwrap(), n);
    for i in 0..n {
        cache
            .commit(counter(&name(i), Condition::Version(1), 2))
            .await
            .unwrap();
    }
    assert!(cache.flush().await.is_err());
    assert_eq!(
        cache.unflushed(),
        5,
        "the first transaction's items are clean"
    );
    let stored = |i: usize| {
        let inner = inner.clone();
        let key = counter_key(&name(i));
        async move {
            match inner
                .get(&key.pk(), &key.sk())
                .await
                .unwrap()
                .unwrap()
                .state
            {
                ItemState::Counter(n) => n,
                other => panic!("not a counter: {other:?}"),
            }
        }
    };
    assert_eq!(stored(0).await, 2);
    assert_eq!(
        stored(n - 1).await,
        1,
        "the second transaction wrote nothing"
    );

    // The inner store refuses a write whose version condition is stale:
    // these succeed only if the cache kept every item's version right.
    assert_eq!(cache.flush().await.unwrap(), 5);
    assert_eq!(cache.unflushed(), 0);
    assert_eq!(stored(n - 1).await, 2);
    cache
        .commit(counter(&name(0), Condition::Version(2), 3))
        .await
        .unwrap();
    assert_eq!(
        cache.flush().await.unwrap(),
        1,
        "the first item's version is known"
    );
    assert_eq!(stored(0).await, 3);
}
