//! The replay function against SQS and Kinesis on moto: a message the IoT
//! rule could not deliver goes back into the stream in the rule's shape, a
//! message replayed twice counts once in the rollups the API serves, and a
//! message that is not a rule error is named failed while the others go
//! through.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use aws_lambda_events::event::kinesis::KinesisEvent;
use aws_lambda_events::event::sqs::SqsEvent;
use aws_sdk_sqs::types::MessageSystemAttributeName;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine;
use http_body_util::BodyExt;
use processors::api::{ApiState, app};
use processors::lambda::aggregate::AggregateHandler;
use processors::lambda::emf::EmfConfig;
use processors::lambda::replay::ReplayHandler;
use processors::store::memory::MemoryStore;
use rollup::AggregateConfig;
use schemas::shard::Record;
use serde_json::{Value, json};
use stream::ShardReader;
use stream::kinesis::KinesisStream;
use testkit::lambda::kinesis_event_record;
use testkit::moto::{moto_config, sqs_queue, unique_name};
use tower::ServiceExt;

const TOPIC: &str = "dt/plant-a/dev-1/telemetry";
/// A minute boundary: 2025-11-27T10:40:00Z.
const T0: i64 = 1_764_240_000_000;

/// The error action's message for a payload published on `TOPIC`, in the
/// format IoT Core documents.
fn rule_error_message(payload: &[u8]) -> String {
    json!({
        "ruleName": "TelemetryRule",
        "topic": TOPIC,
        "cloudwatchTraceId": "7e146a2c-95b5-6caf-98b9-50e3969734c7",
        "clientId": "dev-1",
        "base64OriginalPayload": base64::engine::general_purpose::STANDARD.encode(payload),
        "failures": [{
            "failedAction": "KinesisAction",
            "failedResource": "iotpipe-telemetry",
            "errorMessage": "Failed to put record: Rate exceeded for shard"
        }]
    })
    .to_string()
}

/// The event the SQS event source mapping hands the function for
/// `messages`, as received from the queue.
fn sqs_event(queue_arn: &str, messages: &[aws_sdk_sqs::types::Message]) -> SqsEvent {
    let records: Vec<Value> = messages
        .iter()
        .map(|m| {
            json!({
                "messageId": m.message_id(),
                "receiptHandle": m.receipt_handle(),
                "body": m.body(),
                "attributes": m.attributes().map(|a| a.iter()
                    .map(|(k, v)| (k.as_str().to_string(), Value::from(v.as_str())))
                    .collect::<serde_json::Map<_, _>>()),
                "messageAttributes": {},
                "md5OfBody": m.md5_of_body(),
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": "us-east-1",
            })
        })
        .collect();
    serde_json::from_value(json!({ "Records": records })).unwrap()
}

/// The Kinesis event the aggregate function would get for `records`.
fn kinesis_event(shard: &str, records: &[Record]) -> KinesisEvent {
    let records: Vec<Value> = records
        .iter()
        .map(|r| {
            kinesis_event_record(
                shard,
                &r.seq.to_string(),
                &r.partition_key,
                &r.data,
                r.arrival_ms,
            )
        })
        .collect();
    serde_json::from_value(json!({ "Records": records })).unwrap()
}

/// Every record of the stream's only shard, expecting `n`.
async fn read_all(stream: &KinesisStream, n: usize) -> (String, Vec<Record>) {
    let shard = stream.shard_ids().await.unwrap().remove(0);
    let mut reader = stream.reader(&shard, "replay-test").await.unwrap();
    let mut records = Vec::new();
    // Bounded: each call waits at most its timeout for records that are
    // already stored.
    for _ in 0..10 {
        if records.len() >= n {
            break;
        }
        let batch = reader
            .next_batch(100, Duration::from_secs(2))
            .await
            .unwrap();
        records.extend(batch);
    }
    (shard, records)
}

#[tokio::test]
async fn a_rule_error_is_replayed_once_and_a_bad_message_fails_alone() {
    let aws = moto_config().unwrap();
    let sdk = aws.load().await;
    let sqs = aws_sdk_sqs::Client::new(&sdk);
    let queue_url = sqs_queue(&sqs, "rule-errors").await.unwrap();
    let stream =
        KinesisStream::connect(&aws, &unique_name("telemetry"), &unique_name("leases")).await;
    stream.create(Some(1)).await.unwrap();
    stream.leases().ensure_table().await.unwrap();

    // A reading whose payload also names a device and an arrival time: the
    // replayed record must carry the topic's and the replay's.
    let payload = json!({
        "seq": 7, "ts": T0 + 1_000, "metrics": {"temperature": 21.5},
        "device_id": "dev-intruder", "received_at": 1
    })
    .to_string();
    for body in [
        rule_error_message(payload.as_bytes()),
        "not a rule error".into(),
    ] {
        sqs.send_message()
            .queue_url(&queue_url)
            .message_body(body)
            .send()
            .await
            .unwrap();
    }
    let received = sqs
        .receive_message()
        .queue_url(&queue_url)
        .max_number_of_messages(10)
        .message_system_attribute_names(MessageSystemAttributeName::All)
        .send()
        .await
        .unwrap();
    let messages = received.messages();
    assert_eq!(messages.len(), 2);
    let event = sqs_event("arn:aws:sqs:us-east-1:123456789012:rule-errors", messages);
    let bad_id = messages
        .iter()
        .find(|m| m.body() == Some("not a rule error"))
        .and_then(|m| m.message_id())
        .unwrap()
        .to_string();

    let handler = ReplayHandler::new(Arc::new(stream.clone()), EmfConfig::default());
    let (response, stats) = handler.process(&event, T0 + 5_000).await;
    let failed: Vec<&str> = response
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.as_str())
        .collect();
    assert_eq!(failed, [bad_id.as_str()]);
    assert_eq!((stats.replayed, stats.undecodable), (1, 1));
    // SQS delivers the same message again a minute later (the function
    // timed out after its put): replayed again.
    let (again, stats) = handler.process(&event, T0 + 65_000).await;
    assert_eq!(again.batch_item_failures.len(), 1);
    assert_eq!(stats.replayed, 1);

    let (shard, records) = read_all(&stream, 2).await;
    assert_eq!(records.len(), 2, "both replays are in the stream");
    for (r, replayed_at) in records.iter().zip([T0 + 5_000, T0 + 65_000]) {
        assert_eq!(r.partition_key, "dev-1");
        let v: Value = serde_json::from_slice(&r.data).unwrap();
        assert_eq!(
            v,
            json!({"seq": 7, "ts": T0 + 1_000, "metrics": {"temperature": 21.5},
                "device_id": "dev-1", "fleet": "plant-a", "received_at": replayed_at})
        );
    }

    // The aggregate function applies the reading once and absorbs the copy.
    let store = Arc::new(MemoryStore::new());
    let aggregate = AggregateHandler::new(store.clone(), AggregateConfig::default());
    let (response, inv) = aggregate.process(&kinesis_event(&shard, &records)).await;
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(inv.metrics.readings_accepted.load(Relaxed), 1);
    assert_eq!(inv.metrics.readings_duplicate.load(Relaxed), 1);
    let mut api = ApiState::new(store, Arc::new(AggregateConfig::default()));
    api.clock = Arc::new(|| T0 + 120_000);
    let path = format!(
        "/v1/devices/dev-1/metrics/temperature?res=1m&from={T0}&to={}",
        T0 + 60_000
    );
    let resp = app(api)
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    let windows = body["windows"].as_array().unwrap();
    assert_eq!(windows.len(), 1, "{body}");
    assert_eq!(windows[0]["count"], 1, "the reading counts once: {body}");
    assert_eq!(windows[0]["sum"], 21.5, "{body}");
}
