//! Refusals: every refused reading, message or unreadable record is counted
//! and kept as a dead letter.

use schemas::record::{PackedView, ReadingView, RejectedMessage};
use schemas::state::DeadLetter;
use schemas::{Rejection, SeqNo};

use super::apply::Batcher;
use super::{ApplyError, Counter};
use crate::commit::Write;

impl Batcher<'_, '_> {
    pub(super) fn reject_reading(
        &mut self,
        seq: SeqNo,
        r: &PackedView,
        reading: &ReadingView,
        index: usize,
        rejection: &Rejection,
    ) -> Result<(), ApplyError> {
        if self.count(seq, Counter::Rejected(rejection.reason))? {
            self.stats.reject(rejection.reason);
        }
        // The raw message when the endpoint kept it, else the reading alone.
        let (client_id, payload_head, payload_len) = match &r.origin {
            Some(o) => (
                Some(o.client_id.clone()),
                o.payload_head.clone(),
                o.payload_len,
            ),
            None => {
                let json = reading_json(reading);
                let len = json.len() as u64;
                (None, json, len)
            }
        };
        self.dead_letter(
            index as u32,
            DeadLetter {
                received_at: r.received_at,
                reason: rejection.reason,
                detail: rejection.detail.clone(),
                topic: Some(schemas::Topic::format(&r.fleet, &r.device_id)),
                client_id,
                device_id: Some(r.device_id.to_string()),
                fleet: Some(r.fleet.to_string()),
                payload_len,
                payload_head,
                shard: self.plan.shard.clone(),
                seq,
            },
        );
        Ok(())
    }

    pub(super) fn reject_message(
        &mut self,
        seq: SeqNo,
        m: &RejectedMessage,
    ) -> Result<(), ApplyError> {
        if self.count(seq, Counter::Rejected(m.reason))? {
            self.stats.reject(m.reason);
        }
        let topic = schemas::Topic::parse(&m.topic).ok();
        self.dead_letter(
            0,
            DeadLetter {
                received_at: m.received_at,
                reason: m.reason,
                detail: m.detail.clone(),
                topic: Some(m.topic.clone()),
                client_id: Some(m.client_id.clone()),
                device_id: topic.map(|t| t.device_id.to_string()),
                fleet: topic.map(|t| t.fleet.to_string()),
                payload_head: m.payload_head.clone(),
                payload_len: m.payload_len,
                shard: self.plan.shard.clone(),
                seq,
            },
        );
        Ok(())
    }

    pub(super) fn reject_unreadable(
        &mut self,
        seq: SeqNo,
        rejection: &Rejection,
        head: &[u8],
        len: u64,
    ) -> Result<(), ApplyError> {
        if self.count(seq, Counter::Rejected(rejection.reason))? {
            self.stats.reject(rejection.reason);
        }
        // An unreadable record has no trustworthy time of its own.
        let mut letter = DeadLetter::new(
            0,
            rejection.reason,
            rejection.detail.clone(),
            self.plan.shard.clone(),
            seq,
        );
        letter.payload_head = head.to_vec();
        letter.payload_len = len;
        self.dead_letter(0, letter);
        Ok(())
    }

    pub(super) fn dead_letter(&mut self, index: u32, letter: DeadLetter) {
        let retention_ms = self.config.dead_letter_retention_ms;
        self.dead_letters
            .push(Write::dead_letter(letter, index, retention_ms));
    }
}

/// A refused reading as payload v1 JSON, so the dead letter reads like what
/// the device sent.
fn reading_json(reading: &ReadingView) -> Vec<u8> {
    let metrics: serde_json::Map<String, serde_json::Value> = reading
        .metrics
        .iter()
        .map(|m| (m.name.to_string(), serde_json::json!(m.value)))
        .collect();
    let mut obj = serde_json::json!({ "ts": reading.ts, "metrics": metrics });
    if let (Some(seq), Some(map)) = (reading.seq, obj.as_object_mut()) {
        map.insert("seq".into(), serde_json::json!(seq));
    }
    serde_json::to_vec(&obj).unwrap_or_default()
}
