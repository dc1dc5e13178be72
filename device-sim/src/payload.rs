//! Payload v1 JSON, written by the simulator's own code: the simulator must
//! not share the pipeline's wire code, or a bug there could hide itself.

use std::io::Write as _;

use crate::plan::{Message, RunPlan};
use crate::signal::SignalGen;

/// Values for one device in one run, one generator per metric.
#[derive(Debug)]
pub struct DeviceValues {
    /// Each metric's name as a JSON string (quoted and escaped once, here)
    /// and its generator: payloads are written straight into bytes, because
    /// building them as `serde_json::Value` maps took most of the
    /// simulator's CPU at 20 readings per message.
    gens: Vec<(Vec<u8>, SignalGen)>,
}

impl DeviceValues {
    pub fn new(plan: &RunPlan, device: u32, first_seq: u64) -> Self {
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
        DeviceValues { gens }
    }

    /// The values of reading `seq`, in the plan's metric order.
    pub fn values(&mut self, seq: u64) -> Vec<f64> {
        self.gens.iter_mut().map(|(_, g)| g.value(seq)).collect()
    }

    fn write_reading(&mut self, out: &mut Vec<u8>, seq: u64, ts: i64) {
        let _ = write!(out, "{{\"seq\":{seq},\"ts\":{ts},\"metrics\":{{");
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
