//! Payload v1: the JSON a device publishes, and the IoT rule's JSON record that
//! wraps it on AWS.
//!
//! Both decode through one strict parser so that a payload accepted locally is
//! accepted on AWS and the other way round.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, MapAccess, Visitor};

use crate::reading::{
    MAX_MESSAGE_BYTES, MAX_METRICS, MAX_READINGS, MAX_TS, Metric, Reading, check_metric_name,
};
use crate::reject::{RejectReason, Rejection};
use crate::topic::check_id;

/// Decodes and validates a device payload (one reading or `{"readings": [...]}`).
pub fn decode_payload(bytes: &[u8]) -> Result<Vec<Reading>, Rejection> {
    let raw = parse_raw(bytes)?;
    if raw.device_id.is_some() || raw.fleet.is_some() || raw.received_at.is_some() {
        return Err(Rejection::new(
            RejectReason::Schema,
            "`device_id`, `fleet` and `received_at` come from the topic and the endpoint, not the payload",
        ));
    }
    raw.into_readings()
}

/// A message as the AWS IoT rule forwards it: the payload plus the topic's
/// `device_id` and `fleet` and the rule's `received_at` timestamp.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleRecord {
    pub device_id: String,
    pub fleet: String,
    pub received_at: i64,
    pub readings: Vec<Reading>,
}

/// Decodes the IoT rule's JSON (`SELECT *, topic(3) AS device_id, topic(2) AS
/// fleet, timestamp() AS received_at`).
pub fn decode_rule_json(bytes: &[u8]) -> Result<RuleRecord, Rejection> {
    let mut raw = parse_raw(bytes)?;
    let (Some(device_id), Some(fleet), Some(received_at)) = (
        raw.device_id.take(),
        raw.fleet.take(),
        raw.received_at.take(),
    ) else {
        return Err(Rejection::new(
            RejectReason::Schema,
            "an IoT rule record needs `device_id`, `fleet` and `received_at`",
        ));
    };
    check_id("device_id", &device_id).map_err(|d| Rejection::new(RejectReason::Schema, d))?;
    check_id("fleet", &fleet).map_err(|d| Rejection::new(RejectReason::Schema, d))?;
    Ok(RuleRecord {
        device_id: device_id.into_owned(),
        fleet: fleet.into_owned(),
        received_at,
        readings: raw.into_readings()?,
    })
}

fn parse_raw(bytes: &[u8]) -> Result<RawMessage<'_>, Rejection> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(Rejection::new(
            RejectReason::TooLarge,
            format!(
                "message is {} bytes; the limit is {MAX_MESSAGE_BYTES}",
                bytes.len()
            ),
        ));
    }
    serde_json::from_slice::<RawMessage>(bytes).map_err(|e| classify(bytes, &e))
}

/// Maps a serde_json error to the reason a device team can act on.
fn classify(bytes: &[u8], e: &serde_json::Error) -> Rejection {
    use serde_json::error::Category;
    let detail = e.to_string();
    // serde_json reports `NaN` as a syntax error and a huge exponent as out of
    // range; both mean the same to a device team.
    if detail.contains("number out of range") || has_non_finite_literal(bytes) {
        return Rejection::new(
            RejectReason::NotFinite,
            format!("metric values must be finite numbers ({detail})"),
        );
    }
    match e.classify() {
        Category::Data => Rejection::new(RejectReason::Schema, detail),
        Category::Syntax | Category::Eof | Category::Io => {
            Rejection::new(RejectReason::MalformedJson, detail)
        }
    }
}

/// Firmware JSON encoders often write `NaN` or `Infinity` for a failed sensor;
/// that is not JSON, but it deserves its own reason.
fn has_non_finite_literal(bytes: &[u8]) -> bool {
    let mut in_string = false;
    let mut escaped = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
        } else if bytes[i..].starts_with(b"NaN") || bytes[i..].starts_with(b"Infinity") {
            return true;
        }
        i += 1;
    }
    false
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMessage<'a> {
    seq: Option<u64>,
    ts: Option<i64>,
    metrics: Option<Metrics>,
    readings: Option<Vec<RawReading>>,
    #[serde(borrow)]
    device_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    fleet: Option<Cow<'a, str>>,
    received_at: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReading {
    seq: Option<u64>,
    ts: i64,
    metrics: Metrics,
}

impl RawMessage<'_> {
    fn into_readings(self) -> Result<Vec<Reading>, Rejection> {
        let schema = |d: &str| Rejection::new(RejectReason::Schema, d);
        match (self.readings, self.ts, self.metrics) {
            (Some(readings), None, None) if self.seq.is_none() => {
                if readings.is_empty() || readings.len() > MAX_READINGS {
                    return Err(schema(&format!(
                        "`readings` must hold 1..={MAX_READINGS} readings, got {}",
                        readings.len()
                    )));
                }
                readings
                    .into_iter()
                    .enumerate()
                    .map(|(i, r)| {
                        reading(r.seq, r.ts, r.metrics).map_err(|mut e| {
                            e.detail = format!("readings[{i}]: {}", e.detail);
                            e
                        })
                    })
                    .collect()
            }
            (Some(_), _, _) => Err(schema(
                "a payload has either `readings` or `seq`/`ts`/`metrics`, not both",
            )),
            (None, Some(ts), Some(metrics)) => Ok(vec![reading(self.seq, ts, metrics)?]),
            (None, None, _) => Err(schema("missing field `ts`")),
            (None, Some(_), None) => Err(schema("missing field `metrics`")),
        }
    }
}

fn reading(seq: Option<u64>, ts: i64, metrics: Metrics) -> Result<Reading, Rejection> {
    if !(0..=MAX_TS).contains(&ts) {
        return Err(Rejection::new(
            RejectReason::Schema,
            format!("`ts` must be ms since the Unix epoch in 0..={MAX_TS}, got {ts}"),
        ));
    }
    Ok(Reading {
        seq,
        ts,
        metrics: metrics.0,
    })
}

/// The `metrics` object, validated while it is parsed so that a bad name or
/// value names itself in the error.
struct Metrics(Vec<Metric>);

impl<'de> Deserialize<'de> for Metrics {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(MetricsVisitor)
    }
}

struct MetricsVisitor;

impl<'de> Visitor<'de> for MetricsVisitor {
    type Value = Metrics;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object of metric names to finite numbers")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Metrics, A::Error> {
        let mut metrics: Vec<Metric> = Vec::with_capacity(map.size_hint().unwrap_or(4).min(16));
        while let Some(name) = map.next_key::<Cow<'de, str>>()? {
            check_metric_name(&name).map_err(de::Error::custom)?;
            if metrics.len() == MAX_METRICS {
                return Err(de::Error::custom(format!(
                    "a reading carries at most {MAX_METRICS} metrics"
                )));
            }
            if metrics.iter().any(|m| m.name == name) {
                return Err(de::Error::custom(format!("metric `{name}` appears twice")));
            }
            let value: f64 = map.next_value()?;
            metrics.push(Metric {
                name: name.into_owned(),
                value,
            });
        }
        if metrics.is_empty() {
            return Err(de::Error::custom("`metrics` must not be empty"));
        }
        Ok(Metrics(metrics))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(bytes: &[u8]) -> RejectReason {
        decode_payload(bytes).unwrap_err().reason
    }

    #[test]
    fn decodes_one_reading() {
        let r = decode_payload(
            br#"{"seq": 42, "ts": 1764240000123, "metrics": {"temperature": 21.5, "humidity": 40}}"#,
        )
        .unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].seq, Some(42));
        assert_eq!(r[0].ts, 1_764_240_000_123);
        assert_eq!(r[0].metrics[0].name, "temperature");
        assert_eq!(r[0].metrics[1].value, 40.0);
    }

    #[test]
    fn decodes_a_batch() {
        let r = decode_payload(
            br#"{"readings": [{"ts": 1, "metrics": {"a": 1}}, {"seq": 7, "ts": 2, "metrics": {"a\u002db": -2.5e3}}]}"#,
        )
        .unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].seq, None);
        assert_eq!(r[1].metrics[0].name, "a-b");
        assert_eq!(r[1].metrics[0].value, -2500.0);
    }

    #[test]
    fn names_each_reason() {
        let cases: [(&[u8], RejectReason); 7] = [
            (b"{\"ts\": 1, ", RejectReason::MalformedJson),
            (b"\xff\xfe", RejectReason::MalformedJson),
            (
                br#"{"ts": 1, "metrics": {"t": "hot"}}"#,
                RejectReason::Schema,
            ),
            (
                br#"{"ts": 1, "metrics": {"t": NaN}}"#,
                RejectReason::NotFinite,
            ),
            (
                br#"{"ts": 1, "metrics": {"t": -Infinity}}"#,
                RejectReason::NotFinite,
            ),
            (
                br#"{"ts": 1, "metrics": {"t": 1e999}}"#,
                RejectReason::NotFinite,
            ),
            (
                br#"{"ts": 1, "metrics": {"NaN": nope}}"#,
                RejectReason::MalformedJson,
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(reason(bytes), want, "{}", String::from_utf8_lossy(bytes));
        }
        let big = format!(
            r#"{{"ts": 1, "metrics": {{"t": 1}}, "pad": "{}"}}"#,
            "x".repeat(MAX_MESSAGE_BYTES)
        );
        assert_eq!(reason(big.as_bytes()), RejectReason::TooLarge);
    }

    #[test]
    fn refuses_schema_violations() {
        for bad in [
            r#"[]"#,
            r#"{}"#,
            r#"{"ts": 1}"#,
            r#"{"metrics": {"a": 1}}"#,
            r#"{"ts": 1.5, "metrics": {"a": 1}}"#,
            r#"{"ts": -1, "metrics": {"a": 1}}"#,
            r#"{"ts": 1, "seq": -1, "metrics": {"a": 1}}"#,
            r#"{"ts": 1, "metrics": {}}"#,
            r#"{"ts": 1, "metrics": {"a": 1, "a": 2}}"#,
            r#"{"ts": 1, "metrics": {"a b": 1}}"#,
            r#"{"ts": 1, "metrics": {"a": null}}"#,
            r#"{"ts": 1, "metrics": {"a": 1}, "extra": true}"#,
            r#"{"ts": 1, "metrics": {"a": 1}, "device_id": "d"}"#,
            r#"{"readings": []}"#,
            r#"{"readings": [{"ts": 1, "metrics": {"a": 1}}], "ts": 1}"#,
            r#"{"readings": [{"ts": 1, "metrics": {"a": 1}, "x": 1}]}"#,
        ] {
            assert_eq!(reason(bad.as_bytes()), RejectReason::Schema, "{bad}");
        }
    }

    #[test]
    fn caps_metrics_per_reading() {
        let metrics: Vec<String> = (0..=MAX_METRICS).map(|i| format!("\"m{i}\": 1")).collect();
        let payload = format!(r#"{{"ts": 1, "metrics": {{{}}}}}"#, metrics.join(","));
        let err = decode_payload(payload.as_bytes()).unwrap_err();
        assert_eq!(err.reason, RejectReason::Schema);
        assert!(err.detail.contains("at most 100"), "{}", err.detail);
    }

    #[test]
    fn decodes_the_iot_rule_record() {
        let r = decode_rule_json(
            br#"{"seq": 1, "ts": 5, "metrics": {"t": 1}, "device_id": "d-1", "fleet": "f", "received_at": 9}"#,
        )
        .unwrap();
        assert_eq!(
            (r.device_id.as_str(), r.fleet.as_str(), r.received_at),
            ("d-1", "f", 9)
        );
        assert_eq!(r.readings.len(), 1);
        let err = decode_rule_json(br#"{"ts": 5, "metrics": {"t": 1}}"#).unwrap_err();
        assert_eq!(err.reason, RejectReason::Schema);
        let err = decode_rule_json(
            br#"{"ts": 5, "metrics": {"t": 1}, "device_id": "+", "fleet": "f", "received_at": 9}"#,
        )
        .unwrap_err();
        assert_eq!(err.reason, RejectReason::Schema);
    }
}
