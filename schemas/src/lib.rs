//! iotpipe's wire formats, and the only place they are defined.
//!
//! Everything that crosses a process, a disk or a network boundary has its
//! shape here, with the validation that refuses anything else with a typed
//! [`RejectReason`]:
//!
//! - `topic`: `dt/{fleet}/{device_id}/telemetry`.
//! - `payload`: the device's JSON (payload v1, one reading or a batch) and the
//!   AWS IoT rule's JSON record that wraps it.
//! - `record`: the packed stream record (postcard behind a magic prefix and a
//!   version byte) carrying readings or a refused message, and
//!   [`decode_record`], which reads it and the IoT rule's JSON.
//! - `presence`: a device's connects and disconnects (the endpoint's, and
//!   IoT Core's lifecycle events).
//! - `reading`: the reading every format carries, and its identity.
//! - `rollup`: resolutions, the mergeable window aggregate, and the window
//!   the query API returns.
//! - `sketch`: the quantile sketch (DDSketch's mapping over sparse bins).
//! - `seq`: stream positions, wide enough for Kinesis sequence numbers.
//! - `shard`: the record a stream consumer reads from a shard.
//! - `state`: what the rollup store keeps per item.
//! - `reject`: every reason input is refused for.
//! - `name`: reading an enum back from the one name it is written as.
//!
//! JSON Schema files for the payloads live in `schemas/json/`; the tests check
//! them against the same fixtures as the Rust decoder, so the two cannot drift.

pub mod name;
pub mod payload;
pub mod presence;
pub mod reading;
pub mod record;
pub mod reject;
pub mod rollup;
pub mod seq;
pub mod shard;
pub mod sketch;
pub mod state;
pub mod topic;

pub use payload::{RuleRecord, decode_payload, decode_rule_json};
pub use presence::{Presence, PresenceEvent};
pub use reading::{Metric, Reading, ReadingId};
pub use record::{
    Origin, PackedRecord, PackedView, ReadingView, RecordView, RejectedMessage, StreamRecord,
    decode_record, decode_record_view,
};
pub use reject::{RejectReason, Rejection};
pub use rollup::{Point, Resolution, Sketch, WindowAgg, WindowView};
pub use seq::SeqNo;
pub use topic::Topic;
