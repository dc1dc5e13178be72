//! Why a message or reading was refused.

use serde::{Deserialize, Serialize};

/// Every reason iotpipe refuses input for. Each one is counted, and the refused
/// input is kept in the dead-letter store, so nothing is lost silently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// The payload is not JSON (or not UTF-8).
    MalformedJson,
    /// The payload is JSON but not a v1 telemetry payload.
    Schema,
    /// A metric value is NaN, an infinity, or out of the f64 range.
    NotFinite,
    /// The message exceeds the 128 KiB limit.
    TooLarge,
    /// The topic is not `dt/{fleet}/{device_id}/telemetry` with valid ids.
    BadTopic,
    /// The client may not publish to that topic.
    Unauthorized,
    /// The reading's finest window was already final when it arrived.
    TooLate,
    /// The reading's time is more than 10 minutes after its arrival.
    InFuture,
    /// A stream record that is neither a packed record nor IoT-rule JSON.
    BadRecord,
    /// Stream records the disk budget deleted before the processors read
    /// them; one dead letter per range of sequence numbers.
    Retention,
}

impl RejectReason {
    pub const ALL: [RejectReason; 10] = [
        RejectReason::MalformedJson,
        RejectReason::Schema,
        RejectReason::NotFinite,
        RejectReason::TooLarge,
        RejectReason::BadTopic,
        RejectReason::Unauthorized,
        RejectReason::TooLate,
        RejectReason::InFuture,
        RejectReason::BadRecord,
        RejectReason::Retention,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::MalformedJson => "malformed_json",
            RejectReason::Schema => "schema",
            RejectReason::NotFinite => "not_finite",
            RejectReason::TooLarge => "too_large",
            RejectReason::BadTopic => "bad_topic",
            RejectReason::Unauthorized => "unauthorized",
            RejectReason::TooLate => "too_late",
            RejectReason::InFuture => "in_future",
            RejectReason::BadRecord => "bad_record",
            RejectReason::Retention => "retention",
        }
    }

    /// A stable small index, for counter arrays.
    pub fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

crate::named!(RejectReason, "reject reason");

/// A refusal with the reason that is counted and a detail for the person reading
/// the dead-letter store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct Rejection {
    pub reason: RejectReason,
    pub detail: String,
}

impl Rejection {
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counters, dead-letter keys and `/metrics` labels are all built from
    /// a reason's name and index, so each must be one variant's alone and
    /// read back as that variant.
    #[test]
    fn every_reason_has_one_name_and_index_that_read_back() {
        let mut names = std::collections::BTreeSet::new();
        for (i, r) in RejectReason::ALL.into_iter().enumerate() {
            assert_eq!(r.index(), i, "{r}");
            assert_eq!(r.as_str().parse::<RejectReason>(), Ok(r));
            assert!(names.insert(r.as_str()), "{r} named twice");
        }
        assert!("too late".parse::<RejectReason>().is_err());
    }
}
