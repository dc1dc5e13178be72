//! The PostgreSQL store beyond the common contract: its migrations, commits
//! that land whole or not at all, fleet-sized commits, what it says when it
//! cannot reach its server, and windows readable by SQL (`windows`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "postgres/windows.rs"]
mod windows;

use processors::store::postgres::{PostgresStore, SCHEMA_VERSION};
use processors::store::{RollupQuery, RollupStore, StoreError};
use rollup::keys::ItemKey;
use rollup::{Commit, Condition, Write};
use schemas::RejectReason;
use schemas::state::{DeadLetter, ItemState};
use testkit::store_conformance::{commit_writes, counter, value, version_of, write};

async fn client(db: &testkit::postgres::TestDb) -> tokio_postgres::Client {
    let (client, connection) = db.config().connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

async fn migrations(client: &tokio_postgres::Client) -> Vec<(i32, String)> {
    client
        .query(
            "SELECT version, applied_at::text FROM schema_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

#[tokio::test]
async fn opening_twice_migrates_once_and_a_newer_layout_is_refused() {
    let db = testkit::postgres::database().await.unwrap();
    let store = PostgresStore::open(db.config()).await.unwrap();
    commit_writes(&store, vec![write(counter("s", "a"), Condition::Absent, 4)]).await;
    let sql = client(&db).await;
    let first = migrations(&sql).await;
    let versions: Vec<i32> = first.iter().map(|(v, _)| *v).collect();
    assert_eq!(versions, (1..=SCHEMA_VERSION).collect::<Vec<_>>());

    // Two processes opening at once, and once more: nothing changes.
    let (a, b) = tokio::join!(
        PostgresStore::open(db.config()),
        PostgresStore::open(db.config())
    );
    let again = a.unwrap();
    b.unwrap();
    assert_eq!(migrations(&sql).await, first, "already applied, not again");
    let k = counter("s", "a");
    assert_eq!(
        value(&again.get(&k.pk(), &k.sk()).await.unwrap().unwrap()),
        4
    );

    // A step from a newer build: refused, with what to do, and untouched.
    sql.execute(
        "INSERT INTO schema_migrations (version) VALUES ($1)",
        &[&(SCHEMA_VERSION + 1)],
    )
    .await
    .unwrap();
    let err = PostgresStore::open(db.config()).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains(&format!("migration {}", SCHEMA_VERSION + 1))
            && message.contains("newer iotpipe"),
        "{message}"
    );
    assert_eq!(migrations(&sql).await.len(), first.len() + 1);
}

#[tokio::test]
async fn a_failed_condition_anywhere_in_a_commit_writes_nothing() {
    let db = testkit::postgres::database().await.unwrap();
    let store = PostgresStore::open(db.config()).await.unwrap();
    let (a, b, c) = (counter("s", "a"), counter("s", "b"), counter("s", "c"));
    commit_writes(&store, vec![write(a.clone(), Condition::Absent, 1)]).await;
    let v = version_of(&store, &a).await;

    // A stale version in `then`: the writes before it are rolled back too.
    let stale_then = Commit {
        writes: vec![
            write(b.clone(), Condition::Absent, 2),
            write(a.clone(), Condition::Version(v), 2),
        ],
        then: vec![write(c.clone(), Condition::Version(v + 7), 2)],
    };
    match store.commit(stale_then).await {
        Err(StoreError::Conflict(key)) => assert_eq!(key, format!("{}/{}", c.pk(), c.sk())),
        other => panic!("expected a conflict, got {other:?}"),
    }
    // An existing item under `Absent` among new ones: the same.
    let existing = Commit {
        writes: vec![
            write(b.clone(), Condition::Absent, 3),
            write(a.clone(), Condition::Absent, 3),
        ],
        then: vec![write(c.clone(), Condition::Absent, 3)],
    };
    assert!(matches!(
        store.commit(existing).await,
        Err(StoreError::Conflict(_))
    ));
    let loaded = store.load(&[a, b, c]).await.unwrap();
    assert_eq!(loaded[0].as_ref().unwrap().version, v, "a unchanged");
    assert_eq!(value(&loaded[0].as_ref().unwrap().item), 1);
    assert!(loaded[1].is_none() && loaded[2].is_none(), "{loaded:?}");
}

#[tokio::test]
async fn a_key_written_twice_in_one_commit_is_written_in_order() {
    let db = testkit::postgres::database().await.unwrap();
    let store = PostgresStore::open(db.config()).await.unwrap();
    let a = counter("s", "a");
    commit_writes(
        &store,
        vec![
            write(a.clone(), Condition::Absent, 1),
            write(a.clone(), Condition::Version(1), 2),
        ],
    )
    .await;
    let loaded = store.load(std::slice::from_ref(&a)).await.unwrap()[0]
        .clone()
        .unwrap();
    assert_eq!((loaded.version, value(&loaded.item)), (2, 2));
}

/// A fleet's batch, one item per device: one commit of thousands of items,
/// and one load of them in order, with gaps.
#[tokio::test]
async fn a_fleet_sized_commit_lands_whole_and_loads_in_order() {
    let db = testkit::postgres::database().await.unwrap();
    let store = PostgresStore::open(db.config()).await.unwrap();
    let n = 5_000;
    let keys: Vec<ItemKey> = (0..n).map(|i| counter("s", &format!("d{i:05}"))).collect();
    let writes = keys
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 != 0)
        .map(|(i, k)| write(k.clone(), Condition::Absent, i as u64))
        .collect();
    commit_writes(&store, writes).await;
    let loaded = store.load(&keys).await.unwrap();
    assert_eq!(loaded.len(), n);
    for (i, item) in loaded.iter().enumerate() {
        match item {
            None => assert_eq!(i % 3, 0, "item {i} missing"),
            Some(l) => assert_eq!((value(&l.item), l.version), (i as u64, 1), "item {i}"),
        }
    }
    // Every one of them again, conditional on its version.
    let writes = loaded
        .iter()
        .zip(&keys)
        .filter_map(|(l, k)| {
            let l = l.as_ref()?;
            Some(write(
                k.clone(),
                Condition::Version(l.version),
                value(&l.item) + 1,
            ))
        })
        .collect();
    commit_writes(&store, writes).await;
    let loaded = store.load(&keys[1..3]).await.unwrap();
    assert_eq!(value(&loaded[0].as_ref().unwrap().item), 2);
    assert_eq!(loaded[1].as_ref().unwrap().version, 2);
}

fn dead_letter(received_at: i64) -> Write {
    let letter = DeadLetter::new(
        received_at,
        RejectReason::MalformedJson,
        "not JSON".into(),
        "s".into(),
        1u128.into(),
    );
    // Kept for ever: the test trims by count, not by age.
    Write {
        expires_at: None,
        ..Write::dead_letter(letter, 0, 0)
    }
}

#[tokio::test]
async fn dead_letters_are_trimmed_to_the_newest_per_reason() {
    let db = testkit::postgres::database().await.unwrap();
    let store = PostgresStore::open(db.config()).await.unwrap();
    commit_writes(&store, (1..=5).map(dead_letter).collect()).await;
    assert_eq!(store.trim_dead_letters(2).await.unwrap(), 3);
    assert_eq!(store.trim_dead_letters(2).await.unwrap(), 0);
    let pk = rollup::keys::dead_letter_pk(RejectReason::MalformedJson);
    let kept = store
        .range(testkit::store_conformance::range(&pk, "", "~", 10, false))
        .await
        .unwrap();
    let times: Vec<i64> = kept
        .iter()
        .map(|(_, item)| match &item.state {
            ItemState::DeadLetter(l) => l.received_at,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(times, [4, 5]);
}

#[tokio::test]
async fn a_bad_url_or_an_unreachable_server_is_a_clear_error() {
    let err = PostgresStore::connect("postgresql://u:secret@host:notaport/db")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a PostgreSQL connection string"), "{err}");
    assert!(
        !err.contains("secret"),
        "the password is not repeated: {err}"
    );

    // A socket directory with no server in it.
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "host={} user=u password=secret dbname=d",
        dir.path().display()
    );
    let err = PostgresStore::connect(&url).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    let err = err.to_string();
    assert!(
        err.contains("cannot connect to") && err.contains("database d"),
        "{err}"
    );
    assert!(!err.contains("secret"), "{err}");
}
