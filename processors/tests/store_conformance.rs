//! Every store backend keeps the same contract.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use processors::store::{memory::MemoryStore, sqlite::SqliteStore};
use testkit::store_conformance as conformance;

#[tokio::test]
async fn memory_store_conforms() {
    conformance::run(&MemoryStore::new()).await;
}

#[tokio::test]
async fn sqlite_store_conforms() {
    let (store, _dir) = conformance::sqlite_in_temp_dir();
    conformance::run(&store).await;
}

#[tokio::test]
async fn sqlite_store_keeps_items_across_reopen_and_purges_expired() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rollups.db");
    commit_expiring(&SqliteStore::open(&path).unwrap()).await;
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.purge_expired(200).await.unwrap(), 1);
    only_the_expired_is_gone(&store).await;
}

/// The items the purge tests write: one without an expiry, one that
/// expired at 100 and one that expires at 300.
async fn commit_expiring(store: &dyn processors::store::RollupStore) {
    use rollup::{Condition, Write};
    use testkit::store_conformance::{commit_writes, write};
    let w = |name: &str, expires_at| Write {
        expires_at,
        ..write(expiring(name), Condition::Absent, 1)
    };
    let writes = vec![w("keep", None), w("old", Some(100)), w("new", Some(300))];
    commit_writes(store, writes).await;
}

fn expiring(name: &str) -> rollup::keys::ItemKey {
    testkit::store_conformance::counter("s", name)
}

/// After a purge at 200, of [`commit_expiring`]'s items only the one that
/// expired at 100 is gone.
async fn only_the_expired_is_gone(store: &dyn processors::store::RollupQuery) {
    for (name, kept) in [("keep", true), ("old", false), ("new", true)] {
        let k = expiring(name);
        let found = store.get(&k.pk(), &k.sk()).await.unwrap();
        assert_eq!(found.is_some(), kept, "{name}");
    }
}

#[tokio::test]
async fn postgres_store_conforms() {
    use processors::store::postgres::PostgresStore;
    let db = testkit::postgres::database().await.unwrap();
    let store = PostgresStore::open(db.config()).await.unwrap();
    conformance::run(&store).await;
}

#[tokio::test]
async fn postgres_store_keeps_items_across_reopen_and_purges_expired() {
    use processors::store::postgres::PostgresStore;

    let db = testkit::postgres::database().await.unwrap();
    commit_expiring(&PostgresStore::open(db.config()).await.unwrap()).await;
    let store = PostgresStore::connect(&db.url()).await.unwrap();
    assert_eq!(store.purge_expired(200).await.unwrap(), 1);
    only_the_expired_is_gone(&store).await;
}

#[tokio::test]
async fn the_write_behind_cache_conforms() {
    use processors::store::cached::{CacheConfig, CachedStore};
    let (db, _dir) = conformance::sqlite_in_temp_dir();
    conformance::run(&CachedStore::new(
        std::sync::Arc::new(db),
        CacheConfig::default(),
    ))
    .await;
    let memory = std::sync::Arc::new(MemoryStore::new());
    conformance::run(&CachedStore::new(memory, CacheConfig::default())).await;
}

#[tokio::test]
async fn the_cache_writes_only_on_flush_and_a_lost_cache_loses_only_unflushed_items() {
    use processors::store::cached::{CacheConfig, CachedStore};
    use processors::store::{RollupQuery, RollupStore};
    use rollup::Condition;
    use schemas::state::ItemState;
    use std::sync::Arc;
    use testkit::store_conformance::{commit_writes, counter, version_of};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rollups.db");
    let key = |name: &str| counter("s", name);
    let write =
        |name: &str, n: u64, condition| testkit::store_conformance::write(key(name), condition, n);
    let db = Arc::new(SqliteStore::open(&path).unwrap());
    let cache = CachedStore::new(db.clone(), CacheConfig::default());
    let k = key("a");
    assert!(cache.load(std::slice::from_ref(&k)).await.unwrap()[0].is_none());
    commit_writes(&cache, vec![write("a", 1, Condition::Absent)]).await;
    // Visible through the cache, not yet in the database.
    assert!(cache.get(&k.pk(), &k.sk()).await.unwrap().is_some());
    assert!(db.get(&k.pk(), &k.sk()).await.unwrap().is_none());
    assert_eq!(cache.dirty(), 1);
    cache.flush().await.unwrap();
    assert_eq!(cache.dirty(), 0);
    assert!(db.get(&k.pk(), &k.sk()).await.unwrap().is_some());
    // Ten more changes are one more write.
    for n in 2..12 {
        let v = version_of(&cache, &k).await;
        commit_writes(&cache, vec![write("a", n, Condition::Version(v))]).await;
    }
    cache.flush().await.unwrap();
    let stored = db.load(std::slice::from_ref(&k)).await.unwrap()[0]
        .clone()
        .unwrap();
    assert_eq!(stored.version, 2, "one write per flush");
    assert!(matches!(stored.item.state, ItemState::Counter(11)));
    // A change that is never flushed is gone with the cache; a new cache
    // starts from the database's state.
    let v = version_of(&cache, &k).await;
    commit_writes(&cache, vec![write("a", 99, Condition::Version(v))]).await;
    drop(cache);
    let fresh = CachedStore::new(db.clone(), CacheConfig::default());
    let back = fresh.load(std::slice::from_ref(&k)).await.unwrap()[0]
        .clone()
        .unwrap();
    assert!(matches!(back.item.state, ItemState::Counter(11)));
}
