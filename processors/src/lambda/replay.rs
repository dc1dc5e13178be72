//! The `replay` function: messages the topic rule could not put into Kinesis,
//! put back into it.
//!
//! IoT Core acknowledges a device's publish before the rule's actions run.
//! When the Kinesis action fails (throttling, a permission or stream
//! problem), the rule's error action writes one message to `RuleErrorQueue`
//! in IoT's documented error-action format:
//!
//! ```json
//! {"ruleName": "...", "topic": "dt/f/dev-1/telemetry", "clientId": "dev-1",
//!  "cloudwatchTraceId": "...", "base64OriginalPayload": "eyJzZXEiOiAxLCAuLi59",
//!  "failures": [{"failedAction": "KinesisAction", "failedResource": "...",
//!                "errorMessage": "..."}]}
//! ```
//!
//! It carries the device's original payload, not the rule's output, so the
//! handler applies the rule's projection again ([`rule_record`]): the payload
//! fields the rule's `SELECT` names, `device_id` and `fleet` from the topic,
//! and `received_at`. The record goes to the stream under the same partition
//! key as the rule's (`topic(3)`, the device id).
//!
//! `received_at` is the time of the replay, not the rule's `timestamp()`
//! (which the message does not carry) nor the queue's `SentTimestamp`: the
//! replayed record enters the stream now, and a reading must be judged late
//! against the time it became readable, or a replay after an hour-long
//! Kinesis outage would change windows the API has already called final.
//! So a reading whose window closed while it waited in the queue is refused
//! `too_late` and kept as a dead letter, counted, not applied silently.
//!
//! **Exactly once**: the processors know a reading by `(device_id, seq)`, or
//! `(device_id, ts)` without `seq`, and absorb one they have applied before.
//! So a message replayed twice (a retried batch, a message delivered twice
//! by SQS) or one whose record did reach the stream after all (the put
//! succeeded but its answer was lost) changes no rollup a second time.
//!
//! A message that cannot be decoded is named in `batchItemFailures`, like a
//! record the stream refused; SQS hands it out again and, after the queue's
//! `maxReceiveCount`, moves it to the dead-letter queue. Every invocation
//! prints one EMF line counting replayed, undecodable and unstored messages.

use std::sync::Arc;

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use base64::Engine;
use bytes::Bytes;
use schemas::Topic;
use serde::Deserialize;
use serde_json::{Map, Value};
use stream::{PutOutcome, PutRecord, StreamProducer};

use super::Handler;
use super::emf::{self, EmfConfig};
use super::env::{EnvError, FromEnv, metrics_from_vars, required};

/// The payload fields the topic rule's `SELECT` names, in its order; the
/// template test checks that the rule's SQL projects exactly these plus the
/// identity fields.
pub const RULE_PAYLOAD_FIELDS: [&str; 4] = ["seq", "ts", "metrics", "readings"];

/// The replay function's configuration, from environment variables:
/// `STREAM_NAME` (required), `METRICS_NAMESPACE` (`iotpipe`) and
/// `AWS_LAMBDA_FUNCTION_NAME` (set by Lambda; defaults to `replay`).
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayConfig {
    pub stream_name: String,
    pub metrics: EmfConfig,
}

impl FromEnv for ReplayConfig {
    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, EnvError> {
        let stream_name = required(&var, "STREAM_NAME")?;
        let metrics = metrics_from_vars(
            &var,
            EmfConfig {
                function: "replay".into(),
                ..EmfConfig::default()
            },
        );
        Ok(ReplayConfig {
            stream_name,
            metrics,
        })
    }
}

/// Why a queue message cannot be replayed. Each is permanent: the message
/// goes to the dead-letter queue after its retries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    #[error("the message is not an IoT rule error message: {0}")]
    NotErrorMessage(String),
    #[error("`base64OriginalPayload` is not base64: {0}")]
    BadPayloadEncoding(String),
    #[error("no failure names the Kinesis action (failed: {0})")]
    NotKinesisFailure(String),
    #[error("{0}")]
    BadTopic(String),
}

/// The error action's message, as IoT Core documents it; only what replay
/// needs is read, the rest (rule name, trace id) is left alone.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RuleErrorMessage {
    topic: String,
    base64_original_payload: String,
    failures: Vec<RuleFailure>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RuleFailure {
    failed_action: String,
}

/// What an error message says: the topic and the original payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedPublish {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// Decodes an error action message body. The queue action writes the JSON
/// as is, or base64-encoded when `UseBase64` is on; both are read.
pub fn decode_error_message(body: &str) -> Result<FailedPublish, ReplayError> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let parsed: RuleErrorMessage = match serde_json::from_str(body) {
        Ok(m) => m,
        Err(json_error) => {
            let decoded = b64
                .decode(body.trim())
                .map_err(|_| ReplayError::NotErrorMessage(json_error.to_string()))?;
            serde_json::from_slice(&decoded)
                .map_err(|e| ReplayError::NotErrorMessage(e.to_string()))?
        }
    };
    // Only the Kinesis action is this function's to redo: another action's
    // failure would be replayed into the wrong place.
    if !parsed
        .failures
        .iter()
        .any(|f| f.failed_action.starts_with("Kinesis"))
    {
        let actions: Vec<&str> = parsed
            .failures
            .iter()
            .map(|f| f.failed_action.as_str())
            .collect();
        return Err(ReplayError::NotKinesisFailure(actions.join(", ")));
    }
    let payload = b64
        .decode(parsed.base64_original_payload.trim())
        .map_err(|e| ReplayError::BadPayloadEncoding(e.to_string()))?;
    Ok(FailedPublish {
        topic: parsed.topic,
        payload,
    })
}

/// The record the topic rule would have put into the stream for `payload`
/// published on `topic` at `received_at`: the payload fields the rule
/// selects (a field the payload lacks is left out, as IoT SQL leaves out an
/// undefined value; a payload that is not a JSON object gives none), then
/// `device_id` and `fleet` from the topic and `received_at`. Keys of the
/// payload with those names are never read. Partition key: the device id.
pub fn rule_record(
    topic: &str,
    payload: &[u8],
    received_at: i64,
) -> Result<PutRecord, ReplayError> {
    let t = Topic::parse(topic).map_err(|r| ReplayError::BadTopic(r.detail))?;
    let mut out = Map::new();
    if let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(payload) {
        for name in RULE_PAYLOAD_FIELDS {
            if let Some(v) = fields.get(name) {
                out.insert(name.to_string(), v.clone());
            }
        }
    }
    out.insert("device_id".into(), Value::from(t.device_id));
    out.insert("fleet".into(), Value::from(t.fleet));
    out.insert("received_at".into(), Value::from(received_at));
    Ok(PutRecord {
        partition_key: t.device_id.to_string(),
        data: Bytes::from(Value::Object(out).to_string()),
    })
}

/// The record to put back for one queue message, replayed at `now_ms`.
pub fn replay_record(message: &SqsMessage, now_ms: i64) -> Result<PutRecord, ReplayError> {
    let body = message.body.as_deref().unwrap_or_default();
    let failed = decode_error_message(body)?;
    rule_record(&failed.topic, &failed.payload, now_ms)
}

/// What one invocation did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplayStats {
    pub messages: u64,
    /// Put back into the stream.
    pub replayed: u64,
    /// Not a message this function can replay: left for the dead-letter queue.
    pub undecodable: u64,
    /// Decoded but not stored by the stream: retried by SQS.
    pub unstored: u64,
}

impl ReplayStats {
    fn emf_metrics(&self) -> Vec<(String, &'static str, f64)> {
        vec![
            ("Messages".into(), "Count", self.messages as f64),
            ("Replayed".into(), "Count", self.replayed as f64),
            ("Undecodable".into(), "Count", self.undecodable as f64),
            ("Unstored".into(), "Count", self.unstored as f64),
        ]
    }
}

/// What the handler works with; built once per process.
#[derive(Clone)]
pub struct ReplayHandler {
    pub stream: Arc<dyn StreamProducer>,
    pub emf: Arc<EmfConfig>,
}

impl ReplayHandler {
    pub fn new(stream: Arc<dyn StreamProducer>, emf: EmfConfig) -> Self {
        ReplayHandler {
            stream,
            emf: Arc::new(emf),
        }
    }

    /// Replays one event at `now_ms` (the replayed records' `received_at`):
    /// every message that decodes goes to the stream in one put; a message
    /// is reported failed unless its record is stored.
    pub async fn process(&self, event: &SqsEvent, now_ms: i64) -> (SqsBatchResponse, ReplayStats) {
        let mut response = SqsBatchResponse::default();
        let mut stats = ReplayStats {
            messages: event.records.len() as u64,
            ..ReplayStats::default()
        };
        let mut ids = Vec::new();
        let mut records = Vec::new();
        for message in &event.records {
            let id = message.message_id.clone().unwrap_or_default();
            match replay_record(message, now_ms) {
                Ok(record) => {
                    ids.push(id);
                    records.push(record);
                }
                Err(e) => {
                    tracing::warn!(message_id = %id, error = %e, "A rule error message cannot be replayed; it stays for the dead-letter queue.");
                    stats.undecodable += 1;
                    response.add_failure(id);
                }
            }
        }
        if records.is_empty() {
            return (response, stats);
        }
        let outcomes = match self.stream.put(records).await {
            Ok(outcomes) => outcomes,
            Err(e) => {
                tracing::warn!(error = %e, "The stream stored nothing; SQS hands the messages out again.");
                Vec::new()
            }
        };
        for (i, id) in ids.into_iter().enumerate() {
            match outcomes.get(i) {
                Some(PutOutcome::Stored { .. }) => stats.replayed += 1,
                failed => {
                    if let Some(PutOutcome::Failed { message, .. }) = failed {
                        tracing::warn!(message_id = %id, error = %message, "A replayed record was not stored; SQS hands it out again.");
                    }
                    stats.unstored += 1;
                    response.add_failure(id);
                }
            }
        }
        (response, stats)
    }
}

impl Handler for ReplayHandler {
    type Event = SqsEvent;
    type Response = SqsBatchResponse;

    /// Replays one event now and prints its metrics line.
    async fn handle(&self, event: SqsEvent) -> SqsBatchResponse {
        let now = chrono::Utc::now().timestamp_millis();
        let (response, stats) = self.process(&event, now).await;
        println!("{}", emf::metrics_line(&self.emf, stats.emf_metrics(), now));
        response
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn error_body(topic: &str, payload: &[u8], action: &str) -> String {
        serde_json::json!({
            "ruleName": "TelemetryRule",
            "topic": topic,
            "cloudwatchTraceId": "7e146a2c-95b5-6caf-98b9-50e3969734c7",
            "clientId": "dev-1",
            "base64OriginalPayload": base64::engine::general_purpose::STANDARD.encode(payload),
            "failures": [{
                "failedAction": action,
                "failedResource": "telemetry",
                "errorMessage": "Failed to put record"
            }]
        })
        .to_string()
    }

    #[test]
    fn the_topic_and_the_replay_time_win_over_the_payload() {
        let payload = br#"{"seq": 4, "ts": 1764240000123, "metrics": {"t": 1.5},
            "device_id": "intruder", "fleet": "other", "received_at": 1, "extra": true}"#;
        let r = rule_record("dt/f1/dev-1/telemetry", payload, 1_764_240_000_900).unwrap();
        assert_eq!(r.partition_key, "dev-1");
        let v: Value = serde_json::from_slice(&r.data).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"seq": 4, "ts": 1764240000123_i64, "metrics": {"t": 1.5},
                "device_id": "dev-1", "fleet": "f1", "received_at": 1764240000900_i64})
        );
        // The processors read it as the topic's and the rule's.
        let rec = schemas::decode_rule_json(&r.data).unwrap();
        assert_eq!(
            (rec.device_id.as_str(), rec.fleet.as_str(), rec.received_at),
            ("dev-1", "f1", 1_764_240_000_900)
        );
    }

    #[test]
    fn decodes_plain_and_base64_bodies_and_refuses_others() {
        let body = error_body("dt/f1/dev-1/telemetry", b"{}", "KinesisAction");
        let plain = decode_error_message(&body).unwrap();
        assert_eq!(plain.topic, "dt/f1/dev-1/telemetry");
        assert_eq!(plain.payload, b"{}");
        let wrapped = base64::engine::general_purpose::STANDARD.encode(&body);
        assert_eq!(decode_error_message(&wrapped).unwrap(), plain);

        assert!(matches!(
            decode_error_message("hello"),
            Err(ReplayError::NotErrorMessage(_))
        ));
        let other = error_body("dt/f1/dev-1/telemetry", b"{}", "S3Action");
        assert!(matches!(
            decode_error_message(&other),
            Err(ReplayError::NotKinesisFailure(_))
        ));
        assert!(matches!(
            rule_record("dt/f1/+/telemetry", b"{}", 0),
            Err(ReplayError::BadTopic(_))
        ));
    }

    /// A stream that stores the records of every device but `dev-bad`, or
    /// stores nothing at all.
    struct ScriptedStream {
        down: bool,
        put: std::sync::Mutex<Vec<PutRecord>>,
    }

    #[async_trait::async_trait]
    impl StreamProducer for ScriptedStream {
        async fn put(
            &self,
            records: Vec<PutRecord>,
        ) -> Result<Vec<PutOutcome>, stream::ProduceError> {
            if self.down {
                return Err(stream::ProduceError::Unavailable("scripted".into()));
            }
            let outcomes = records
                .iter()
                .map(|r| match r.partition_key.as_str() {
                    "dev-bad" => PutOutcome::Failed {
                        retryable: true,
                        message: "ProvisionedThroughputExceededException".into(),
                    },
                    _ => PutOutcome::Stored {
                        shard: "shardId-000000000000".into(),
                        seq: schemas::SeqNo::from(1u64),
                    },
                })
                .collect();
            self.put.lock().unwrap().extend(records);
            Ok(outcomes)
        }
    }

    fn event(bodies: &[(&str, String)]) -> SqsEvent {
        let records: Vec<Value> = bodies
            .iter()
            .map(|(id, body)| serde_json::json!({"messageId": id, "body": body}))
            .collect();
        serde_json::from_value(serde_json::json!({ "Records": records })).unwrap()
    }

    #[tokio::test]
    async fn only_what_the_stream_did_not_store_or_cannot_be_read_is_failed() {
        let payload = br#"{"seq": 1, "ts": 1764240000000, "metrics": {"t": 1}}"#;
        let bodies = [
            (
                "m1",
                error_body("dt/f1/dev-1/telemetry", payload, "KinesisAction"),
            ),
            ("m2", "{}".to_string()),
            (
                "m3",
                error_body("dt/f1/dev-bad/telemetry", payload, "KinesisAction"),
            ),
            (
                "m4",
                error_body("dt/f1/dev-2/telemetry", payload, "KinesisAction"),
            ),
        ];
        let stream = Arc::new(ScriptedStream {
            down: false,
            put: Default::default(),
        });
        let handler = ReplayHandler::new(stream.clone(), EmfConfig::default());
        let (response, stats) = handler.process(&event(&bodies), 1_764_240_000_500).await;
        let failed: Vec<&str> = response
            .batch_item_failures
            .iter()
            .map(|f| f.item_identifier.as_str())
            .collect();
        assert_eq!(failed, ["m2", "m3"]);
        assert_eq!(
            stats,
            ReplayStats {
                messages: 4,
                replayed: 2,
                undecodable: 1,
                unstored: 1,
            }
        );
        let keys: Vec<String> = stream
            .put
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.partition_key.clone())
            .collect();
        assert_eq!(keys, ["dev-1", "dev-bad", "dev-2"]);
        let line: Value = serde_json::from_str(&emf::metrics_line(
            &EmfConfig::default(),
            stats.emf_metrics(),
            7,
        ))
        .unwrap();
        assert_eq!(line["Replayed"], 2.0);
        assert_eq!(line["Undecodable"], 1.0);
        assert_eq!(line["Unstored"], 1.0);

        // A stream that stores nothing fails every decodable message.
        let down = ReplayHandler::new(
            Arc::new(ScriptedStream {
                down: true,
                put: Default::default(),
            }),
            EmfConfig::default(),
        );
        let (response, stats) = down.process(&event(&bodies), 1_764_240_000_500).await;
        assert_eq!(response.batch_item_failures.len(), 4);
        assert_eq!((stats.replayed, stats.unstored), (0, 3));
    }

    #[test]
    fn reads_its_configuration() {
        let config = ReplayConfig::from_vars(|n| match n {
            "STREAM_NAME" => Some("telemetry".into()),
            "AWS_LAMBDA_FUNCTION_NAME" => Some("iotpipe-replay".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(config.stream_name, "telemetry");
        assert_eq!(config.metrics.function, "iotpipe-replay");
        assert_eq!(
            ReplayConfig::from_vars(|_| None),
            Err(EnvError::Missing("STREAM_NAME"))
        );
    }
}
