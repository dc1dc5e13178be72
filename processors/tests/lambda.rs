//! The Lambda functions' handlers on checked-in events, against DynamoDB on
//! moto.
//!
//! The Kinesis event fixtures are golden files: `fixture_sources_match`
//! rebuilds each from the readings below and compares; run with
//! `UPDATE_FIXTURES=1` to rewrite them after a deliberate change.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use aws_lambda_events::event::kinesis::KinesisEvent;
use aws_lambda_events::event::streams::KinesisEventResponse;
use axum::http::StatusCode;
use http_body_util::BodyExt;
use processors::api::{ApiState, app};
use processors::lambda::Handler;
use processors::lambda::aggregate::AggregateHandler;
use processors::store::dynamodb::DynamoStore;
use processors::store::{RollupQuery, RollupStore, StoreError};
use rollup::AggregateConfig;
use rollup::keys::ItemKey;
use rollup::{Commit, LoadedItem};
use schemas::state::ItemState;
use schemas::{Metric, PackedRecord, Reading};
use serde_json::{Value, json};
use testkit::lambda::kinesis_event_record;
use testkit::moto::{moto_config, unique_name};
use tower::ServiceExt;

/// A minute boundary: 2025-11-27T10:40:00Z.
const T0: i64 = 1_764_240_000_000;
const SHARD: &str = "shardId-000000000000";
/// Sequence numbers as a stream of this age hands them out, small enough
/// for [`stream::SeqNo`].
const SEQ_BASE: u128 = 49_655_000_000_000_000_000_000_000_000_000_000_000;

fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// One Kinesis event record as the event source mapping writes it.
fn event_record(n: usize, partition_key: &str, data: &[u8], arrival_ms: i64) -> Value {
    let seq = (SEQ_BASE + n as u128 * 1_000).to_string();
    kinesis_event_record(SHARD, &seq, partition_key, data, arrival_ms)
}

/// The IoT rule's shape: payload fields plus `device_id`, `fleet` and
/// `received_at`; one message that is not JSON at all.
fn iot_rule_event() -> Value {
    let mut records = Vec::new();
    for i in 0..6usize {
        let device = if i % 2 == 0 { "dev-1" } else { "dev-2" };
        let ts = T0 + 5_000 * i as i64;
        let message = json!({
            "seq": i / 2 + 1,
            "ts": ts,
            "metrics": {"temperature": 20.0 + i as f64, "humidity": 40.5},
            "device_id": device,
            "fleet": "f1",
            "received_at": ts + 250,
        });
        records.push(event_record(
            i,
            device,
            message.to_string().as_bytes(),
            ts + 300,
        ));
    }
    records.push(event_record(6, "dev-3", b"temperature=21", T0 + 40_000));
    json!({ "Records": records })
}

/// iotpipe's packed records: several readings of one device per record.
fn packed_event() -> Value {
    let mut records = Vec::new();
    for (i, device) in ["dev-7", "dev-8", "dev-7"].into_iter().enumerate() {
        let base = T0 + 20_000 * i as i64;
        let packed = PackedRecord {
            device_id: device.into(),
            fleet: "f2".into(),
            received_at: base + 3_000,
            readings: (0..3)
                .map(|k| Reading {
                    seq: Some((i * 3 + k) as u64),
                    ts: base + 1_000 * k as i64,
                    metrics: vec![Metric {
                        name: "pressure".into(),
                        value: 1000.0 + (i * 3 + k) as f64,
                    }],
                })
                .collect(),
        };
        // Later in the shard than the IoT rule fixture's records, so that
        // both can be applied to one store in that order.
        records.push(event_record(
            100 + i,
            device,
            &packed.encode(),
            base + 3_100,
        ));
    }
    json!({ "Records": records })
}

fn load_fixture(name: &str) -> KinesisEvent {
    let text = std::fs::read_to_string(fixture_path(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn iot_fixture() -> KinesisEvent {
    load_fixture("kinesis-iot-rule.json")
}

fn packed_fixture() -> KinesisEvent {
    load_fixture("kinesis-packed.json")
}

#[test]
fn fixture_sources_match() {
    for (name, source) in [
        ("kinesis-iot-rule.json", iot_rule_event as fn() -> Value),
        ("kinesis-packed.json", packed_event),
    ] {
        if std::env::var_os("UPDATE_FIXTURES").is_some() {
            let text = serde_json::to_string_pretty(&source()).unwrap();
            std::fs::write(fixture_path(name), text + "\n").unwrap();
        }
        let text = std::fs::read_to_string(fixture_path(name)).unwrap();
        let on_disk: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            on_disk,
            source(),
            "{name} is stale; rerun with UPDATE_FIXTURES=1"
        );
        // The typed event round-trips, so nothing in the fixture is ignored.
        let event: KinesisEvent = serde_json::from_value(on_disk.clone()).unwrap();
        assert_eq!(
            event.records.len(),
            on_disk["Records"].as_array().unwrap().len()
        );
        let again: KinesisEvent =
            serde_json::from_value(serde_json::to_value(&event).unwrap()).unwrap();
        assert_eq!(again, event);
    }
}

async fn fresh_store() -> DynamoStore {
    let store = DynamoStore::connect(&moto_config().unwrap(), &unique_name("rollups")).await;
    store.create_table().await.unwrap();
    store
}

fn handler(store: Arc<dyn RollupStore>) -> AggregateHandler {
    AggregateHandler::new(store, AggregateConfig::default())
}

fn failures(response: &KinesisEventResponse) -> Vec<String> {
    response
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.clone().unwrap_or_default())
        .collect()
}

/// Every item of the table: (pk, sk) → (version, state bytes).
async fn snapshot(store: &DynamoStore) -> BTreeMap<(String, String), (String, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut start = None;
    loop {
        let page = store
            .client()
            .scan()
            .table_name(store.table_name())
            .set_exclusive_start_key(start)
            .send()
            .await
            .unwrap();
        for item in page.items() {
            out.insert(
                (
                    item["pk"].as_s().unwrap().clone(),
                    item["sk"].as_s().unwrap().clone(),
                ),
                (
                    item["v"].as_n().unwrap().clone(),
                    item["s"].as_b().unwrap().clone().into_inner(),
                ),
            );
        }
        match page.last_evaluated_key {
            Some(key) => start = Some(key),
            None => return out,
        }
    }
}

/// The states alone, without versions: what a reader of the rollups sees.
fn states(
    snapshot: &BTreeMap<(String, String), (String, Vec<u8>)>,
) -> BTreeMap<(String, String), Vec<u8>> {
    snapshot
        .iter()
        .map(|(k, (_, s))| (k.clone(), s.clone()))
        .collect()
}

async fn window_count(store: &DynamoStore, device: &str, metric: &str, start: i64) -> u64 {
    let cfg = rollup::AggregateConfig::default();
    let key = ItemKey::Span {
        device: device.into(),
        start: cfg.span_start(start),
    };
    match store.get(&key.pk(), &key.sk()).await.unwrap() {
        Some(item) => match item.state {
            ItemState::Span(span) => rollup::span::finest_windows(&span, metric)
                .find(|(s, _)| *s == start)
                .map_or(0, |(_, w)| w.count),
            other => panic!("{other:?}"),
        },
        None => 0,
    }
}

async fn counter(store: &DynamoStore, name: &str) -> u64 {
    let key = ItemKey::Counter {
        shard: SHARD.into(),
        name: name.into(),
    };
    match store.get(&key.pk(), &key.sk()).await.unwrap() {
        Some(item) => match item.state {
            ItemState::Counter(n) => n,
            other => panic!("{other:?}"),
        },
        None => 0,
    }
}

/// A fresh table after the handler took `event`, reporting no record failed.
async fn taking_whole(event: KinesisEvent) -> Arc<DynamoStore> {
    let store = Arc::new(fresh_store().await);
    let response = handler(store.clone()).handle(event).await;
    assert!(failures(&response).is_empty(), "{response:?}");
    store
}

/// Each fixture on its own table: the minute windows at `T0` count its
/// readings per (device, metric), and its counters read as listed (the IoT
/// rule fixture holds one bad record).
#[tokio::test]
async fn each_fixture_becomes_rollups_and_bad_records_are_counted() {
    type Windows = &'static [(&'static str, &'static str, u64)];
    type Counters = &'static [(&'static str, u64)];
    let cases: [(&str, KinesisEvent, Windows, Counters); 2] = [
        (
            "IoT rule records",
            iot_fixture(),
            &[("dev-1", "temperature", 3), ("dev-2", "humidity", 3)],
            &[("accepted_readings", 6), ("rejected:bad_record", 1)],
        ),
        (
            "packed records",
            packed_fixture(),
            &[("dev-7", "pressure", 6), ("dev-8", "pressure", 3)],
            &[("accepted_readings", 9)],
        ),
    ];
    for (what, event, windows, counters) in cases {
        let store = taking_whole(event).await;
        for &(device, metric, count) in windows {
            let got = window_count(&store, device, metric, T0).await;
            assert_eq!(got, count, "{what}: {device} {metric}");
        }
        for &(name, value) in counters {
            assert_eq!(counter(&store, name).await, value, "{what}: {name}");
        }
    }
}

#[tokio::test]
async fn a_replayed_batch_leaves_the_rollups_unchanged() {
    let store = Arc::new(fresh_store().await);
    let handler = handler(store.clone());
    for event in [iot_fixture(), packed_fixture()] {
        assert!(failures(&handler.handle(event).await).is_empty());
    }
    let once = snapshot(&store).await;
    assert!(once.len() > 10, "{} items", once.len());
    for event in [iot_fixture(), packed_fixture()] {
        assert!(failures(&handler.handle(event).await).is_empty());
    }
    let twice = snapshot(&store).await;
    assert_eq!(once, twice, "a replay wrote to the table");
    assert_eq!(counter(&store, "accepted_readings").await, 15);
}

/// A store that lets the first `allow` writes of a commit land and then
/// fails, like a crash halfway through a batch.
struct Faulty {
    inner: Arc<DynamoStore>,
    allow: usize,
    commits: AtomicUsize,
}

#[async_trait]
impl RollupStore for Faulty {
    async fn load(&self, keys: &[ItemKey]) -> Result<Vec<Option<LoadedItem>>, StoreError> {
        self.inner.load(keys).await
    }

    async fn commit(&self, mut commit: Commit) -> Result<(), StoreError> {
        self.commits.fetch_add(1, Ordering::Relaxed);
        commit.writes.truncate(self.allow);
        commit.then.clear();
        self.inner.commit(commit).await?;
        Err(StoreError::Unavailable("injected: throttled".into()))
    }
}

#[tokio::test]
async fn a_store_fault_names_the_first_record_and_a_retry_is_exact() {
    // The reference: the same event on a healthy store.
    let clean = Arc::new(fresh_store().await);
    let event = iot_fixture();
    assert!(failures(&handler(clean.clone()).handle(event.clone()).await).is_empty());

    let store = Arc::new(fresh_store().await);
    let faulty = Arc::new(Faulty {
        inner: store.clone(),
        allow: 5,
        commits: AtomicUsize::new(0),
    });
    let response = handler(faulty.clone()).handle(event.clone()).await;
    let first = event.records[0].kinesis.sequence_number.clone();
    assert_eq!(failures(&response), [first]);
    assert!(faulty.commits.load(Ordering::Relaxed) >= 1);
    assert!(
        !snapshot(&store).await.is_empty(),
        "the fault should leave part of the batch behind"
    );

    // Lambda retries from the reported record: here, the whole batch.
    let response = handler(store.clone()).handle(event).await;
    assert!(failures(&response).is_empty(), "{response:?}");
    assert_eq!(
        states(&snapshot(&store).await),
        states(&snapshot(&clean).await)
    );
}

#[tokio::test]
async fn real_56_digit_sequence_numbers_apply_and_replay_exactly() {
    let store = Arc::new(fresh_store().await);
    let mut event = iot_fixture();
    // Real streams' sequence numbers are 56 digits (about 186 bits).
    let base = "4959033827149025660855969253836157109592157598913658889";
    for (i, record) in event.records.iter_mut().enumerate() {
        record.kinesis.sequence_number = format!("{base}{i}");
    }
    let response = handler(store.clone()).handle(event.clone()).await;
    assert!(failures(&response).is_empty(), "{response:?}");
    let accepted = counter(&store, "accepted_readings").await;
    assert!(accepted > 0);
    // The same batch again: every item already holds these positions.
    assert!(failures(&handler(store.clone()).handle(event).await).is_empty());
    assert_eq!(counter(&store, "accepted_readings").await, accepted);
}

#[tokio::test]
async fn a_sequence_number_that_is_not_a_number_stops_the_shard_before_it() {
    let store = Arc::new(fresh_store().await);
    let mut event = iot_fixture();
    event.records[2].kinesis.sequence_number = "not-a-number".to_string();
    let response = handler(store.clone()).handle(event).await;
    assert_eq!(failures(&response), ["not-a-number"]);
    // The two records before it are applied: one reading each.
    assert_eq!(counter(&store, "accepted_readings").await, 2);
}

#[tokio::test]
async fn the_query_function_answers_api_gateway_requests_from_dynamodb() {
    let store = Arc::new(fresh_store().await);
    assert!(failures(&handler(store.clone()).handle(iot_fixture()).await).is_empty());
    let text = std::fs::read_to_string(fixture_path("apigw-http-get-device.json")).unwrap();
    let request = lambda_http::request::from_str(&text).unwrap();
    let state = ApiState::new(store, Arc::new(AggregateConfig::default()));
    let response = app(state).oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let device: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(device["device_id"], "dev-1");
    assert_eq!(device["fleet"], "f1");
    assert_eq!(device["metrics"]["temperature"]["value"], 24.0);
}

#[tokio::test]
async fn the_lazy_store_connects_on_first_use() {
    let table = fresh_store().await;
    let lazy = processors::lambda::lazy::LazyDynamoStore::new(
        moto_config().unwrap(),
        table.table_name(),
        AggregateConfig::default(),
    );
    let response = handler(Arc::new(lazy)).handle(packed_fixture()).await;
    assert!(failures(&response).is_empty(), "{response:?}");
    assert_eq!(window_count(&table, "dev-8", "pressure", T0).await, 3);
}

/// Records one-minute spans as `table`'s layout, as a deployment with
/// `SPAN=1m` that wrote it first would have.
async fn written_with_one_minute_spans(table: &DynamoStore) {
    let minute = AggregateConfig {
        span: Some(60_000),
        ..AggregateConfig::default()
    };
    processors::store::layout::ensure(table, table, &minute)
        .await
        .unwrap();
}

/// The query function's role only reads: on a table nobody has written it
/// records no layout and still answers; on a table of other spans it
/// refuses to answer rather than merge the wrong items.
#[tokio::test]
async fn the_query_functions_store_compares_the_layout_and_never_writes_it() {
    use processors::lambda::lazy::LazyDynamoStore;
    let table = fresh_store().await;
    // A store per process: the layout is checked once, on first use.
    let reading_store = |table: &DynamoStore| {
        LazyDynamoStore::reading(
            moto_config().unwrap(),
            table.table_name(),
            AggregateConfig::default(),
        )
    };
    let reading = reading_store(&table);
    assert!(reading.get("d|dev-1", "-").await.unwrap().is_none());
    let layout = ItemKey::Layout;
    assert!(
        table
            .get(&layout.pk(), &layout.sk())
            .await
            .unwrap()
            .is_none()
    );
    written_with_one_minute_spans(&table).await;
    let other = reading_store(&table);
    let err = other.get("d|dev-1", "-").await.unwrap_err();
    assert!(matches!(err, StoreError::Layout(_)), "{err}");
}

/// A function configured for other spans than the table was written with
/// would count a duplicate twice: it fails its batches instead, every time,
/// and writes nothing.
#[tokio::test]
async fn a_function_configured_for_other_spans_refuses_the_table() {
    let table = fresh_store().await;
    written_with_one_minute_spans(&table).await;
    let lazy = processors::lambda::lazy::LazyDynamoStore::new(
        moto_config().unwrap(),
        table.table_name(),
        AggregateConfig::default(),
    );
    let handler = handler(Arc::new(lazy));
    for _ in 0..2 {
        let response = handler.handle(packed_fixture()).await;
        assert!(!failures(&response).is_empty(), "{response:?}");
    }
    assert_eq!(window_count(&table, "dev-8", "pressure", T0).await, 0);
    assert_eq!(counter(&table, "accepted_readings").await, 0);
}
