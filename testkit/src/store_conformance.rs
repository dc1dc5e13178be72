//! The contract every store backend keeps, as one suite each backend's tests
//! run: `store_conformance::run(&store).await`.
//!
//! Panics with a message naming the broken rule. The small builders it uses
//! (`counter`, `write`, `value`, `range`, `sqlite_in_temp_dir`) serve
//! backends' own tests too.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use schemas::state::{Item, ItemState};

use rollup::{Commit, Condition, Write};

use processors::store::sqlite::SqliteStore;
use processors::store::{Range, RollupQuery, RollupStore, Scan, StoreError};
use rollup::keys::ItemKey;

/// A SQLite store in a fresh temp dir, and the dir, which must outlive it.
pub fn sqlite_in_temp_dir() -> (SqliteStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("rollups.db")).unwrap();
    (store, dir)
}

/// A counter item's key.
pub fn counter(shard: &str, name: &str) -> ItemKey {
    ItemKey::Counter {
        shard: shard.into(),
        name: name.into(),
    }
}

fn item(n: u64) -> Item {
    Item {
        applied: Default::default(),
        state: ItemState::Counter(n),
    }
}

/// A counter item's value.
pub fn value(item: &Item) -> u64 {
    match item.state {
        ItemState::Counter(n) => n,
        ref other => panic!("expected a counter, found {other:?}"),
    }
}

/// A write of counter value `n` to `key` under `condition`, never expiring.
pub fn write(key: ItemKey, condition: Condition, n: u64) -> Write {
    Write {
        key,
        condition,
        item: item(n),
        expires_at: None,
    }
}

/// Commits `writes` with nothing to write after them, and expects success.
pub async fn commit_writes<S: RollupStore + ?Sized>(store: &S, writes: Vec<Write>) {
    store
        .commit(Commit {
            writes,
            then: vec![],
        })
        .await
        .unwrap();
}

/// The version `key` holds in `store` now; the key must hold an item.
pub async fn version_of<S: RollupStore + ?Sized>(store: &S, key: &ItemKey) -> u64 {
    store.load(std::slice::from_ref(key)).await.unwrap()[0]
        .as_ref()
        .unwrap()
        .version
}

/// Up to `limit` items of partition `pk` with sort keys in `[from, to)`.
pub fn range(pk: &str, from: &str, to: &str, limit: usize, descending: bool) -> Range {
    Range {
        pk: pk.into(),
        from: from.into(),
        to: to.into(),
        limit,
        descending,
    }
}

/// Runs every check against an empty store.
pub async fn run<S: RollupStore + RollupQuery>(store: &S) {
    versions_and_conditions(store).await;
    ranges(store).await;
    prefix_scans(store).await;
    alerts(store).await;
    layout(store).await;
}

/// The first layout is kept, read back the same, and another refused: a
/// backend that lost the layout item, or lost its `Absent` condition,
/// would let a process cut the store's spans another way.
async fn layout<S: RollupStore + RollupQuery>(store: &S) {
    use processors::store::layout::ensure;
    let minute = rollup::AggregateConfig {
        span: Some(60_000),
        ..rollup::AggregateConfig::default()
    };
    ensure(store, store, &minute).await.unwrap();
    ensure(store, store, &minute).await.unwrap();
    let err = ensure(store, store, &rollup::AggregateConfig::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Layout(_)),
        "another span must be refused: {err}"
    );
}

async fn versions_and_conditions<S: RollupStore + RollupQuery>(store: &S) {
    let a = counter("conf-a", "x");
    let loaded = store.load(std::slice::from_ref(&a)).await.unwrap();
    assert!(loaded[0].is_none(), "a missing item must load as None");

    let commit = Commit {
        writes: vec![write(a.clone(), Condition::Absent, 1)],
        then: vec![],
    };
    store.commit(commit).await.unwrap();
    let loaded = store.load(std::slice::from_ref(&a)).await.unwrap();
    let first = loaded[0].clone().expect("a written item must load");
    assert_eq!(value(&first.item), 1);

    let again = Commit {
        writes: vec![write(a.clone(), Condition::Absent, 9)],
        then: vec![],
    };
    assert!(
        matches!(store.commit(again).await, Err(StoreError::Conflict(_))),
        "Absent on an existing item must conflict"
    );

    let next = Commit {
        writes: vec![write(a.clone(), Condition::Version(first.version), 2)],
        then: vec![],
    };
    store.commit(next).await.unwrap();
    let second = store.load(std::slice::from_ref(&a)).await.unwrap()[0]
        .clone()
        .unwrap();
    assert_eq!(value(&second.item), 2);
    assert_ne!(
        second.version, first.version,
        "a write must change the version"
    );

    let stale = Commit {
        writes: vec![write(a.clone(), Condition::Version(first.version), 3)],
        then: vec![],
    };
    assert!(
        matches!(store.commit(stale).await, Err(StoreError::Conflict(_))),
        "a stale version must conflict"
    );
    let after = store.load(std::slice::from_ref(&a)).await.unwrap()[0]
        .clone()
        .unwrap();
    assert_eq!(value(&after.item), 2, "a conflicting write must not land");

    let once = counter("conf-a", "once");
    for n in [5, 6] {
        let c = Commit {
            writes: vec![write(once.clone(), Condition::InsertOnce, n)],
            then: vec![],
        };
        store.commit(c).await.unwrap();
    }
    let kept = store.get(&once.pk(), &once.sk()).await.unwrap().unwrap();
    assert_eq!(value(&kept), 5, "InsertOnce must keep the first item");

    // `then` lands after `writes`.
    let (b, c) = (counter("conf-a", "b"), counter("conf-a", "c"));
    let both = Commit {
        writes: vec![write(b.clone(), Condition::Absent, 7)],
        then: vec![write(c.clone(), Condition::Absent, 8)],
    };
    store.commit(both).await.unwrap();
    let loaded = store.load(&[b, c]).await.unwrap();
    assert_eq!(value(&loaded[0].as_ref().unwrap().item), 7);
    assert_eq!(value(&loaded[1].as_ref().unwrap().item), 8);
}

fn member(fleet: &str, device: &str) -> ItemKey {
    ItemKey::Member {
        fleet: fleet.into(),
        device: device.into(),
    }
}

async fn ranges<S: RollupStore + RollupQuery>(store: &S) {
    let writes = (0..25)
        .map(|i| write(member("conf-r", &format!("{i:03}")), Condition::Absent, i))
        .collect();
    commit_writes(store, writes).await;
    let pk = member("conf-r", "").pk();
    let range = |from, to, limit, descending| range(&pk, from, to, limit, descending);
    let all = store.range(range("", "~", 100, false)).await.unwrap();
    assert_eq!(all.len(), 25);
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0), "ascending order");
    let some = store.range(range("005", "010", 100, false)).await.unwrap();
    let sks: Vec<&str> = some.iter().map(|(sk, _)| sk.as_str()).collect();
    assert_eq!(sks, ["005", "006", "007", "008", "009"], "[from, to)");
    let limited = store.range(range("", "~", 3, true)).await.unwrap();
    let sks: Vec<&str> = limited.iter().map(|(sk, _)| sk.as_str()).collect();
    assert_eq!(sks, ["024", "023", "022"], "descending with a limit");
    assert_eq!(value(&limited[0].1), 24);
    let none = store.range(range("x", "y", 10, false)).await.unwrap();
    assert!(none.is_empty());
}

async fn prefix_scans<S: RollupStore + RollupQuery>(store: &S) {
    let keys = [
        ("m|fa", "d1"),
        ("m|fa", "d2"),
        ("m|fa-2", "d3"),
        ("m|fb", "d4"),
    ];
    let writes = keys
        .iter()
        .enumerate()
        .map(|(i, (fleet, device))| {
            write(
                ItemKey::Member {
                    fleet: fleet.trim_start_matches("m|").into(),
                    device: (*device).into(),
                },
                Condition::Absent,
                i as u64,
            )
        })
        .collect();
    commit_writes(store, writes).await;
    let all = store
        .scan_prefix(Scan::new("m|f", None, 100))
        .await
        .unwrap();
    let got: Vec<(&str, &str)> = all
        .iter()
        .map(|(pk, sk, _)| (pk.as_str(), sk.as_str()))
        .collect();
    assert_eq!(got, keys, "prefix scan in (pk, sk) order");
    let page = store
        .scan_prefix(Scan::new("m|f", Some(("m|fa".into(), "d1".into())), 2))
        .await
        .unwrap();
    let got: Vec<&str> = page.iter().map(|(_, sk, _)| sk.as_str()).collect();
    assert_eq!(got, ["d2", "d3"], "a scan resumes after the given key");
    let exact = store
        .scan_prefix(Scan::new("m|fb", None, 100))
        .await
        .unwrap();
    assert_eq!(exact.len(), 1);
}

fn alert_key(start: i64, revision: u64) -> ItemKey {
    ItemKey::Alert {
        rule: "conf-hot".into(),
        start,
        revision,
    }
}

fn alert(start: i64, revision: u64, value: f64) -> Write {
    Write {
        key: alert_key(start, revision),
        condition: Condition::InsertOnce,
        item: Item {
            applied: Default::default(),
            state: ItemState::Alert(schemas::state::AlertState {
                rule: "conf-hot".into(),
                fleet: "f".into(),
                device: None,
                metric: "temp".into(),
                resolution: "1m".into(),
                aggregate: "avg".into(),
                comparison: ">".into(),
                threshold: 30.0,
                window_start: start,
                window_end: start + 60_000,
                revision,
                value,
                late_count: revision,
                fired_at: 1,
            }),
        },
        expires_at: None,
    }
}

/// Alert items: looked up, then written once per (rule, window, revision)
/// however often a window is evaluated; their delivery marks beside them,
/// written once too; listed newest first.
async fn alerts<S: RollupStore + RollupQuery>(store: &S) {
    let first = alert(60_000, 0, 31.0);
    // The evaluator looks an alert up before writing it: a store that
    // remembers the miss must still take the write.
    let missing = store.load(std::slice::from_ref(&first.key)).await.unwrap();
    assert!(missing[0].is_none());
    commit_writes(store, vec![first.clone(), alert(120_000, 0, 33.0)]).await;
    // Evaluated again, even with another value: the first item stays.
    commit_writes(store, vec![alert(60_000, 0, 99.0), alert(60_000, 1, 35.0)]).await;
    let loaded = store.load(std::slice::from_ref(&first.key)).await.unwrap()[0]
        .clone()
        .expect("an alert must load");
    let ItemState::Alert(a) = &loaded.item.state else {
        panic!("expected an alert, found {:?}", loaded.item.state);
    };
    assert_eq!(a.value, 31.0, "InsertOnce keeps the first alert");

    let delivered = ItemKey::AlertDelivered {
        rule: "conf-hot".into(),
        start: 60_000,
        revision: 0,
    };
    assert!(store.load(std::slice::from_ref(&delivered)).await.unwrap()[0].is_none());
    for at in [5, 6] {
        let mark = Write {
            key: delivered.clone(),
            condition: Condition::InsertOnce,
            item: Item {
                applied: Default::default(),
                state: ItemState::AlertDelivered(at),
            },
            expires_at: None,
        };
        commit_writes(store, vec![mark]).await;
    }

    let rows = store
        .range(range(&first.key.pk(), "", "~", 10, true))
        .await
        .unwrap();
    let listed: Vec<String> = rows
        .iter()
        .map(|(sk, item)| match &item.state {
            ItemState::Alert(a) => format!("{}/{}", a.window_start, a.revision),
            ItemState::AlertDelivered(at) => format!("{sk} delivered at {at}"),
            other => panic!("expected an alert, found {other:?}"),
        })
        .collect();
    assert_eq!(
        listed,
        [
            "120000/0".to_string(),
            "60000/1".into(),
            format!("{} delivered at 5", delivered.sk()),
            "60000/0".into(),
        ],
        "alerts are listed newest window first, each revision once, marks beside them"
    );
}
