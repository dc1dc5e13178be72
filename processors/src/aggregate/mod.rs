//! The aggregation core: a batch of stream records in, the store writes that
//! fold it into the rollups out. No I/O and no clock.
//!
//! A batch goes through two pure steps around the store:
//!
//! 1. [`plan`] decodes the records, judges each reading's lateness against its
//!    `received_at`, and lists the items the batch may touch.
//! 2. The shell loads those items ([`crate::store::RollupStore::load`]).
//! 3. [`apply`] folds every reading into its items and returns a
//!    [`Commit`] of conditional writes.
//!
//! Exactly-once effect comes from two marks kept in the store next to the
//! rollups, never in the process:
//!
//! - every item records, per shard, the highest stream sequence number folded
//!   into it (`applied`): a replayed record is skipped item by item;
//! - every device keeps, per finest window, the identities of its readings
//!   (`DedupSet`): a reading delivered twice, in any order, counts once.

#[cfg(test)]
mod tests;

use std::collections::HashMap;

use schemas::record::{RejectedMessage, StreamRecord};
use schemas::state::{DeadLetter, DedupSet, DeviceState, Item, ItemState, MemberState};
use schemas::{PackedRecord, Reading, RejectReason, Rejection, WindowAgg, decode_record};
use stream::{Record, SeqNo};

use crate::config::AggregateConfig;
use crate::keys::{ItemKey, counters};
use crate::store::{Commit, Condition, StoreError, Stored, Write};

/// A decoded batch and the keys it may touch.
#[derive(Debug)]
pub struct Plan {
    shard: String,
    records: Vec<Decoded>,
    keys: Vec<ItemKey>,
}

impl Plan {
    /// The items to load before [`apply`].
    pub fn keys(&self) -> &[ItemKey] {
        &self.keys
    }

    /// Sequence number of the last record in the batch.
    pub fn last_seq(&self) -> Option<SeqNo> {
        self.records.last().map(|r| r.seq)
    }
}

#[derive(Debug)]
struct Decoded {
    seq: SeqNo,
    body: Body,
}

#[derive(Debug)]
enum Body {
    Readings {
        record: PackedRecord,
        /// Per reading: `None` if it may be accepted, else why not.
        verdicts: Vec<Option<Rejection>>,
    },
    Rejected(RejectedMessage),
    Unreadable {
        rejection: Rejection,
        head: Vec<u8>,
        len: u64,
    },
}

/// What a batch did, for the process's metrics. The store's counters are the
/// exact record; these may count a replayed batch twice.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchStats {
    pub records: u64,
    pub accepted_readings: u64,
    pub duplicate_readings: u64,
    pub late_readings: u64,
    /// Readings skipped because an earlier attempt already applied them.
    pub replayed_readings: u64,
    pub rejected: Vec<(RejectReason, u64)>,
}

impl BatchStats {
    fn reject(&mut self, reason: RejectReason) {
        match self.rejected.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => *n += 1,
            None => self.rejected.push((reason, 1)),
        }
    }
}

/// Decodes a batch of one shard and lists the items it may touch.
pub fn plan(shard: &str, records: &[Record], cfg: &AggregateConfig) -> Plan {
    let mut keys = KeySet::default();
    let mut decoded = Vec::with_capacity(records.len());
    let mut reasons = Vec::new();
    for r in records {
        let body = match decode_record(&r.data) {
            Ok(StreamRecord::Readings(record)) => {
                let verdicts: Vec<Option<Rejection>> = record
                    .readings
                    .iter()
                    .map(|reading| judge(reading, record.received_at, cfg))
                    .collect();
                for (reading, verdict) in record.readings.iter().zip(&verdicts) {
                    match verdict {
                        Some(rejection) => reasons.push(rejection.reason),
                        None => reading_keys(shard, &record, reading, cfg, &mut keys),
                    }
                }
                Body::Readings { record, verdicts }
            }
            Ok(StreamRecord::Rejected(message)) => {
                reasons.push(message.reason);
                Body::Rejected(message)
            }
            Err(rejection) => {
                reasons.push(rejection.reason);
                Body::Unreadable {
                    rejection,
                    head: r.data[..r.data.len().min(schemas::record::REJECTED_PAYLOAD_KEEP)]
                        .to_vec(),
                    len: r.data.len() as u64,
                }
            }
        };
        decoded.push(Decoded { seq: r.seq, body });
    }
    for name in [counters::ACCEPTED, counters::DUPLICATE] {
        keys.insert(counter_key(shard, name.to_string()));
    }
    reasons.sort();
    reasons.dedup();
    for reason in reasons {
        keys.insert(counter_key(shard, counters::rejected(reason)));
    }
    Plan {
        shard: shard.to_string(),
        records: decoded,
        keys: keys.keys,
    }
}

/// Lateness is judged against `received_at`, stamped once at ingest, so a
/// replayed batch decides exactly as the first attempt did.
fn judge(reading: &Reading, received_at: i64, cfg: &AggregateConfig) -> Option<Rejection> {
    if reading.ts > received_at.saturating_add(cfg.future_tolerance_ms) {
        return Some(Rejection::new(
            RejectReason::InFuture,
            format!(
                "ts {} is {} ms after the reading was received (limit {} ms)",
                reading.ts,
                reading.ts - received_at,
                cfg.future_tolerance_ms
            ),
        ));
    }
    let finest = cfg.finest();
    let end = finest.window_start(reading.ts) + finest.ms();
    if end.saturating_add(cfg.allowed_lateness_ms) <= received_at {
        return Some(Rejection::new(
            RejectReason::TooLate,
            format!(
                "window ending {end} was final {} ms before the reading was received (allowed lateness {} ms)",
                received_at - end - cfg.allowed_lateness_ms,
                cfg.allowed_lateness_ms
            ),
        ));
    }
    None
}

fn reading_keys(
    shard: &str,
    record: &PackedRecord,
    reading: &Reading,
    cfg: &AggregateConfig,
    keys: &mut KeySet,
) {
    let finest = cfg.finest();
    keys.insert(ItemKey::Dedup {
        device: record.device_id.clone(),
        start: finest.window_start(reading.ts),
    });
    keys.insert(ItemKey::Device {
        device: record.device_id.clone(),
    });
    keys.insert(ItemKey::Member {
        fleet: record.fleet.clone(),
        device: record.device_id.clone(),
    });
    for metric in &reading.metrics {
        for &res in &cfg.resolutions {
            let start = res.window_start(reading.ts);
            keys.insert(ItemKey::DeviceWindow {
                device: record.device_id.clone(),
                metric: metric.name.clone(),
                res,
                start,
            });
            keys.insert(ItemKey::FleetWindow {
                fleet: record.fleet.clone(),
                metric: metric.name.clone(),
                res,
                start,
                part: shard.to_string(),
            });
        }
    }
}

fn counter_key(shard: &str, name: String) -> ItemKey {
    ItemKey::Counter {
        shard: shard.to_string(),
        name,
    }
}

/// Keys in first-seen order without repeats.
#[derive(Default)]
struct KeySet {
    keys: Vec<ItemKey>,
    seen: std::collections::HashSet<ItemKey>,
}

impl KeySet {
    fn insert(&mut self, key: ItemKey) {
        if !self.seen.contains(&key) {
            self.seen.insert(key.clone());
            self.keys.push(key);
        }
    }
}

/// The result of [`apply`].
#[derive(Debug)]
pub struct Applied {
    pub commit: Commit,
    pub stats: BatchStats,
}

/// A loaded item being changed by the batch.
struct Slot {
    /// The version the write is conditional on; `None` if the item is new.
    version: Option<u64>,
    item: Item,
    /// The highest record of this batch folded in, if any.
    touched: Option<SeqNo>,
}

/// Folds the planned batch into the loaded items. `loaded` is in the order of
/// [`Plan::keys`].
pub fn apply(
    plan: Plan,
    loaded: Vec<Option<Stored>>,
    cfg: &AggregateConfig,
) -> Result<Applied, StoreError> {
    let Plan {
        shard,
        records,
        keys,
    } = plan;
    let mut slots: HashMap<ItemKey, Slot> = HashMap::with_capacity(keys.len());
    for (key, stored) in keys.into_iter().zip(loaded) {
        let slot = match stored {
            Some(s) => Slot {
                version: Some(s.version),
                item: s.item,
                touched: None,
            },
            None => Slot {
                version: None,
                item: Item::default(),
                touched: None,
            },
        };
        slots.insert(key, slot);
    }
    let mut batch = Batcher {
        shard: &shard,
        cfg,
        slots,
        dead_letters: Vec::new(),
        stats: BatchStats::default(),
    };
    for record in &records {
        batch.stats.records += 1;
        match &record.body {
            Body::Readings {
                record: r,
                verdicts,
            } => {
                for (index, (reading, verdict)) in r.readings.iter().zip(verdicts).enumerate() {
                    match verdict {
                        Some(rejection) => {
                            batch.reject_reading(record.seq, r, reading, index, rejection)?
                        }
                        None => batch.accept(record.seq, r, reading)?,
                    }
                }
            }
            Body::Rejected(m) => batch.reject_message(record.seq, m)?,
            Body::Unreadable {
                rejection,
                head,
                len,
            } => batch.reject_unreadable(record.seq, rejection, head, *len)?,
        }
    }
    Ok(batch.finish())
}

struct Batcher<'a> {
    shard: &'a str,
    cfg: &'a AggregateConfig,
    slots: HashMap<ItemKey, Slot>,
    dead_letters: Vec<Write>,
    stats: BatchStats,
}

impl Batcher<'_> {
    /// Runs `f` on the item at `key` unless the record at `seq` is already in
    /// it. Returns whether it ran.
    fn touch(
        &mut self,
        key: &ItemKey,
        seq: SeqNo,
        f: impl FnOnce(&mut ItemState) -> Result<(), String>,
    ) -> Result<bool, StoreError> {
        let Some(slot) = self.slots.get_mut(key) else {
            // plan() lists every key apply() touches; a miss is a bug, and
            // refusing the batch is safer than writing blind.
            return Err(StoreError::Corrupt {
                key: format!("{}/{}", key.pk(), key.sk()),
                detail: "item was not loaded for this batch".into(),
            });
        };
        if slot.item.applied.contains(self.shard, seq) {
            return Ok(false);
        }
        f(&mut slot.item.state).map_err(|detail| StoreError::Corrupt {
            key: format!("{}/{}", key.pk(), key.sk()),
            detail,
        })?;
        slot.touched = Some(slot.touched.map_or(seq, |t| t.max(seq)));
        Ok(true)
    }

    fn count(&mut self, seq: SeqNo, name: String) -> Result<bool, StoreError> {
        let key = counter_key(self.shard, name);
        self.touch(&key, seq, |state| {
            match state {
                ItemState::Empty => *state = ItemState::Counter(1),
                ItemState::Counter(n) => *n += 1,
                other => return Err(mismatch("counter", other)),
            }
            Ok(())
        })
    }

    fn accept(
        &mut self,
        seq: SeqNo,
        r: &PackedRecord,
        reading: &Reading,
    ) -> Result<(), StoreError> {
        let finest = self.cfg.finest();
        let dedup_key = ItemKey::Dedup {
            device: r.device_id.clone(),
            start: finest.window_start(reading.ts),
        };
        let Some(dedup) = self.slots.get(&dedup_key) else {
            return Err(StoreError::Corrupt {
                key: dedup_key.pk(),
                detail: "dedup set was not loaded for this batch".into(),
            });
        };
        // The dedup set is written last (Commit::then), so if it already holds
        // this record, every other item of the reading holds it too.
        if dedup.item.applied.contains(self.shard, seq) {
            self.stats.replayed_readings += 1;
            return Ok(());
        }
        let mut is_new = false;
        self.touch(&dedup_key, seq, |state| {
            if let ItemState::Empty = state {
                *state = ItemState::Dedup(DedupSet::default());
            }
            match state {
                ItemState::Dedup(set) => {
                    is_new = set.insert(reading.id());
                    Ok(())
                }
                other => Err(mismatch("dedup set", other)),
            }
        })?;
        if !is_new {
            self.stats.duplicate_readings += 1;
            self.count(seq, counters::DUPLICATE.to_string())?;
            return Ok(());
        }
        self.stats.accepted_readings += 1;
        self.count(seq, counters::ACCEPTED.to_string())?;
        let mut late = false;
        for metric in &reading.metrics {
            for &res in &self.cfg.resolutions {
                let start = res.window_start(reading.ts);
                let is_late = r.received_at >= start + res.ms();
                late |= is_late;
                let add = |state: &mut ItemState| -> Result<(), String> {
                    if let ItemState::Empty = state {
                        *state = ItemState::Window(WindowAgg::default());
                    }
                    match state {
                        ItemState::Window(agg) => {
                            agg.add(reading.ts, metric.value, is_late);
                            Ok(())
                        }
                        other => Err(mismatch("window", other)),
                    }
                };
                let device_key = ItemKey::DeviceWindow {
                    device: r.device_id.clone(),
                    metric: metric.name.clone(),
                    res,
                    start,
                };
                self.touch(&device_key, seq, add)?;
                let fleet_key = ItemKey::FleetWindow {
                    fleet: r.fleet.clone(),
                    metric: metric.name.clone(),
                    res,
                    start,
                    part: self.shard.to_string(),
                };
                self.touch(&fleet_key, seq, add)?;
            }
        }
        if late {
            self.stats.late_readings += 1;
        }
        let device_key = ItemKey::Device {
            device: r.device_id.clone(),
        };
        self.touch(&device_key, seq, |state| {
            if let ItemState::Empty = state {
                *state = ItemState::Device(DeviceState {
                    fleet: r.fleet.clone(),
                    ..DeviceState::default()
                });
            }
            match state {
                ItemState::Device(d) => {
                    d.last_seen = d.last_seen.max(r.received_at);
                    d.fleet.clone_from(&r.fleet);
                    for m in &reading.metrics {
                        d.observe(
                            &m.name,
                            schemas::Point {
                                ts: reading.ts,
                                value: m.value,
                            },
                        );
                    }
                    Ok(())
                }
                other => Err(mismatch("device", other)),
            }
        })?;
        let member_key = ItemKey::Member {
            fleet: r.fleet.clone(),
            device: r.device_id.clone(),
        };
        self.touch(&member_key, seq, |state| {
            if let ItemState::Empty = state {
                *state = ItemState::Member(MemberState::default());
            }
            match state {
                ItemState::Member(m) => {
                    m.last_seen = m.last_seen.max(r.received_at);
                    Ok(())
                }
                other => Err(mismatch("fleet member", other)),
            }
        })?;
        Ok(())
    }

    fn reject_reading(
        &mut self,
        seq: SeqNo,
        r: &PackedRecord,
        reading: &Reading,
        index: usize,
        rejection: &Rejection,
    ) -> Result<(), StoreError> {
        if self.count(seq, counters::rejected(rejection.reason))? {
            self.stats.reject(rejection.reason);
        }
        let payload = reading_json(reading);
        self.dead_letter(
            seq,
            index as u32,
            DeadLetter {
                received_at: r.received_at,
                reason: rejection.reason,
                detail: rejection.detail.clone(),
                topic: Some(schemas::Topic::format(&r.fleet, &r.device_id)),
                client_id: None,
                device_id: Some(r.device_id.clone()),
                fleet: Some(r.fleet.clone()),
                payload_len: payload.len() as u64,
                payload_head: payload,
                shard: self.shard.to_string(),
                seq,
            },
        );
        Ok(())
    }

    fn reject_message(&mut self, seq: SeqNo, m: &RejectedMessage) -> Result<(), StoreError> {
        if self.count(seq, counters::rejected(m.reason))? {
            self.stats.reject(m.reason);
        }
        let topic = schemas::Topic::parse(&m.topic).ok();
        self.dead_letter(
            seq,
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
                shard: self.shard.to_string(),
                seq,
            },
        );
        Ok(())
    }

    fn reject_unreadable(
        &mut self,
        seq: SeqNo,
        rejection: &Rejection,
        head: &[u8],
        len: u64,
    ) -> Result<(), StoreError> {
        if self.count(seq, counters::rejected(rejection.reason))? {
            self.stats.reject(rejection.reason);
        }
        self.dead_letter(
            seq,
            0,
            DeadLetter {
                // An unreadable record has no trustworthy time of its own.
                received_at: 0,
                reason: rejection.reason,
                detail: rejection.detail.clone(),
                topic: None,
                client_id: None,
                device_id: None,
                fleet: None,
                payload_head: head.to_vec(),
                payload_len: len,
                shard: self.shard.to_string(),
                seq,
            },
        );
        Ok(())
    }

    fn dead_letter(&mut self, seq: SeqNo, index: u32, letter: DeadLetter) {
        let received_at = letter.received_at;
        self.dead_letters.push(Write {
            key: ItemKey::DeadLetter {
                reason: letter.reason,
                received_at,
                shard: self.shard.to_string(),
                seq,
                index,
            },
            condition: Condition::InsertOnce,
            expires_at: Some(received_at.saturating_add(self.cfg.dead_letter_retention_ms)),
            item: Item {
                applied: Default::default(),
                state: ItemState::DeadLetter(letter),
            },
        });
    }

    fn finish(self) -> Applied {
        let Batcher {
            shard,
            cfg,
            slots,
            dead_letters,
            stats,
        } = self;
        let mut commit = Commit::default();
        for (key, slot) in slots {
            let Some(seq) = slot.touched else { continue };
            let mut item = slot.item;
            item.applied.advance(shard, seq);
            let write = Write {
                expires_at: expiry(&key, cfg),
                condition: slot.version.map_or(Condition::Absent, Condition::Version),
                key,
                item,
            };
            if matches!(write.key, ItemKey::Dedup { .. }) {
                commit.then.push(write);
            } else {
                commit.writes.push(write);
            }
        }
        commit.writes.extend(dead_letters);
        // A stable order makes store access patterns (and tests) repeatable.
        commit.writes.sort_by(|a, b| a.key.cmp(&b.key));
        commit.then.sort_by(|a, b| a.key.cmp(&b.key));
        Applied { commit, stats }
    }
}

fn expiry(key: &ItemKey, cfg: &AggregateConfig) -> Option<i64> {
    match key {
        ItemKey::DeviceWindow { res, start, .. } | ItemKey::FleetWindow { res, start, .. } => {
            let i = cfg.resolutions.iter().position(|r| r == res)?;
            let keep = *cfg.retention_ms.get(i)?;
            Some(start + res.ms() + keep)
        }
        // A duplicate can only be accepted while its window takes readings,
        // and a record can wait in the stream at most the stream's retention.
        ItemKey::Dedup { start, .. } => {
            Some(start + cfg.finest().ms() + cfg.allowed_lateness_ms + cfg.stream_retention_ms)
        }
        _ => None,
    }
}

fn mismatch(expected: &str, found: &ItemState) -> String {
    let found = match found {
        ItemState::Empty => "nothing",
        ItemState::Window(_) => "a window",
        ItemState::Dedup(_) => "a dedup set",
        ItemState::Device(_) => "a device",
        ItemState::Member(_) => "a fleet member",
        ItemState::Counter(_) => "a counter",
        ItemState::DeadLetter(_) => "a dead letter",
    };
    format!("expected a {expected}, found {found}")
}

/// A refused reading as payload v1 JSON, so the dead letter reads like what
/// the device sent.
fn reading_json(reading: &Reading) -> Vec<u8> {
    let metrics: serde_json::Map<String, serde_json::Value> = reading
        .metrics
        .iter()
        .map(|m| (m.name.clone(), serde_json::json!(m.value)))
        .collect();
    let mut obj = serde_json::json!({ "ts": reading.ts, "metrics": metrics });
    if let (Some(seq), Some(map)) = (reading.seq, obj.as_object_mut()) {
        map.insert("seq".into(), serde_json::json!(seq));
    }
    serde_json::to_vec(&obj).unwrap_or_default()
}
