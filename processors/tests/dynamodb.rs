//! The store contract and DynamoDB specifics, run against moto.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use aws_sdk_dynamodb::types::AttributeValue;
use processors::store::dynamodb::DynamoStore;
use processors::store::{RollupQuery, RollupStore, StoreError};
use rollup::keys::ItemKey;
use rollup::{Commit, Condition, Write};
use schemas::state::{Item, ItemState};
use testkit::moto::{moto_config, unique_name};
use testkit::store_conformance::{commit_writes, counter, range, value, write};

async fn fresh_store() -> DynamoStore {
    let store = DynamoStore::connect(&moto_config().unwrap(), &unique_name("rollups")).await;
    store.create_table().await.unwrap();
    store
}

#[tokio::test]
async fn conformance() {
    testkit::store_conformance::run(&fresh_store().await).await;
}

#[tokio::test]
async fn create_table_twice_is_fine() {
    let store = fresh_store().await;
    store.create_table().await.unwrap();
    let ttl = store
        .client()
        .describe_time_to_live()
        .table_name(store.table_name())
        .send()
        .await
        .unwrap();
    let desc = ttl.time_to_live_description().unwrap();
    assert_eq!(desc.attribute_name(), Some("ttl"));
}

#[tokio::test]
async fn loads_more_keys_than_one_batch_holds_in_order() {
    let store = fresh_store().await;
    let writes: Vec<Write> = (0..150)
        .map(|i| write(counter("s", &format!("{i:03}")), Condition::Absent, i))
        .collect();
    commit_writes(&store, writes).await;
    // 250 keys: every written one (reversed), a repeat, and 99 missing ones.
    let mut keys: Vec<ItemKey> = (0..150)
        .rev()
        .map(|i| counter("s", &format!("{i:03}")))
        .collect();
    keys.push(counter("s", "007"));
    keys.extend((0..99).map(|i| counter("missing", &i.to_string())));
    let loaded = store.load(&keys).await.unwrap();
    assert_eq!(loaded.len(), keys.len());
    for (i, stored) in loaded.iter().take(150).enumerate() {
        assert_eq!(value(&stored.as_ref().unwrap().item), 149 - i as u64);
    }
    assert_eq!(value(&loaded[150].as_ref().unwrap().item), 7);
    assert!(loaded[151..].iter().all(Option::is_none));
}

#[tokio::test]
async fn expiry_is_stored_as_ttl_seconds_rounded_up() {
    let store = fresh_store().await;
    let key = counter("s", "ttl");
    let mut w = write(key.clone(), Condition::Absent, 1);
    w.expires_at = Some(1_764_240_000_001);
    commit_writes(&store, vec![w]).await;
    let raw = store
        .client()
        .get_item()
        .table_name(store.table_name())
        .key("pk", AttributeValue::S(key.pk()))
        .key("sk", AttributeValue::S(key.sk()))
        .send()
        .await
        .unwrap();
    let item = raw.item().unwrap();
    assert_eq!(item["ttl"].as_n().unwrap(), "1764240001");
    assert_eq!(item["v"].as_n().unwrap(), "1");
    assert!(item["s"].as_b().is_ok());
}

#[tokio::test]
async fn a_failed_write_keeps_then_from_starting() {
    let store = fresh_store().await;
    let (a, b) = (counter("s", "a"), counter("s", "b"));
    commit_writes(&store, vec![write(a.clone(), Condition::Absent, 1)]).await;
    let stale = Commit {
        writes: vec![write(a.clone(), Condition::Version(41), 2)],
        then: vec![write(b.clone(), Condition::Absent, 3)],
    };
    assert!(matches!(
        store.commit(stale).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(store.get(&b.pk(), &b.sk()).await.unwrap().is_none());
    assert_eq!(
        value(&store.get(&a.pk(), &a.sk()).await.unwrap().unwrap()),
        1
    );
}

#[tokio::test]
async fn ranges_end_exactly_before_to_across_pages() {
    let store = fresh_store().await;
    // Items of ~100 kB make DynamoDB page every ~10 items (1 MB pages).
    let big = |i: u64| Write {
        key: counter("r", &format!("{i:03}")),
        condition: Condition::Absent,
        item: Item {
            applied: schemas::state::AppliedMarks(vec![(
                "x".repeat(100_000),
                u128::from(i).into(),
            )]),
            state: ItemState::Counter(i),
        },
        expires_at: None,
    };
    commit_writes(&store, (0..30).map(big).collect()).await;
    let pk = counter("r", "").pk();
    let range = |from, to, limit, descending| range(&pk, from, to, limit, descending);
    let sks = |rows: Vec<(String, Item)>| rows.into_iter().map(|(sk, _)| sk).collect::<Vec<_>>();
    let up = store
        .range(range("r|003", "r|027", 100, false))
        .await
        .unwrap();
    let up = sks(up);
    assert_eq!(up.len(), 24);
    assert_eq!((up[0].as_str(), up[23].as_str()), ("r|003", "r|026"));
    let down = sks(store.range(range("r|003", "r|027", 5, true)).await.unwrap());
    assert_eq!(down, ["r|026", "r|025", "r|024", "r|023", "r|022"]);
    let all_down = sks(store.range(range("", "r|010", 100, true)).await.unwrap());
    assert_eq!(all_down.len(), 10);
    assert_eq!(all_down[0], "r|009");
    // The end is exclusive, so these ranges hold nothing.
    for (from, to) in [("r|005", "r|005"), ("r|006", "r|005")] {
        let rows = store.range(range(from, to, 10, false)).await.unwrap();
        assert!(rows.is_empty(), "{from}..{to}: {}", rows.len());
    }
}

#[tokio::test]
async fn a_missing_table_is_unavailable_not_a_panic() {
    let store = DynamoStore::connect(&moto_config().unwrap(), &unique_name("missing")).await;
    let loaded = store.load(&[counter("s", "a")]).await;
    assert!(
        matches!(loaded, Err(StoreError::Unavailable(_))),
        "{loaded:?}"
    );
    let committed = store
        .commit(Commit {
            writes: vec![write(counter("s", "a"), Condition::Absent, 1)],
            then: vec![],
        })
        .await;
    assert!(matches!(committed, Err(StoreError::Unavailable(_))));
}

/// At a real fleet's shape (every batch holds one reading of each device) a
/// reading costs about one item write on DynamoDB, and a quiet device's span
/// fits one write unit: the figures `iotpipe cost` models.
#[tokio::test]
async fn a_fleet_shaped_batch_costs_about_one_item_write_per_reading() {
    use processors::metrics::ProcessorMetrics;
    use processors::run::process_batch;
    use schemas::{Metric, PackedRecord, Reading};
    use std::sync::atomic::Ordering;

    const T0: i64 = 1_764_240_000_000;
    let devices = 500u64;
    let batches = 10u64;
    let store = fresh_store().await;
    let cfg = rollup::AggregateConfig::default();
    let metrics = ProcessorMetrics::default();
    let mut readings_after_first = 0;
    let mut writes_after_first = 0;
    for b in 0..batches {
        // One message a minute from each device, three metrics.
        let at = T0 + b as i64 * 60_000;
        let records: Vec<_> = (0..devices)
            .map(|d| {
                let readings = PackedRecord {
                    device_id: format!("meter-{d:05}"),
                    fleet: "fleet-1".into(),
                    received_at: at + 500,
                    readings: vec![Reading {
                        seq: Some(b),
                        ts: at + d as i64,
                        metrics: ["temperature", "humidity", "pressure"]
                            .iter()
                            .map(|m| Metric {
                                name: m.to_string(),
                                value: 20.0 + d as f64 / 7.0 + b as f64,
                            })
                            .collect(),
                    }],
                };
                testkit::batches::packed(b * devices + d + 1, readings)
            })
            .collect();
        let before = metrics.store_writes.load(Ordering::Relaxed);
        process_batch("shard-0000", &records, &store, &cfg, &metrics)
            .await
            .unwrap();
        if b > 0 {
            readings_after_first += devices;
            writes_after_first += metrics.store_writes.load(Ordering::Relaxed) - before;
        }
    }
    let per_reading = writes_after_first as f64 / readings_after_first as f64;
    eprintln!(
        "{writes_after_first} item writes for {readings_after_first} readings: {per_reading:.3} per reading"
    );
    assert!(per_reading <= 1.1, "{per_reading} item writes per reading");
    // The fullest span: ten one-minute windows of three metrics.
    let span = store
        .get("s|meter-00499", &rollup::keys::time_sk(cfg.span_start(T0)))
        .await
        .unwrap()
        .unwrap();
    let bytes = span.encode().len() + "s|meter-00499".len() + 15 + "pk sk version state".len();
    eprintln!("a full quiet span: {bytes} bytes");
    assert!(bytes <= 1024, "{bytes} bytes: more than one write unit");
}
