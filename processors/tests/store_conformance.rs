//! Every store backend keeps the same contract.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use processors::store::{conformance, memory::MemoryStore, sqlite::SqliteStore};

#[tokio::test]
async fn memory_store_conforms() {
    conformance::run(&MemoryStore::new()).await;
}

#[tokio::test]
async fn sqlite_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("rollups.db")).unwrap();
    conformance::run(&store).await;
}

#[tokio::test]
async fn sqlite_store_keeps_items_across_reopen_and_purges_expired() {
    use processors::keys::ItemKey;
    use processors::store::{Commit, Condition, RollupQuery, RollupStore, Write};
    use schemas::state::{Item, ItemState};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rollups.db");
    let key = |name: &str| ItemKey::Counter {
        shard: "s".into(),
        name: name.into(),
    };
    {
        let store = SqliteStore::open(&path).unwrap();
        let w = |name: &str, expires_at| Write {
            key: key(name),
            condition: Condition::Absent,
            item: Item {
                applied: Default::default(),
                state: ItemState::Counter(1),
            },
            expires_at,
        };
        store
            .commit(Commit {
                writes: vec![w("keep", None), w("old", Some(100)), w("new", Some(300))],
                then: vec![],
            })
            .await
            .unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.purge_expired(200).await.unwrap(), 1);
    for (name, kept) in [("keep", true), ("old", false), ("new", true)] {
        let k = key(name);
        let found = store.get(&k.pk(), &k.sk()).await.unwrap();
        assert_eq!(found.is_some(), kept, "{name}");
    }
}
