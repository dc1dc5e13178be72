//! Payload v1 JSON, written by the simulator's own code: the simulator must
//! not share the pipeline's wire code, or a bug there could hide itself.

use std::io::Write as _;
use std::sync::Arc;

use crate::plan::{Message, RunPlan};
use crate::replay::ReplayFleet;
use crate::signal::SignalGen;
use crate::template::Template;

/// Values for one device in one run, one generator per metric.
#[derive(Debug)]
pub struct DeviceValues {
    /// Each metric's name as a JSON string (quoted and escaped once, here)
    /// and its generator: payloads are written straight into bytes, because
    /// building them as `serde_json::Value` maps took most of the
    /// simulator's CPU at 20 readings per message.
    gens: Vec<(Vec<u8>, SignalGen)>,
    /// A replayed device's rows, by `seq - first_seq`, instead of the
    /// generators (which are then empty).
    recorded: Option<(Arc<ReplayFleet>, usize, u64)>,
    /// The metrics' names as JSON strings, for recorded values.
    names: Vec<Vec<u8>>,
    /// The payload's template, with the device's id and fleet.
    template: Option<(Template, String, String)>,
}

impl DeviceValues {
    pub fn new(plan: &RunPlan, device: u32, first_seq: u64) -> Self {
        let names = plan
            .metrics
            .iter()
            .map(|m| serde_json::to_vec(&m.name).unwrap_or_default())
            .collect();
        let template = plan
            .template
            .clone()
            .map(|t| (t, plan.device_id(device), plan.fleet.clone()));
        if let Some(data) = plan.replay.as_ref().and_then(|r| r.data.clone()) {
            return DeviceValues {
                gens: Vec::new(),
                recorded: Some((data, device as usize, first_seq)),
                names,
                template,
            };
        }
        let gens = plan
            .metrics
            .iter()
            .map(|m| {
                (
                    serde_json::to_vec(&m.name).unwrap_or_default(),
                    SignalGen::new(plan.seed, device, m, first_seq),
                )
            })
            .collect();
        DeviceValues {
            gens,
            recorded: None,
            names,
            template,
        }
    }

    /// The values of reading `seq`, in the plan's metric order.
    pub fn values(&mut self, seq: u64) -> Vec<f64> {
        self.gens.iter_mut().map(|(_, g)| g.value(seq)).collect()
    }

    /// The values of reading `seq`, in the plan's metric order: `None` for
    /// a metric a recorded row has no value for.
    pub fn reading_values(&mut self, seq: u64) -> Vec<Option<f64>> {
        match &self.recorded {
            Some((data, device, first_seq)) => {
                let row = data.devices.get(*device).and_then(|d| {
                    let k = usize::try_from(seq.checked_sub(*first_seq)?).ok()?;
                    d.rows.get(k)
                });
                match row {
                    Some(r) => r.values.clone(),
                    None => vec![None; self.names.len()],
                }
            }
            None => self.values(seq).into_iter().map(Some).collect(),
        }
    }

    fn write_reading(&mut self, out: &mut Vec<u8>, seq: u64, ts: i64) {
        if self.template.is_some() {
            let values = self.reading_values(seq);
            let metrics: Vec<(&[u8], f64)> = self
                .names
                .iter()
                .zip(&values)
                .filter_map(|(n, v)| Some((n.as_slice(), (*v)?)))
                .collect();
            if let Some((t, device, fleet)) = &self.template {
                t.render(
                    out,
                    &crate::template::Reading {
                        device,
                        fleet,
                        seq,
                        ts,
                        metrics: &metrics,
                    },
                );
            }
            return;
        }
        let _ = write!(out, "{{\"seq\":{seq},\"ts\":{ts},\"metrics\":{{");
        if self.recorded.is_some() {
            let values = self.reading_values(seq);
            let present = self
                .names
                .iter()
                .zip(&values)
                .filter_map(|(n, v)| Some((n, (*v)?)));
            for (i, (name, v)) in present.enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(name);
                out.push(b':');
                let _ = serde_json::to_writer(&mut *out, &v);
            }
            out.extend_from_slice(b"}}");
            return;
        }
        for (i, (name, g)) in self.gens.iter_mut().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(name);
            out.push(b':');
            // serde_json writes floats as JSON does (and a non-finite one as null).
            let _ = serde_json::to_writer(&mut *out, &g.value(seq));
        }
        out.extend_from_slice(b"}}");
    }

    /// The message's payload: one reading alone, several as `{"readings": [..]}`.
    pub fn payload(&mut self, msg: &Message) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + msg.readings.len() * (48 + 32 * self.gens.len()));
        if let [r] = msg.readings.as_slice() {
            self.write_reading(&mut out, r.seq, r.ts);
        } else {
            out.extend_from_slice(b"{\"readings\":[");
            for (i, r) in msg.readings.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                self.write_reading(&mut out, r.seq, r.ts);
            }
            out.extend_from_slice(b"]}");
        }
        out
    }
}

/// A payload cut short inside its metrics: JSON that ends too early, which
/// the pipeline must count as `malformed_json` (not `schema`, and not
/// `not_finite`: it holds no `NaN` or `Infinity`).
pub fn malformed(seq: u64, ts: i64) -> Vec<u8> {
    format!("{{\"seq\": {seq}, \"ts\": {ts}, \"metrics\": {{\"temperature\": 2").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::PlannedReading;
    use crate::plan::tests::plan;
    use serde_json::Value;

    #[test]
    fn one_reading_or_a_batch() {
        let p = plan();
        let mut v = DeviceValues::new(&p, 0, 0);
        let one = Message {
            k: 0,
            due_ms: 5,
            readings: vec![PlannedReading { seq: 3, ts: 5 }],
            late_reading: None,
        };
        let j: Value = serde_json::from_slice(&v.payload(&one)).unwrap();
        assert_eq!(j["seq"], 3);
        assert_eq!(j["ts"], 5);
        assert_eq!(j["metrics"]["temperature"].as_f64(), Some(v.values(3)[0]));
        let two = Message {
            readings: vec![
                PlannedReading { seq: 3, ts: 5 },
                PlannedReading { seq: 4, ts: 6 },
            ],
            ..one
        };
        let j: Value = serde_json::from_slice(&v.payload(&two)).unwrap();
        assert_eq!(j["readings"][1]["seq"], 4);
        assert_eq!(j.as_object().unwrap().len(), 1);
    }

    #[test]
    fn malformed_is_not_json() {
        assert!(serde_json::from_slice::<Value>(&malformed(1, 2)).is_err());
    }
}
