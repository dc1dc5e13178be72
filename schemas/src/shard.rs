//! What a consumer reads from a shard of the stream: records at positions.
//!
//! Every stream backend (the embedded log, Kinesis, a Lambda's Kinesis event)
//! hands its consumer this one shape, and the aggregation core takes it, so
//! it lives here rather than in either of them.

use bytes::Bytes;

use crate::SeqNo;

/// A record read from a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: SeqNo,
    pub partition_key: String,
    /// The appended bytes; iotpipe writes a packed [`crate::StreamRecord`].
    pub data: Bytes,
    /// When the stream accepted the record, ms since the epoch (Kinesis's
    /// ApproximateArrivalTimestamp); used for lag, never for window decisions.
    pub arrival_ms: i64,
}
