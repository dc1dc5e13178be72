//! `GET /v1/devices` on the DynamoDB store, against moto: a fleet's devices
//! come from a Query on its member partition, never from a Scan, page by
//! page; without `fleet=` the API refuses rather than scan.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use aws_lambda_events::event::kinesis::KinesisEvent;
use aws_sdk_dynamodb::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use processors::api::{ApiState, app};
use processors::lambda::aggregate::AggregateHandler;
use processors::store::dynamodb::DynamoStore;
use rollup::AggregateConfig;
use serde_json::{Value, json};
use testkit::lambda::kinesis_event_record;
use testkit::moto::{moto_config, unique_name};
use tower::ServiceExt;

/// A minute boundary: 2025-11-27T10:40:00Z.
const T0: i64 = 1_764_240_000_000;

/// Counts the DynamoDB operations a client sends, by their `X-Amz-Target`
/// (`DynamoDB_20120810.Query`, `...Scan`).
#[derive(Debug, Clone, Default)]
struct OperationCounter(Arc<Mutex<BTreeMap<String, usize>>>);

impl OperationCounter {
    fn take(&self) -> BTreeMap<String, usize> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

impl Intercept for OperationCounter {
    fn name(&self) -> &'static str {
        "OperationCounter"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let target = context
            .request()
            .headers()
            .get("x-amz-target")
            .unwrap_or("unknown");
        let operation = target.rsplit('.').next().unwrap_or(target).to_string();
        *self.0.lock().unwrap().entry(operation).or_default() += 1;
        Ok(())
    }
}

/// IoT rule records for devices of fleets `f` and `f-1` (a fleet whose
/// name starts with the other's), one reading each.
fn readings_event() -> KinesisEvent {
    let devices = [("f", "d1"), ("f-1", "d9"), ("f", "d2"), ("f", "d3")];
    let records: Vec<Value> = devices
        .iter()
        .enumerate()
        .map(|(i, (fleet, device))| {
            let data = json!({"seq": 1, "ts": T0 + i as i64, "metrics": {"t": 1.0},
                "device_id": device, "fleet": fleet, "received_at": T0 + 500});
            let seq =
                (49_655_000_000_000_000_000_000_000_000_000_000_000u128 + i as u128).to_string();
            kinesis_event_record(
                "shardId-000000000000",
                &seq,
                device,
                data.to_string().as_bytes(),
                T0 + 600,
            )
        })
        .collect();
    serde_json::from_value(json!({ "Records": records })).unwrap()
}

async fn get(state: &ApiState, path: &str) -> (StatusCode, Value) {
    let resp = app(state.clone())
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap())
}

fn ids(body: &Value) -> Vec<String> {
    body["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["fleet"].as_str().unwrap(),
                d["device_id"].as_str().unwrap()
            )
        })
        .collect()
}

#[tokio::test]
async fn a_fleets_devices_are_listed_by_query_never_by_scan() {
    let counter = OperationCounter::default();
    let sdk = moto_config().unwrap().load().await;
    let client = aws_sdk_dynamodb::Client::from_conf(
        aws_sdk_dynamodb::config::Builder::from(&sdk)
            .interceptor(counter.clone())
            .build(),
    );
    let store = Arc::new(DynamoStore::new(client, unique_name("rollups")));
    store.create_table().await.unwrap();
    let handler = AggregateHandler::new(store.clone(), AggregateConfig::default());
    let (response, _) = handler.process(&readings_event()).await;
    assert!(response.batch_item_failures.is_empty());
    let state = ApiState::new(store, Arc::new(AggregateConfig::default()));
    counter.take();

    let (status, body) = get(&state, "/v1/devices?fleet=f").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(ids(&body), ["f/d1", "f/d2", "f/d3"]);
    assert_eq!(body["next_cursor"], Value::Null);
    let mut paged = Vec::new();
    let mut path = "/v1/devices?fleet=f&limit=2".to_string();
    loop {
        let (status, body) = get(&state, &path).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        paged.extend(ids(&body));
        match body["next_cursor"].as_str() {
            Some(c) => path = format!("/v1/devices?fleet=f&limit=2&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(paged, ["f/d1", "f/d2", "f/d3"]);
    let (_, body) = get(&state, "/v1/devices?fleet=f-1").await;
    assert_eq!(ids(&body), ["f-1/d9"]);

    let sent = counter.take();
    assert_eq!(sent.get("Scan"), None, "{sent:?}");
    assert!(sent.get("Query").is_some_and(|&n| n >= 4), "{sent:?}");

    // Without a fleet, listing would need every partition: refused.
    let (status, body) = get(&state, "/v1/devices").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["detail"].as_str().unwrap().contains("fleet"), "{body}");
    let (status, _) = get(&state, "/v1/devices?fleet=f&cursor=f-1/d9").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(counter.take().is_empty());
}
