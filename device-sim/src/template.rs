//! Payload templates (`--payload-template`): the JSON a device sends, shaped
//! by the user, with placeholders the simulator fills in per reading.
//!
//! - `{{seq}}`, `{{ts}}`: numbers;
//! - `{{metrics}}`: the reading's metrics as a JSON object;
//! - `{{metric:NAME}}`: one metric's value (`null` when the reading has none);
//! - `{{device}}`, `{{fleet}}`: JSON strings.
//!
//! A message holding several readings is `{"readings":[..]}` of the
//! template rendered once per reading. The template may change field
//! order, whitespace, the metrics' layout, or send one reading as
//! `{"readings":[..]}`; payload v1 allows all of that. Before a run, a probe
//! reading is rendered and read back by the simulator's own reading of
//! payload v1 ([`judge`], written apart from the pipeline's decoder):
//!
//! - it reads back as the same reading: the run verifies as usual;
//! - payload v1 refuses it (not JSON, an unknown field such as
//!   `device_id`): every message is expected refused with that reason, and
//!   verify checks the pipeline's counters for exactly that;
//! - it is valid but says something else (no `seq`, a fixed value, a renamed
//!   metric): verify cannot know what to expect and refuses to run.

use std::io::Write as _;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Seq,
    Ts,
    Metrics,
    Metric(String),
    Device,
    Fleet,
}

impl From<Template> for String {
    fn from(t: Template) -> String {
        t.source
    }
}

impl TryFrom<String> for Template {
    type Error = String;

    fn try_from(source: String) -> Result<Self, String> {
        Template::parse(&source).map_err(|e| format!("{e:#}"))
    }
}

/// One reading as the template renders it.
pub struct Reading<'a> {
    pub device: &'a str,
    pub fleet: &'a str,
    pub seq: u64,
    pub ts: i64,
    /// (name as a JSON string, value) of each metric the reading has.
    pub metrics: &'a [(&'a [u8], f64)],
}

/// What payload v1 makes of a template's payloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// They read back as the readings the simulator meant.
    Faithful,
    /// The pipeline must refuse every one, with this reason.
    Refused(&'static str),
    /// Valid, but saying something other than the reading: why.
    Unfaithful(String),
}

impl Template {
    /// A template given inline (it starts with `{`) or as a file's path.
    pub fn load(arg: &str) -> anyhow::Result<Template> {
        if arg.trim_start().starts_with('{') {
            return Template::parse(arg).context("--payload-template");
        }
        let text =
            std::fs::read_to_string(arg).with_context(|| format!("reading template {arg}"))?;
        Template::parse(text.trim_end()).with_context(|| format!("template {arg}"))
    }

    pub fn parse(source: &str) -> anyhow::Result<Template> {
        let mut parts = Vec::new();
        let mut rest = source;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let after = &rest[open + 2..];
            let Some(close) = after.find("}}") else {
                bail!("a `{{{{` without its `}}}}`");
            };
            let name = after[..close].trim();
            parts.push(match name {
                "seq" => Part::Seq,
                "ts" => Part::Ts,
                "metrics" => Part::Metrics,
                "device" => Part::Device,
                "fleet" => Part::Fleet,
                _ => match name.strip_prefix("metric:") {
                    Some(m) if !m.is_empty() => Part::Metric(m.to_string()),
                    _ => bail!(
                        "unknown placeholder `{{{{{name}}}}}`: use seq, ts, metrics, metric:NAME, device or fleet"
                    ),
                },
            });
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template {
            source: source.to_string(),
            parts,
        })
    }

    /// Appends one reading, rendered.
    pub fn render(&self, out: &mut Vec<u8>, r: &Reading<'_>) {
        for p in &self.parts {
            match p {
                Part::Text(t) => out.extend_from_slice(t.as_bytes()),
                Part::Seq => {
                    let _ = write!(out, "{}", r.seq);
                }
                Part::Ts => {
                    let _ = write!(out, "{}", r.ts);
                }
                Part::Metrics => {
                    out.push(b'{');
                    for (i, (name, v)) in r.metrics.iter().enumerate() {
                        if i > 0 {
                            out.push(b',');
                        }
                        out.extend_from_slice(name);
                        out.push(b':');
                        let _ = serde_json::to_writer(&mut *out, v);
                    }
                    out.push(b'}');
                }
                Part::Metric(m) => {
                    let v = r.metrics.iter().find(|(name, _)| {
                        serde_json::from_slice::<String>(name).is_ok_and(|n| n == *m)
                    });
                    match v {
                        Some((_, v)) => {
                            let _ = serde_json::to_writer(&mut *out, v);
                        }
                        None => out.extend_from_slice(b"null"),
                    }
                }
                Part::Device => {
                    let _ = serde_json::to_writer(&mut *out, r.device);
                }
                Part::Fleet => {
                    let _ = serde_json::to_writer(&mut *out, r.fleet);
                }
            }
        }
    }

    /// Renders a probe reading with `metrics` and judges the payload.
    pub fn verdict(&self, metrics: &[String]) -> Verdict {
        let names: Vec<Vec<u8>> = metrics
            .iter()
            .map(|m| serde_json::to_vec(m).unwrap_or_default())
            .collect();
        let values: Vec<(&[u8], f64)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_slice(), 1.25 + i as f64))
            .collect();
        let probe = Reading {
            device: "probe-d00000",
            fleet: "probe",
            seq: 4_242,
            ts: 1_764_000_000_123,
            metrics: &values,
        };
        let mut out = Vec::new();
        self.render(&mut out, &probe);
        let want: Vec<(String, f64)> = metrics
            .iter()
            .zip(&values)
            .map(|(m, (_, v))| (m.clone(), *v))
            .collect();
        judge(&out, probe.seq, probe.ts, &want)
    }
}

/// The simulator's own reading of payload v1 (DESIGN.md): `{seq?, ts,
/// metrics}` or `{"readings": [..]}`, nothing else, metric values finite
/// numbers. Refused payloads get payload v1's reason; accepted ones must
/// hold exactly one reading equal to (`seq`, `ts`, `metrics`).
pub fn judge(bytes: &[u8], seq: u64, ts: i64, metrics: &[(String, f64)]) -> Verdict {
    let Ok(v) = serde_json::from_slice::<Value>(bytes) else {
        return Verdict::Refused("malformed_json");
    };
    let Some(obj) = v.as_object() else {
        return Verdict::Refused("schema");
    };
    let readings: Vec<&Value> = match obj.get("readings") {
        Some(Value::Array(a)) if obj.len() == 1 && !a.is_empty() => a.iter().collect(),
        Some(_) => return Verdict::Refused("schema"),
        None => vec![&v],
    };
    let mut got = Vec::new();
    for r in readings {
        let Some(r) = r.as_object() else {
            return Verdict::Refused("schema");
        };
        if r.keys()
            .any(|k| !matches!(k.as_str(), "seq" | "ts" | "metrics"))
        {
            return Verdict::Refused("schema");
        }
        let (Some(t), Some(Value::Object(m))) =
            (r.get("ts").and_then(Value::as_i64), r.get("metrics"))
        else {
            return Verdict::Refused("schema");
        };
        let s = match r.get("seq") {
            None => None,
            Some(s) => match s.as_u64() {
                Some(s) => Some(s),
                None => return Verdict::Refused("schema"),
            },
        };
        let mut values = Vec::new();
        for (name, x) in m {
            match x.as_f64() {
                Some(x) if x.is_finite() => values.push((name.clone(), x)),
                _ => return Verdict::Refused("schema"),
            }
        }
        got.push((s, t, values));
    }
    let mut want: Vec<(String, f64)> = metrics.to_vec();
    want.sort_by(|a, b| a.0.cmp(&b.0));
    match got.as_slice() {
        [(s, t, values)] => {
            let mut values = values.clone();
            values.sort_by(|a, b| a.0.cmp(&b.0));
            if s.is_none() {
                Verdict::Unfaithful(
                    "the payload has no `seq`, so a retransmission cannot be told from a new reading"
                        .into(),
                )
            } else if *s != Some(seq) {
                Verdict::Unfaithful("the payload's `seq` is not the reading's".into())
            } else if *t != ts {
                Verdict::Unfaithful(format!("the payload's ts is {t}, not the reading's {ts}"))
            } else if values != want {
                Verdict::Unfaithful(format!(
                    "the payload's metrics are {values:?}, not the reading's {want:?}"
                ))
            } else {
                Verdict::Faithful
            }
        }
        _ => Verdict::Unfaithful(format!("the payload holds {} readings, not one", got.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(t: &str) -> Verdict {
        Template::parse(t)
            .unwrap()
            .verdict(&["temperature".into(), "humidity".into()])
    }

    #[test]
    fn templates_are_judged_by_what_they_send() {
        for t in [
            r#"{"metrics": {{metrics}}, "ts": {{ts}}, "seq": {{seq}}}"#,
            "{ \"readings\" : [ {\"ts\":{{ts}},\"seq\":{{seq}},\"metrics\":{\"humidity\":{{metric:humidity}},\"temperature\":{{metric:temperature}}}} ] }",
        ] {
            assert_eq!(verdict(t), Verdict::Faithful, "{t}");
        }
        for (t, reason) in [
            (
                r#"{"device_id": {{device}}, "seq": {{seq}}, "ts": {{ts}}, "metrics": {{metrics}}}"#,
                "schema",
            ),
            (
                r#"{"seq": {{seq}}, "ts": {{ts}}, "metrics": {{metrics}}"#,
                "malformed_json",
            ),
            (
                r#"{"seq": {{seq}}, "ts": "{{ts}}", "metrics": {{metrics}}}"#,
                "schema",
            ),
        ] {
            assert_eq!(verdict(t), Verdict::Refused(reason), "{t}");
        }
        for t in [
            r#"{"ts": {{ts}}, "metrics": {{metrics}}}"#,
            r#"{"seq": {{seq}}, "ts": {{ts}}, "metrics": {"temperature": {{metric:temperature}}}}"#,
        ] {
            assert!(matches!(verdict(t), Verdict::Unfaithful(_)), "{t}");
        }
        assert!(Template::parse("{{nope}}").is_err());
        assert!(Template::parse("{{seq").is_err());
    }
}
