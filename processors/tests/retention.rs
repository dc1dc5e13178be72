//! Retention per resolution, on every store: once a resolution's windows
//! have been kept as long as configured, the API no longer serves them and
//! the store lets them go (SQLite and PostgreSQL delete them in their purge,
//! DynamoDB's items carry the TTL that deletes them), while a resolution kept
//! `forever` stays whole.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use processors::api::{ApiState, app};
use processors::metrics::ProcessorMetrics;
use processors::run::{advance_idle_watermark, process_batch, sweep_quiet_devices};
use processors::store::{Range, RollupQuery, RollupStore};
use rollup::AggregateConfig;
use rollup::keys;
use schemas::Resolution;
use schemas::shard::Record;
use serde_json::Value;
use tower::ServiceExt;

/// An hour boundary.
const T0: i64 = 1_764_244_800_000;
const MIN: i64 = 60_000;
const HOUR: i64 = Resolution::HOUR;
/// Readings of the one device, a minute apart from T0.
const READINGS: i64 = 6;

/// Minutes kept ten minutes, hours forever.
fn config() -> AggregateConfig {
    let resolutions: Vec<Resolution> = vec!["1m".parse().unwrap(), "1h".parse().unwrap()];
    let config = AggregateConfig {
        retention_ms: rollup::config::parse_retention("1m=10m,1h=forever", &resolutions).unwrap(),
        resolutions,
        allowed_lateness_ms: 5 * MIN,
        stream_retention_ms: MIN,
        ..AggregateConfig::default()
    };
    config.validate().unwrap();
    config
}

/// Reading `i` of the one device, `i` minutes after T0, worth `i`.
fn record(i: i64) -> Record {
    testkit::batches::one_reading(i as u64 + 1, "d1", "f", T0 + i * MIN + 5, i as f64)
}

/// Windows the API serves for `scope` (`devices/d1` or `fleets/f`) at `res`
/// over the first hour, asked at `now`.
async fn served<S: RollupQuery>(store: &Arc<S>, now: i64, scope: &str, res: &str) -> Vec<Value> {
    let mut state = ApiState::new(store.clone(), Arc::new(config()));
    state.clock = Arc::new(move || now);
    let uri = format!("/v1/{scope}/metrics/t?res={res}&from={T0}&to={}", T0 + HOUR);
    let response = app(state)
        .oneshot(Request::get(&uri).body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{uri}");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&body).unwrap();
    body["windows"].as_array().unwrap().clone()
}

/// Rows of partition `pk` the store still holds.
async fn rows<S: RollupQuery>(store: &S, pk: String) -> usize {
    store
        .range(Range {
            pk,
            from: String::new(),
            to: "~".into(),
            limit: 1000,
            descending: false,
        })
        .await
        .unwrap()
        .len()
}

/// Writes the device's readings, compacts its hour once the hour can no
/// longer change, and checks what the API serves before and after the
/// minutes expire. Returns the time the minutes have expired by.
async fn write_and_serve<S: RollupQuery + RollupStore>(store: &Arc<S>) -> i64 {
    let cfg = config();
    let batch: Vec<Record> = (0..READINGS).map(record).collect();
    process_batch(
        "s0",
        &batch,
        store.as_ref(),
        &cfg,
        &ProcessorMetrics::default(),
    )
    .await
    .unwrap();
    // Just after the last reading every minute is served.
    let fresh = T0 + READINGS * MIN;
    for scope in ["devices/d1", "fleets/f"] {
        assert_eq!(
            served(store, fresh, scope, "1m").await.len(),
            READINGS as usize,
            "{scope}"
        );
    }
    // The hour is over and past its lateness: the sweep compacts it.
    let settled = T0 + HOUR + cfg.allowed_lateness_ms + cfg.watermark_slack_ms + 1;
    advance_idle_watermark("s0", store.as_ref(), &cfg, settled)
        .await
        .unwrap();
    assert_eq!(
        sweep_quiet_devices(store.as_ref(), store.as_ref(), &cfg)
            .await
            .unwrap(),
        1
    );
    // Every minute and every span has expired two hours on.
    let later = T0 + 3 * HOUR;
    for scope in ["devices/d1", "fleets/f"] {
        assert_eq!(
            served(store, later, scope, "1m").await,
            Vec::<Value>::new(),
            "{scope}"
        );
        let hours = served(store, later, scope, "1h").await;
        assert_eq!(hours.len(), 1, "{scope}: {hours:?}");
        assert_eq!(hours[0]["count"], READINGS, "{scope}: {hours:?}");
        assert_eq!(hours[0]["max"], (READINGS - 1) as f64, "{scope}: {hours:?}");
    }
    later
}

/// What a store that deletes must hold after its purge: no minute, no span,
/// every hour.
async fn only_hours_remain<S: RollupQuery>(store: &S) {
    let [minute, hour] = [0, 1].map(|i| config().resolutions[i]);
    assert_eq!(rows(store, keys::span_pk("d1")).await, 0);
    assert_eq!(
        rows(store, keys::fleet_window_pk("f", "t", minute)).await,
        0
    );
    assert_eq!(rows(store, keys::device_window_pk("d1", hour)).await, 1);
    assert!(rows(store, keys::fleet_window_pk("f", "t", hour)).await >= 1);
}

#[tokio::test]
async fn the_memory_store_serves_only_what_is_retained() {
    let store = Arc::new(processors::store::memory::MemoryStore::new());
    write_and_serve(&store).await;
}

#[tokio::test]
async fn sqlite_deletes_an_expired_resolution_and_keeps_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let store = processors::store::sqlite::SqliteStore::open(&dir.path().join("r.db")).unwrap();
    let store = Arc::new(store);
    let later = write_and_serve(&store).await;
    assert!(store.purge_expired(later).await.unwrap() >= READINGS as usize);
    only_hours_remain(store.as_ref()).await;
    // Served the same after the purge as before it.
    assert_eq!(served(&store, later, "fleets/f", "1h").await.len(), 1);
}

#[tokio::test]
async fn postgres_deletes_an_expired_resolution_and_keeps_the_others() {
    use processors::store::postgres::PostgresStore;
    let db = testkit::postgres::database().await.unwrap();
    let store = Arc::new(PostgresStore::open(db.config()).await.unwrap());
    let later = write_and_serve(&store).await;
    assert!(store.purge_expired(later).await.unwrap() >= READINGS as usize);
    only_hours_remain(store.as_ref()).await;
}

/// DynamoDB deletes by TTL within days of it (moto does not run it): each
/// minute carries its expiry, each hour none, and the API hides the minutes
/// meanwhile.
#[tokio::test]
async fn dynamodb_gives_an_expiring_resolution_its_ttl_and_the_others_none() {
    use aws_sdk_dynamodb::types::AttributeValue;
    use processors::store::dynamodb::{DynamoStore, TTL_ATTRIBUTE};
    let store = DynamoStore::connect(
        &testkit::moto::moto_config().unwrap(),
        &testkit::moto::unique_name("retention"),
    )
    .await;
    store.create_table().await.unwrap();
    let store = Arc::new(store);
    let later = write_and_serve(&store).await;
    let [minute, hour] = [0, 1].map(|i| config().resolutions[i]);
    let ttls = |pk: String| {
        let store = store.clone();
        async move {
            let out = store
                .client()
                .query()
                .table_name(store.table_name())
                .key_condition_expression("pk = :pk")
                .expression_attribute_values(":pk", AttributeValue::S(pk))
                .send()
                .await
                .unwrap();
            out.items()
                .iter()
                .map(|item| {
                    item.get(TTL_ATTRIBUTE)
                        .map(|v| v.as_n().unwrap().parse::<i64>().unwrap())
                })
                .collect::<Vec<_>>()
        }
    };
    let minutes = ttls(keys::fleet_window_pk("f", "t", minute)).await;
    assert_eq!(minutes.len(), READINGS as usize);
    for (i, ttl) in minutes.iter().enumerate() {
        // A minute's window ends a minute after its start, then is kept 10.
        let expires_s = (T0 + i as i64 * MIN + 11 * MIN) / 1000;
        assert_eq!(*ttl, Some(expires_s), "minute {i}");
        assert!(expires_s * 1000 <= later);
    }
    for pk in [
        keys::fleet_window_pk("f", "t", hour),
        keys::device_window_pk("d1", hour),
    ] {
        let hours = ttls(pk.clone()).await;
        assert!(
            !hours.is_empty() && hours.iter().all(Option::is_none),
            "{pk}: {hours:?}"
        );
    }
}
