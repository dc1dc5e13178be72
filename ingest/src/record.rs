//! From one MQTT message to one stream record: validate the topic, the
//! publisher's right to it and the payload, then build either a packed record
//! of readings or a dead letter. Pure; the endpoint's sessions and the
//! external-broker bridge both call [`build`], so a message is judged and
//! recorded alike whichever way it arrived.

use bytes::Bytes;
use schemas::{
    Origin, PackedRecord, RejectReason, RejectedMessage, Rejection, StreamRecord, Topic,
};

use crate::LatenessConfig;

/// The longest partition key Kinesis takes.
const MAX_PARTITION_KEY: usize = 256;

/// What became of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accepted {
        readings: usize,
    },
    Rejected(RejectReason),
    /// A connect or disconnect of the device: no message behind it.
    Presence,
}

/// A message turned into a stream record.
#[derive(Debug, PartialEq)]
pub struct Built {
    pub partition_key: String,
    pub data: Vec<u8>,
    pub verdict: Verdict,
    /// Accepted telemetry keeps its topic and payload for the live tap.
    pub tap: Option<(String, Bytes)>,
}

/// Judges the message `payload` sent to `topic` by `publisher` (a client id,
/// kept in dead letters), stamping `received_at` with `now_ms`.
/// `may_publish` is the per-device policy; it is asked only about topics that
/// parse. A message the processors may refuse by its readings' times
/// (`lateness`) keeps its publisher and payload in the record.
pub fn build(
    topic: String,
    payload: Bytes,
    publisher: &str,
    may_publish: impl FnOnce(&Topic<'_>) -> bool,
    now_ms: i64,
    lateness: &LatenessConfig,
) -> Built {
    let outcome = match Topic::parse(&topic) {
        Err(rejection) => Err((rejection, clip_key(publisher))),
        Ok(t) if !may_publish(&t) => {
            let detail = format!(
                "client `{}` may not publish to device `{}`",
                clip_key(publisher),
                t.device_id
            );
            Err((
                Rejection::new(RejectReason::Unauthorized, detail),
                t.device_id.to_string(),
            ))
        }
        Ok(t) => match schemas::decode_payload(&payload) {
            Ok(readings) => Ok(PackedRecord {
                device_id: t.device_id.to_string(),
                fleet: t.fleet.to_string(),
                received_at: now_ms,
                readings,
            }),
            Err(rejection) => Err((rejection, t.device_id.to_string())),
        },
    };
    match outcome {
        Ok(record) => {
            let verdict = Verdict::Accepted {
                readings: record.readings.len(),
            };
            let judged_later = record
                .readings
                .iter()
                .any(|r| lateness.may_refuse(r.ts, now_ms));
            let data = if judged_later {
                record.encode_with_origin(&Origin::new(publisher, &payload))
            } else {
                record.encode()
            };
            Built {
                partition_key: record.device_id,
                data,
                verdict,
                tap: Some((topic, payload)),
            }
        }
        Err((rejection, partition_key)) => dead_letter(
            &topic,
            &payload,
            publisher,
            now_ms,
            rejection,
            partition_key,
        ),
    }
}

/// The dead letter of a message refused for `rejection`, keyed by
/// `partition_key` (its device, or its publisher when it names none).
pub(crate) fn dead_letter(
    topic: &str,
    payload: &[u8],
    publisher: &str,
    now_ms: i64,
    rejection: Rejection,
    partition_key: String,
) -> Built {
    let reason = rejection.reason;
    let message = RejectedMessage::new(topic, publisher, now_ms, rejection, payload);
    Built {
        partition_key,
        data: StreamRecord::Rejected(message).encode(),
        verdict: Verdict::Rejected(reason),
        tap: None,
    }
}

/// A partition key from a client id, cut to Kinesis's limit on a character
/// boundary; never empty.
pub(crate) fn clip_key(id: &str) -> String {
    if id.is_empty() {
        return "-".to_string();
    }
    let mut end = id.len().min(MAX_PARTITION_KEY);
    while !id.is_char_boundary(end) {
        end -= 1;
    }
    id[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"seq": 1, "ts": 1764240000123, "metrics": {"t": 1.5}}"#;

    #[test]
    fn accepted_telemetry_becomes_a_packed_record_keyed_by_device() {
        let b = build(
            "dt/f/dev-1/telemetry".into(),
            Bytes::from_static(GOOD.as_bytes()),
            "c1",
            |_| true,
            7,
            &LatenessConfig::default(),
        );
        assert_eq!(b.verdict, Verdict::Accepted { readings: 1 });
        assert_eq!(b.partition_key, "dev-1");
        let Ok(StreamRecord::Readings(p)) = schemas::decode_record(&b.data) else {
            panic!("not a packed record");
        };
        assert_eq!((p.fleet.as_str(), p.received_at), ("f", 7));
        assert!(b.tap.is_some());
    }

    #[test]
    fn refusals_are_dead_letters_keyed_by_device_or_publisher() {
        let body = Bytes::from_static(GOOD.as_bytes());
        let cases = [
            ("dt/f/+/telemetry", RejectReason::BadTopic, "c1"),
            ("dt/f/dev-2/telemetry", RejectReason::Unauthorized, "dev-2"),
        ];
        for (topic, reason, key) in cases {
            let b = build(
                topic.into(),
                body.clone(),
                "c1",
                |t| t.device_id == "dev-1",
                7,
                &LatenessConfig::default(),
            );
            assert_eq!(b.verdict, Verdict::Rejected(reason), "{topic}");
            assert_eq!(b.partition_key, key);
            assert!(b.tap.is_none());
            let Ok(StreamRecord::Rejected(m)) = schemas::decode_record(&b.data) else {
                panic!("not a dead letter");
            };
            assert_eq!((m.reason, m.client_id.as_str()), (reason, "c1"));
        }
    }

    #[test]
    fn only_messages_the_processors_may_refuse_carry_their_origin() {
        let ts = 1_764_240_000_123;
        let hour = 3_600_000;
        for (received_at, kept) in [
            (ts, false),
            (ts + hour - 1, false),
            (ts + hour + 1, true),
            (ts - 11 * 60_000, true),
        ] {
            let b = build(
                "dt/f/dev-1/telemetry".into(),
                Bytes::from_static(GOOD.as_bytes()),
                "c1",
                |_| true,
                received_at,
                &LatenessConfig::default(),
            );
            let Ok(schemas::RecordView::Readings(view)) = schemas::decode_record_view(&b.data)
            else {
                panic!("not a packed record");
            };
            let origin = view.origin.map(|o| (o.client_id, o.payload_head));
            let expected = kept.then(|| ("c1".to_string(), GOOD.as_bytes().to_vec()));
            assert_eq!(origin, expected, "received at ts + {}", received_at - ts);
        }
    }

    #[test]
    fn keys_are_clipped_on_a_char_boundary() {
        assert_eq!(clip_key(""), "-");
        let long = "é".repeat(200);
        let k = clip_key(&long);
        assert!(k.len() <= MAX_PARTITION_KEY && !k.is_empty());
    }
}
