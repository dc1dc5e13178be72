//! Payload v1 JSON, written by the simulator's own code: the simulator must
//! not share the pipeline's wire code, or a bug there could hide itself.

use serde_json::{Map, Value, json};

use crate::plan::{Message, RunPlan};
use crate::signal::SignalGen;

/// Values for one device in one run, one generator per metric.
#[derive(Debug)]
pub struct DeviceValues {
    gens: Vec<(String, SignalGen)>,
}

impl DeviceValues {
    pub fn new(plan: &RunPlan, device: u32, first_seq: u64) -> Self {
        let gens = plan
            .metrics
            .iter()
            .map(|m| {
                (
                    m.name.clone(),
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

    fn reading_json(&mut self, seq: u64, ts: i64) -> Value {
        let mut metrics = Map::new();
        for (name, g) in &mut self.gens {
            metrics.insert(name.clone(), json!(g.value(seq)));
        }
        json!({"seq": seq, "ts": ts, "metrics": metrics})
    }

    /// The message's payload: one reading alone, several as `{"readings": [..]}`.
    pub fn payload(&mut self, msg: &Message) -> Vec<u8> {
        let value = if let [r] = msg.readings.as_slice() {
            self.reading_json(r.seq, r.ts)
        } else {
            let readings: Vec<Value> = msg
                .readings
                .iter()
                .map(|r| self.reading_json(r.seq, r.ts))
                .collect();
            json!({ "readings": readings })
        };
        value.to_string().into_bytes()
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
