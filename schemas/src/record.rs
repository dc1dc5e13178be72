//! Stream records: what travels from the endpoint through the stream to the
//! processors.
//!
//! Two shapes share a stream. The packed record (a magic prefix, a version
//! byte, then postcard) is what iotpipe's own ingest writes: compact and fast
//! to decode. The IoT rule's JSON is what AWS IoT Core writes into Kinesis.
//! Processors accept both through [`decode_record`].
//!
//! The endpoint also writes the messages it refuses into the stream, as
//! [`RejectedMessage`]s: that way a refusal is durable before the device is
//! acknowledged, and the processors count it exactly once, like a reading.
//!
//! A device's connects and disconnects travel as [`Presence`] records, keyed
//! by its device id like its readings; IoT Core's lifecycle events (JSON)
//! decode to the same.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::payload::{RuleRecord, decode_rule_json};
use crate::presence::{Presence, decode_lifecycle_json, looks_like_lifecycle};
use crate::reading::{
    MAX_METRICS, MAX_READINGS, MAX_TS, Metric, Reading, ReadingId, check_metric_name,
};
use crate::reject::{RejectReason, Rejection};
use crate::topic::check_id;

/// The first bytes of a packed record. 0x89 is not valid UTF-8 at the start of
/// a string, so a packed record can never be mistaken for JSON.
pub const PACKED_MAGIC: [u8; 3] = [0x89, b'I', b'P'];
/// The packed format's version, the byte after the magic.
pub const PACKED_VERSION: u8 = 1;

/// Readings of one device, stamped with the time they entered the pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PackedRecord {
    pub device_id: String,
    pub fleet: String,
    /// When the endpoint received the message, ms since the epoch; lateness is
    /// judged against it so that a replay decides the same way.
    pub received_at: i64,
    pub readings: Vec<Reading>,
}

/// How much of a refused payload the dead-letter store keeps.
pub const REJECTED_PAYLOAD_KEEP: usize = 1024;

/// A message the endpoint refused, with enough of it to debug the device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RejectedMessage {
    pub topic: String,
    pub client_id: String,
    pub received_at: i64,
    pub reason: RejectReason,
    pub detail: String,
    /// The first [`REJECTED_PAYLOAD_KEEP`] bytes of the payload.
    pub payload_head: Vec<u8>,
    pub payload_len: u64,
}

impl RejectedMessage {
    pub fn new(
        topic: &str,
        client_id: &str,
        received_at: i64,
        rejection: Rejection,
        payload: &[u8],
    ) -> Self {
        RejectedMessage {
            topic: crate::topic::clip_to(topic, 256),
            client_id: crate::topic::clip_to(client_id, 256),
            received_at,
            reason: rejection.reason,
            detail: rejection.detail,
            payload_head: payload[..payload.len().min(REJECTED_PAYLOAD_KEEP)].to_vec(),
            payload_len: payload.len() as u64,
        }
    }
}

/// Who sent a packed record's readings and what they sent, for the readings
/// the processors may refuse after the stream (`too_late`, `in_future`): their
/// dead letters then keep the client id and the raw payload, like those of a
/// message refused at the endpoint. The endpoint attaches it only to messages
/// that may be refused so, which keeps the common record small.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Origin {
    pub client_id: String,
    /// The first [`REJECTED_PAYLOAD_KEEP`] bytes of the payload.
    pub payload_head: Vec<u8>,
    pub payload_len: u64,
}

impl Origin {
    pub fn new(client_id: &str, payload: &[u8]) -> Self {
        Origin {
            client_id: crate::topic::clip_to(client_id, 256),
            payload_head: payload[..payload.len().min(REJECTED_PAYLOAD_KEEP)].to_vec(),
            payload_len: payload.len() as u64,
        }
    }
}

/// What a packed record carries.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamRecord {
    Readings(PackedRecord),
    Rejected(RejectedMessage),
    Presence(Presence),
}

/// The packed body as written: variants are only ever added at the end, so a
/// record written before a variant existed decodes unchanged.
#[derive(Deserialize)]
enum PackedBody<'a> {
    #[serde(borrow)]
    Readings(PackedView<'a>),
    Rejected(RejectedMessage),
    /// Readings with their [`Origin`].
    ReadingsFrom(#[serde(borrow)] PackedView<'a>, Origin),
    Presence(Presence),
}

/// The variant indexes of [`PackedBody`], as postcard writes them.
const REJECTED: u8 = 1;
const READINGS_FROM: u8 = 2;
const PRESENCE: u8 = 3;

impl StreamRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(64);
        self.encode_into(&mut buf);
        buf
    }

    /// Appends the encoded record to `buf`.
    pub fn encode_into(&self, buf: &mut Vec<u8>) {
        match self {
            StreamRecord::Readings(r) => r.encode_into(buf),
            StreamRecord::Rejected(m) => encode_body(buf, REJECTED, m),
            StreamRecord::Presence(p) => encode_body(buf, PRESENCE, p),
        }
    }
}

/// Writes the header, then `body` as the [`PackedBody`] variant `index`.
fn encode_body(buf: &mut Vec<u8>, index: u8, body: &impl Serialize) {
    buf.extend_from_slice(&PACKED_MAGIC);
    buf.push(PACKED_VERSION);
    buf.push(index);
    // Serializing plain owned data into a Vec cannot fail.
    if let Ok(out) = postcard::to_extend(body, std::mem::take(buf)) {
        *buf = out;
    }
}

impl Presence {
    pub fn encode(&self) -> Vec<u8> {
        StreamRecord::Presence(self.clone()).encode()
    }
}

impl PackedRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(64 + 48 * self.readings.len());
        self.encode_into(&mut buf);
        buf
    }

    /// Appends the encoded record to `buf`, without cloning the readings.
    pub fn encode_into(&self, buf: &mut Vec<u8>) {
        buf.extend_from_slice(&PACKED_MAGIC);
        buf.push(PACKED_VERSION);
        // The variant index of `StreamRecord::Readings`, as postcard writes it.
        buf.push(0);
        if let Ok(body) = postcard::to_extend(self, std::mem::take(buf)) {
            *buf = body;
        }
    }

    /// The encoded record with the message it came from; decodes to a
    /// [`PackedView`] whose `origin` is set.
    pub fn encode_with_origin(&self, origin: &Origin) -> Vec<u8> {
        let mut buf = Vec::with_capacity(128 + 48 * self.readings.len());
        buf.extend_from_slice(&PACKED_MAGIC);
        buf.push(PACKED_VERSION);
        buf.push(READINGS_FROM);
        // A tuple variant's fields follow each other, as postcard writes them.
        // Serializing plain owned data into a Vec cannot fail.
        postcard::to_extend(&(self, origin), buf).unwrap_or_default()
    }
}

impl From<RuleRecord> for PackedRecord {
    fn from(r: RuleRecord) -> Self {
        PackedRecord {
            device_id: r.device_id,
            fleet: r.fleet,
            received_at: r.received_at,
            readings: r.readings,
        }
    }
}

/// A packed record read in place: its strings borrow from the record's bytes
/// (they are owned only when they came from JSON with escapes), so that the
/// processors decode a batch without allocating every name again.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PackedView<'a> {
    #[serde(borrow)]
    pub device_id: Cow<'a, str>,
    #[serde(borrow)]
    pub fleet: Cow<'a, str>,
    pub received_at: i64,
    #[serde(borrow)]
    pub readings: Vec<ReadingView<'a>>,
    /// Set when the record was written with its message's [`Origin`].
    #[serde(skip)]
    pub origin: Option<Origin>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ReadingView<'a> {
    pub seq: Option<u64>,
    pub ts: i64,
    #[serde(borrow)]
    pub metrics: Vec<MetricView<'a>>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MetricView<'a> {
    #[serde(borrow)]
    pub name: Cow<'a, str>,
    pub value: f64,
}

impl ReadingView<'_> {
    pub fn id(&self) -> ReadingId {
        match self.seq {
            Some(seq) => ReadingId::Seq(seq),
            None => ReadingId::Ts(self.ts),
        }
    }

    pub fn to_owned_reading(&self) -> Reading {
        Reading {
            seq: self.seq,
            ts: self.ts,
            metrics: self
                .metrics
                .iter()
                .map(|m| Metric {
                    name: m.name.to_string(),
                    value: m.value,
                })
                .collect(),
        }
    }
}

impl PackedView<'_> {
    pub fn to_owned_record(&self) -> PackedRecord {
        PackedRecord {
            device_id: self.device_id.to_string(),
            fleet: self.fleet.to_string(),
            received_at: self.received_at,
            readings: self.readings.iter().map(|r| r.to_owned_reading()).collect(),
        }
    }
}

impl From<RuleRecord> for PackedView<'static> {
    fn from(r: RuleRecord) -> Self {
        PackedView {
            device_id: Cow::Owned(r.device_id),
            fleet: Cow::Owned(r.fleet),
            received_at: r.received_at,
            readings: r
                .readings
                .into_iter()
                .map(|reading| ReadingView {
                    seq: reading.seq,
                    ts: reading.ts,
                    metrics: reading
                        .metrics
                        .into_iter()
                        .map(|m| MetricView {
                            name: Cow::Owned(m.name),
                            value: m.value,
                        })
                        .collect(),
                })
                .collect(),
            origin: None,
        }
    }
}

/// What a record holds, read in place.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub enum RecordView<'a> {
    #[serde(borrow)]
    Readings(PackedView<'a>),
    Rejected(RejectedMessage),
    Presence(Presence),
}

/// Decodes a stream record of either shape and validates it as strictly as the
/// endpoint validates a payload: a stream may hold records written by anyone.
pub fn decode_record_view(data: &[u8]) -> Result<RecordView<'_>, Rejection> {
    if let Some(rest) = data.strip_prefix(&PACKED_MAGIC) {
        let bad = |d: String| Rejection::new(RejectReason::BadRecord, d);
        let Some((&version, body)) = rest.split_first() else {
            return Err(bad("packed record ends after its magic".into()));
        };
        if version != PACKED_VERSION {
            return Err(bad(format!(
                "packed record version {version}; this build reads {PACKED_VERSION}"
            )));
        }
        let record = match postcard::from_bytes(body) {
            Ok(PackedBody::Readings(r)) => RecordView::Readings(r),
            Ok(PackedBody::Rejected(m)) => RecordView::Rejected(m),
            Ok(PackedBody::ReadingsFrom(r, origin)) => RecordView::Readings(PackedView {
                origin: Some(origin),
                ..r
            }),
            Ok(PackedBody::Presence(p)) => RecordView::Presence(p),
            Err(e) => return Err(bad(format!("packed record: {e}"))),
        };
        match &record {
            RecordView::Readings(r) => validate(r).map_err(bad)?,
            RecordView::Presence(p) => p.validate().map_err(bad)?,
            RecordView::Rejected(_) => {}
        }
        return Ok(record);
    }
    let first = data.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'{') {
        // Readings first: they are nearly every record, and a lifecycle
        // event is never a valid rule record.
        return match decode_rule_json(data) {
            Ok(r) => Ok(RecordView::Readings(r.into())),
            Err(_) if looks_like_lifecycle(data) => {
                decode_lifecycle_json(data).map(RecordView::Presence)
            }
            Err(e) => Err(e),
        };
    }
    Err(Rejection::new(
        RejectReason::BadRecord,
        "record is neither a packed record nor JSON",
    ))
}

/// [`decode_record_view`], owning everything.
pub fn decode_record(data: &[u8]) -> Result<StreamRecord, Rejection> {
    decode_record_view(data).map(|v| match v {
        RecordView::Readings(r) => StreamRecord::Readings(r.to_owned_record()),
        RecordView::Rejected(m) => StreamRecord::Rejected(m),
        RecordView::Presence(p) => StreamRecord::Presence(p),
    })
}

fn validate(r: &PackedView) -> Result<(), String> {
    check_id("device_id", &r.device_id)?;
    check_id("fleet", &r.fleet)?;
    if r.readings.is_empty() || r.readings.len() > MAX_READINGS {
        return Err(format!("{} readings in one record", r.readings.len()));
    }
    for reading in &r.readings {
        if !(0..=MAX_TS).contains(&reading.ts) {
            return Err(format!("ts {} out of range", reading.ts));
        }
        if reading.metrics.is_empty() || reading.metrics.len() > MAX_METRICS {
            return Err(format!("{} metrics in one reading", reading.metrics.len()));
        }
        for m in &reading.metrics {
            check_metric_name(&m.name)?;
            if !m.value.is_finite() {
                return Err(format!("metric `{}` is not finite", m.name));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> PackedRecord {
        PackedRecord {
            device_id: "dev-1".into(),
            fleet: "f".into(),
            received_at: 1_764_240_000_500,
            readings: vec![Reading {
                seq: Some(3),
                ts: 1_764_240_000_123,
                metrics: vec![Metric {
                    name: "temperature".into(),
                    value: 21.5,
                }],
            }],
        }
    }

    #[test]
    fn packed_round_trips() {
        let r = sample();
        let bytes = r.encode();
        assert_eq!(&bytes[..3], &PACKED_MAGIC);
        assert_eq!(bytes[3], PACKED_VERSION);
        assert_eq!(bytes, StreamRecord::Readings(r.clone()).encode());
        assert_eq!(decode_record(&bytes).unwrap(), StreamRecord::Readings(r));
    }

    #[test]
    fn views_borrow_from_the_record() {
        let bytes = sample().encode();
        let RecordView::Readings(view) = decode_record_view(&bytes).unwrap() else {
            panic!("not readings");
        };
        assert!(matches!(view.device_id, Cow::Borrowed(_)));
        assert!(matches!(view.readings[0].metrics[0].name, Cow::Borrowed(_)));
        assert_eq!(view.to_owned_record(), sample());
    }

    #[test]
    fn a_record_keeps_its_origin_and_records_without_one_decode_as_before() {
        let origin = Origin::new("client-7", br#"{"ts": 1764240000123}"#);
        let bytes = sample().encode_with_origin(&origin);
        let RecordView::Readings(view) = decode_record_view(&bytes).unwrap() else {
            panic!("not readings");
        };
        assert_eq!(view.origin.as_ref(), Some(&origin));
        assert_eq!(view.to_owned_record(), sample());
        // Records written before origins existed carry none.
        let old = sample().encode();
        let RecordView::Readings(old) = decode_record_view(&old).unwrap() else {
            panic!("not readings");
        };
        assert_eq!(old.origin, None);
        assert_eq!(old.to_owned_record(), sample());
    }

    #[test]
    fn rejected_messages_round_trip() {
        let payload = vec![b'x'; 5000];
        let m = RejectedMessage::new(
            "dt/f/d/telemetry",
            "client-1",
            7,
            Rejection::new(RejectReason::MalformedJson, "eof"),
            &payload,
        );
        assert_eq!(m.payload_head.len(), REJECTED_PAYLOAD_KEEP);
        assert_eq!(m.payload_len, 5000);
        let rec = StreamRecord::Rejected(m);
        assert_eq!(decode_record(&rec.encode()).unwrap(), rec);
    }

    fn presence() -> Presence {
        Presence {
            device_id: "dev-1".into(),
            fleet: Some("f".into()),
            client_id: "client-1".into(),
            at: 1_764_240_000_500,
            event: crate::presence::PresenceEvent::Disconnected {
                reason: crate::presence::CONNECTION_LOST.into(),
            },
        }
    }

    #[test]
    fn presence_round_trips_and_older_variants_keep_their_bytes() {
        for p in [
            presence(),
            Presence {
                fleet: None,
                event: crate::presence::PresenceEvent::Connected,
                ..presence()
            },
        ] {
            let bytes = p.encode();
            assert_eq!(bytes[4], PRESENCE);
            assert_eq!(decode_record(&bytes).unwrap(), StreamRecord::Presence(p));
        }
        // Adding the variant changed no earlier record's encoding.
        let m = RejectedMessage::new("t", "c", 7, Rejection::new(RejectReason::Schema, "x"), b"p");
        let mut old = PACKED_MAGIC.to_vec();
        old.push(PACKED_VERSION);
        old.push(REJECTED);
        old.extend(postcard::to_allocvec(&m).unwrap());
        assert_eq!(StreamRecord::Rejected(m).encode(), old);
        let mut readings = PACKED_MAGIC.to_vec();
        readings.push(PACKED_VERSION);
        readings.push(0);
        readings.extend(postcard::to_allocvec(&sample()).unwrap());
        assert_eq!(StreamRecord::Readings(sample()).encode(), readings);
    }

    #[test]
    fn a_bad_presence_record_is_refused() {
        let mut p = presence();
        p.device_id = "a/b".into();
        let bytes = StreamRecord::Presence(p).encode();
        assert_eq!(
            decode_record(&bytes).unwrap_err().reason,
            RejectReason::BadRecord
        );
        let mut p = presence();
        p.at = -5;
        assert_eq!(
            decode_record(&p.encode()).unwrap_err().reason,
            RejectReason::BadRecord
        );
    }

    #[test]
    fn lifecycle_json_decodes_to_presence() {
        let json = br#"{"clientId": "dev-1", "timestamp": 1764240000500,
            "eventType": "disconnected", "disconnectReason": "MQTT_KEEP_ALIVE_TIMEOUT"}"#;
        let StreamRecord::Presence(p) = decode_record(json).unwrap() else {
            panic!("not presence");
        };
        assert_eq!(p.device_id, "dev-1");
        assert_eq!(p.at, 1_764_240_000_500);
        assert!(p.event.is_offline());
        let bad = br#"{"clientId": "dev-1", "eventType": "connected"}"#;
        assert_eq!(decode_record(bad).unwrap_err().reason, RejectReason::Schema);
    }

    #[test]
    fn rule_json_decodes_to_the_same_record() {
        let json = br#" {"seq": 3, "ts": 1764240000123, "metrics": {"temperature": 21.5},
            "device_id": "dev-1", "fleet": "f", "received_at": 1764240000500}"#;
        assert_eq!(
            decode_record(json).unwrap(),
            StreamRecord::Readings(sample())
        );
    }

    #[test]
    fn refuses_bad_records() {
        let mut bytes = sample().encode();
        bytes[3] = 9;
        assert_eq!(
            decode_record(&bytes).unwrap_err().reason,
            RejectReason::BadRecord
        );
        let bytes = sample().encode();
        assert_eq!(
            decode_record(&bytes[..bytes.len() - 2]).unwrap_err().reason,
            RejectReason::BadRecord
        );
        assert_eq!(
            decode_record(b"").unwrap_err().reason,
            RejectReason::BadRecord
        );
        assert_eq!(
            decode_record(b"hello").unwrap_err().reason,
            RejectReason::BadRecord
        );
        let mut nan = sample();
        nan.readings[0].metrics[0].value = f64::NAN;
        assert_eq!(
            decode_record(&nan.encode()).unwrap_err().reason,
            RejectReason::BadRecord
        );
        let mut bad_id = sample();
        bad_id.device_id = "a/b".into();
        assert_eq!(
            decode_record(&bad_id.encode()).unwrap_err().reason,
            RejectReason::BadRecord
        );
    }
}
