//! Lambda events as the services write them, for tests of the functions.

use base64::Engine;
use serde_json::{Value, json};

/// The stream every test event names as its source.
pub const STREAM_ARN: &str = "arn:aws:kinesis:us-east-1:123456789012:stream/iotpipe-telemetry";

/// One record of a `KinesisEvent`, as the event source mapping writes it
/// for a record of `shard` at sequence number `seq`.
pub fn kinesis_event_record(
    shard: &str,
    seq: &str,
    partition_key: &str,
    data: &[u8],
    arrival_ms: i64,
) -> Value {
    json!({
        "kinesis": {
            "kinesisSchemaVersion": "1.0",
            "partitionKey": partition_key,
            "sequenceNumber": seq,
            "data": base64::engine::general_purpose::STANDARD.encode(data),
            "approximateArrivalTimestamp": arrival_ms as f64 / 1000.0,
        },
        "eventSource": "aws:kinesis",
        "eventVersion": "1.0",
        "eventID": format!("{shard}:{seq}"),
        "eventName": "aws:kinesis:record",
        "invokeIdentityArn": "arn:aws:iam::123456789012:role/iotpipe-aggregate",
        "awsRegion": "us-east-1",
        "eventSourceARN": STREAM_ARN,
    })
}
