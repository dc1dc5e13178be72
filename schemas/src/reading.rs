//! One sensor reading: what every format in iotpipe carries.

use serde::{Deserialize, Serialize};

/// Largest accepted message, IoT Core's limit.
pub const MAX_MESSAGE_BYTES: usize = 128 * 1024;
/// Most metrics one reading may carry.
pub const MAX_METRICS: usize = 100;
/// Most readings one message may carry.
pub const MAX_READINGS: usize = 1000;
/// Longest metric name.
pub const MAX_METRIC_NAME_LEN: usize = 64;
/// Latest accepted event time (9999-12-31T23:59:59.999Z), so that window
/// arithmetic never overflows.
pub const MAX_TS: i64 = 253_402_300_799_999;

/// A device's reading at one instant of device time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    /// The device's own counter; it identifies the reading when present.
    pub seq: Option<u64>,
    /// Device event time, ms since the Unix epoch (UTC).
    pub ts: i64,
    /// 1..=100 named finite values.
    pub metrics: Vec<Metric>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    pub name: String,
    pub value: f64,
}

/// What makes two deliveries the same reading of a device: its `seq`, or its
/// `ts` when the device sends no `seq`. The two spaces never collide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ReadingId {
    Seq(u64),
    Ts(i64),
}

impl Reading {
    pub fn id(&self) -> ReadingId {
        match self.seq {
            Some(seq) => ReadingId::Seq(seq),
            None => ReadingId::Ts(self.ts),
        }
    }
}

/// Checks a metric name: `[A-Za-z0-9_.-]{1,64}`.
pub fn check_metric_name(name: &str) -> Result<(), String> {
    crate::topic::check_name(
        "metric name",
        name,
        MAX_METRIC_NAME_LEN,
        |b| matches!(b, b'_' | b'.' | b'-'),
        "_ . -",
    )
}
