//! The aggregation core: a batch of stream records in, the store writes that
//! fold it into the rollups out. No I/O and no clock.
//!
//! A batch goes through pure steps around up to three loads from the store:
//!
//! 1. [`plan`] decodes the records, judges each reading's lateness against its
//!    `received_at`, and lists the items the batch touches: each device's span
//!    items, the fleet windows, the shard's counters and watermark.
//! 2. The shell loads [`Plan::keys`] and hands them back with
//!    [`Plan::receive`], which lists the next round, until none is left:
//!    after the first, the device items and fleet entries of devices that
//!    start a span (the shard's processed watermark, read in the first round,
//!    also refuses readings whose window it has made final); after those,
//!    what compacting each coarser window that can no longer change needs.
//! 3. [`apply`] folds every reading into its items and returns a [`Commit`]
//!    of conditional writes.
//!
//! **Where a reading goes.** A device's readings live in *span* items (a run
//! of finest windows, every metric, and the identities of the span's
//! readings), so a reading of a quiet device costs one item write. A device's
//! coarser windows are not written per reading: the query API merges them
//! from spans while they can still change, and the device's first batch
//! after they cannot (their end plus the allowed lateness is at or below the
//! shard's processed watermark) compacts each into one item, once. Fleet
//! windows are written per batch and shard, amortised over the batch's
//! devices.
//!
//! Exactly-once effect comes from two marks kept in the store next to the
//! rollups, never in the process:
//!
//! - every item records, per shard, the highest stream sequence number folded
//!   into it (`applied`): a replayed record is skipped item by item;
//! - every span keeps the identities of its readings (`DedupSet`): a reading
//!   delivered twice, in any order, counts once.
//!
//! Fleet windows pre-aggregate: readings first fold into *cells* (one per
//! fleet, metric and finest window), and each cell is merged once into each
//! of its windows. Names are interned to small integers while a batch is
//! planned, so the inner loops hash integers, not strings. When a batch is a
//! replay (some loaded item already holds part of it), cells are merged after
//! every record so that each item skips exactly the records it holds.

#[cfg(test)]
mod tests;

use rustc_hash::FxHashMap;
use schemas::record::{PackedView, ReadingView, RecordView, RejectedMessage};
use schemas::shard::Record;
use schemas::state::{DeadLetter, DeviceState, Item, ItemState, MemberState, SpanState};
use schemas::{RejectReason, Rejection, SeqNo, WindowAgg, decode_record_view};

use crate::commit::{Commit, Condition, Stored, Write};
use crate::config::AggregateConfig;
use crate::keys::{ItemKey, counters};
use crate::span;

/// Strings of a batch, interned so that keys are small integers.
#[derive(Debug, Default)]
struct Names {
    list: Vec<String>,
    index: FxHashMap<String, u32>,
}

impl Names {
    fn id(&mut self, name: &str) -> u32 {
        if let Some(id) = self.index.get(name) {
            return *id;
        }
        let id = self.list.len() as u32;
        self.list.push(name.to_string());
        self.index.insert(name.to_string(), id);
        id
    }

    fn name(&self, id: u32) -> &str {
        &self.list[id as usize]
    }
}

/// An item of the batch, by interned names: cheap to hash and copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    Span {
        dev: u32,
        start: i64,
    },
    DeviceWindow {
        dev: u32,
        res: u8,
        start: i64,
    },
    FleetWindow {
        fleet: u32,
        metric: u32,
        res: u8,
        start: i64,
    },
    Device {
        dev: u32,
    },
    Member {
        fleet: u32,
        dev: u32,
    },
    Counter(Counter),
    Watermark,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Counter {
    Accepted,
    Duplicate,
    Rejected(RejectReason),
}

impl Counter {
    fn name(self) -> String {
        match self {
            Counter::Accepted => counters::ACCEPTED.to_string(),
            Counter::Duplicate => counters::DUPLICATE.to_string(),
            Counter::Rejected(r) => counters::rejected(r),
        }
    }
}

/// A fleet, metric and finest window: where readings pre-aggregate for the
/// fleet's windows.
type CellKey = (u32, u32, i64);

/// Slots of the items every batch touches: `plan` adds them first.
const ACCEPTED_SLOT: u32 = 0;
const DUPLICATE_SLOT: u32 = 1;
const TOO_LATE_SLOT: u32 = 2;
const WATERMARK_SLOT: u32 = 3;

/// A coarser window of one device to compact in this batch.
#[derive(Debug)]
struct Compaction {
    dev: u32,
    res_ms: i64,
    start: i64,
    /// The slots of every span the window covers.
    spans: Vec<u32>,
    /// The slot of the compacted item; `None` for a unit that is not a
    /// stored resolution (the span itself, when there is one resolution).
    out: Option<u32>,
}

/// A decoded batch and the keys it may touch.
#[derive(Debug)]
pub struct Plan<'a> {
    shard: String,
    records: Vec<Decoded<'a>>,
    devices: Names,
    fleets: Names,
    metrics: Names,
    /// Every item the batch may touch, in the order `keys` lists them.
    slot_of: FxHashMap<Key, u32>,
    key_list: Vec<Key>,
    keys: Vec<ItemKey>,
    /// The config's resolutions; a `Key` names one by its index.
    resolutions: Vec<schemas::Resolution>,
    /// Cells in first-seen order, and for each its fleet window slots, one
    /// per resolution.
    cells: Vec<CellKey>,
    cell_windows: Vec<u32>,
    /// Per device with accepted readings, its fleet, in first-seen order.
    devices_seen: Vec<(u32, u32)>,
    /// Devices whose item is loaded (they start a span, or the batch is a
    /// replay for them), and its slot.
    device_slots: Vec<(u32, u32)>,
    /// The earliest `received_at` of the batch's records.
    min_received: Option<i64>,
    /// Every item loaded so far, in the order of `keys`.
    loaded: Vec<Option<Stored>>,
    /// Rounds received so far.
    rounds: u8,
    /// What the batch's records prove has been applied (see
    /// [`AggregateConfig::watermark_slack_ms`]).
    watermark: i64,
    /// The watermark as loaded; the batch writes it only if it advanced.
    loaded_watermark: Option<i64>,
    compactions: Vec<Compaction>,
    /// Devices that start a span in this batch, and their member slot.
    members: Vec<(u32, u32)>,
}

impl Plan<'_> {
    /// The items to load next and hand to [`Plan::receive`]; none once the
    /// plan is ready for [`apply`].
    pub fn keys(&self) -> &[ItemKey] {
        &self.keys[self.loaded.len()..]
    }

    /// Sequence number of the last record in the batch.
    pub fn last_seq(&self) -> Option<SeqNo> {
        self.records.last().map(|r| r.seq)
    }

    fn add_key(&mut self, key: Key) -> u32 {
        let next = self.key_list.len() as u32;
        let slot = *self.slot_of.entry(key).or_insert(next);
        if slot == next {
            self.key_list.push(key);
        }
        slot
    }

    fn item_key(&self, key: Key) -> ItemKey {
        match key {
            Key::Span { dev, start } => ItemKey::Span {
                device: self.devices.name(dev).to_string(),
                start,
            },
            Key::DeviceWindow { dev, res, start } => ItemKey::DeviceWindow {
                device: self.devices.name(dev).to_string(),
                res: self.resolution(res),
                start,
            },
            Key::FleetWindow {
                fleet,
                metric,
                res,
                start,
            } => ItemKey::FleetWindow {
                fleet: self.fleets.name(fleet).to_string(),
                metric: self.metrics.name(metric).to_string(),
                res: self.resolution(res),
                start,
                part: self.shard.clone(),
            },
            Key::Device { dev } => ItemKey::Device {
                device: self.devices.name(dev).to_string(),
            },
            Key::Member { fleet, dev } => ItemKey::Member {
                fleet: self.fleets.name(fleet).to_string(),
                device: self.devices.name(dev).to_string(),
            },
            Key::Counter(c) => ItemKey::Counter {
                shard: self.shard.clone(),
                name: c.name(),
            },
            Key::Watermark => ItemKey::Watermark {
                shard: self.shard.clone(),
            },
        }
    }

    fn resolution(&self, index: u8) -> schemas::Resolution {
        self.resolutions[index as usize]
    }

    /// Adds keys after the first round and lists them.
    fn extend_keys(&mut self, from: usize) {
        let more: Vec<ItemKey> = self.key_list[from..]
            .iter()
            .map(|k| self.item_key(*k))
            .collect();
        self.keys.extend(more);
    }
}

#[derive(Debug)]
struct Decoded<'a> {
    seq: SeqNo,
    body: Body<'a>,
}

#[derive(Debug)]
enum Body<'a> {
    Readings {
        record: PackedView<'a>,
        dev: u32,
        /// Per reading, its span's slot (meaningless if it is refused).
        spans: Vec<u32>,
        /// Per metric of every reading, in order: its cell.
        cell_ids: Vec<u32>,
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
pub fn plan<'a>(shard: &str, records: &'a [Record], cfg: &AggregateConfig) -> Plan<'a> {
    let finest = cfg.finest();
    let mut p = Plan {
        shard: shard.to_string(),
        records: Vec::with_capacity(records.len()),
        devices: Names::default(),
        fleets: Names::default(),
        metrics: Names::default(),
        slot_of: FxHashMap::default(),
        key_list: Vec::new(),
        keys: Vec::new(),
        resolutions: cfg.resolutions.clone(),
        cells: Vec::new(),
        cell_windows: Vec::new(),
        devices_seen: Vec::new(),
        device_slots: Vec::new(),
        min_received: None,
        loaded: Vec::new(),
        rounds: 0,
        watermark: i64::MIN,
        loaded_watermark: None,
        compactions: Vec::new(),
        members: Vec::new(),
    };
    let mut seen_devices = rustc_hash::FxHashSet::default();
    let mut cell_index: FxHashMap<CellKey, u32> = FxHashMap::default();
    p.add_key(Key::Counter(Counter::Accepted));
    p.add_key(Key::Counter(Counter::Duplicate));
    // A reading may yet be refused as too late once the watermark is loaded.
    p.add_key(Key::Counter(Counter::Rejected(RejectReason::TooLate)));
    p.add_key(Key::Watermark);
    for r in records {
        let body = match decode_record_view(&r.data) {
            Ok(RecordView::Readings(record)) => {
                p.min_received = Some(
                    p.min_received
                        .map_or(record.received_at, |m| m.min(record.received_at)),
                );
                let dev = p.devices.id(&record.device_id);
                let fleet = p.fleets.id(&record.fleet);
                let mut spans = Vec::with_capacity(record.readings.len());
                let mut cell_ids = Vec::with_capacity(record.readings.len() * 2);
                let mut verdicts = Vec::with_capacity(record.readings.len());
                let mut any = false;
                for reading in &record.readings {
                    let verdict = judge(reading, record.received_at, cfg);
                    match &verdict {
                        Some(rejection) => {
                            p.add_key(Key::Counter(Counter::Rejected(rejection.reason)));
                            spans.push(u32::MAX);
                            cell_ids.extend(reading.metrics.iter().map(|_| u32::MAX));
                        }
                        None => {
                            any = true;
                            let start = finest.window_start(reading.ts);
                            spans.push(p.add_key(Key::Span {
                                dev,
                                start: cfg.span_start(reading.ts),
                            }));
                            for m in &reading.metrics {
                                let metric = p.metrics.id(&m.name);
                                let key = (fleet, metric, start);
                                let next = p.cells.len() as u32;
                                let id = *cell_index.entry(key).or_insert(next);
                                if id == next {
                                    p.cells.push(key);
                                }
                                cell_ids.push(id);
                            }
                        }
                    }
                    verdicts.push(verdict);
                }
                if any && seen_devices.insert(dev) {
                    p.devices_seen.push((dev, fleet));
                }
                Body::Readings {
                    record,
                    dev,
                    spans,
                    cell_ids,
                    verdicts,
                }
            }
            Ok(RecordView::Rejected(message)) => {
                p.add_key(Key::Counter(Counter::Rejected(message.reason)));
                Body::Rejected(message)
            }
            Err(rejection) => {
                p.add_key(Key::Counter(Counter::Rejected(rejection.reason)));
                Body::Unreadable {
                    rejection,
                    head: r.data[..r.data.len().min(schemas::record::REJECTED_PAYLOAD_KEEP)]
                        .to_vec(),
                    len: r.data.len() as u64,
                }
            }
        };
        p.records.push(Decoded { seq: r.seq, body });
    }
    let cells = std::mem::take(&mut p.cells);
    let mut cell_windows = Vec::with_capacity(cells.len() * cfg.resolutions.len());
    for &(fleet, metric, start) in &cells {
        for (i, res) in cfg.resolutions.iter().enumerate() {
            cell_windows.push(p.add_key(Key::FleetWindow {
                fleet,
                metric,
                res: i as u8,
                start: res.window_start(start),
            }));
        }
    }
    p.cells = cells;
    p.cell_windows = cell_windows;
    p.keys = p.key_list.iter().map(|k| p.item_key(*k)).collect();
    p
}

impl<'a> Plan<'a> {
    /// Takes the items of the last [`Plan::keys`], in order, and lists the
    /// next round's, if any.
    pub fn receive(
        &mut self,
        loaded: Vec<Option<Stored>>,
        cfg: &AggregateConfig,
    ) -> Result<(), ApplyError> {
        let wanted = self.keys().len();
        if loaded.len() != wanted {
            return Err(ApplyError::LoadedCount {
                loaded: loaded.len(),
                keys: wanted,
            });
        }
        self.loaded.extend(loaded);
        while self.keys().is_empty() && self.rounds < 2 {
            let from = self.keys.len();
            match self.rounds {
                0 => self.after_first_round(cfg)?,
                _ => self.plan_compactions(cfg)?,
            }
            self.rounds += 1;
            self.extend_keys(from);
        }
        Ok(())
    }

    /// Reads the watermark, refuses what it has made final, and lists the
    /// device items (and fleet entries) of devices that start a span.
    fn after_first_round(&mut self, cfg: &AggregateConfig) -> Result<(), ApplyError> {
        self.loaded_watermark = match self.loaded[WATERMARK_SLOT as usize]
            .as_ref()
            .map(|s| &s.item.state)
        {
            None | Some(ItemState::Empty) => None,
            Some(ItemState::Watermark(w)) => Some(*w),
            Some(other) => return Err(self.unreadable(WATERMARK_SLOT, "watermark", other)),
        };
        let from_records = self
            .min_received
            .map(|m| m.saturating_sub(cfg.watermark_slack_ms));
        self.watermark = self.loaded_watermark.max(from_records).unwrap_or(i64::MIN);
        self.refuse_final(self.watermark, cfg);
        let (new_span, replayed) = self.devices_to_load();
        for (dev, fleet) in self.devices_seen.clone() {
            if new_span.contains(&dev) || replayed.contains(&dev) {
                let slot = self.add_key(Key::Device { dev });
                self.device_slots.push((dev, slot));
            }
            if new_span.contains(&dev) {
                let slot = self.add_key(Key::Member { fleet, dev });
                self.members.push((dev, slot));
            }
        }
        Ok(())
    }

    /// Lists, for each loaded device item, the spans of every pending window
    /// that can no longer change, and its compacted item.
    fn plan_compactions(&mut self, cfg: &AggregateConfig) -> Result<(), ApplyError> {
        for (dev, slot) in self.device_slots.clone() {
            let pending = match self.loaded[slot as usize].as_ref().map(|s| &s.item.state) {
                None | Some(ItemState::Empty) => Vec::new(),
                Some(ItemState::Device(d)) => d.pending.clone(),
                Some(other) => return Err(self.unreadable(slot, "device", other)),
            };
            for (res_ms, start) in pending {
                if !cfg.is_final(start.saturating_add(res_ms), self.watermark) {
                    continue;
                }
                let spans = cfg
                    .spans_of(res_ms, start)
                    .map(|start| self.add_key(Key::Span { dev, start }))
                    .collect();
                let out = cfg
                    .resolutions
                    .iter()
                    .position(|r| r.ms() == res_ms)
                    .filter(|i| *i > 0)
                    .map(|i| {
                        self.add_key(Key::DeviceWindow {
                            dev,
                            res: i as u8,
                            start,
                        })
                    });
                self.compactions.push(Compaction {
                    dev,
                    res_ms,
                    start,
                    spans,
                    out,
                });
            }
        }
        Ok(())
    }

    /// A reading whose window is final by the watermark is refused: a
    /// compacted window must never change. Only a record that reached the
    /// stream further out of arrival order than the watermark's slack can
    /// meet this; one that did not is already too late by its own
    /// `received_at`, so a replay decides the same.
    fn refuse_final(&mut self, watermark: i64, cfg: &AggregateConfig) {
        let finest = cfg.finest();
        for record in &mut self.records {
            let Body::Readings {
                record: r,
                verdicts,
                ..
            } = &mut record.body
            else {
                continue;
            };
            for (reading, verdict) in r.readings.iter().zip(verdicts.iter_mut()) {
                let end = finest.window_start(reading.ts) + finest.ms();
                if verdict.is_none() && cfg.is_final(end, watermark) {
                    *verdict = Some(Rejection::new(
                        RejectReason::TooLate,
                        format!(
                            "window ending {end} was already final: every record that arrived up to {watermark} had been applied (allowed lateness {} ms)",
                            cfg.allowed_lateness_ms
                        ),
                    ));
                }
            }
        }
    }

    /// Devices with an accepted reading in a span not stored yet, and
    /// devices whose spans already hold a record of this batch (a replay:
    /// their device item may have missed what the span holds). A device
    /// whose spans all exist and hold none of the batch has every window
    /// of the batch pending already, so its item is neither read nor
    /// written.
    fn devices_to_load(&self) -> (rustc_hash::FxHashSet<u32>, rustc_hash::FxHashSet<u32>) {
        let mut new_span = rustc_hash::FxHashSet::default();
        let mut replayed = rustc_hash::FxHashSet::default();
        for record in &self.records {
            let Body::Readings {
                dev,
                spans,
                verdicts,
                ..
            } = &record.body
            else {
                continue;
            };
            for (span, v) in spans.iter().zip(verdicts) {
                if v.is_some() {
                    continue;
                }
                match &self.loaded[*span as usize] {
                    None => {
                        new_span.insert(*dev);
                    }
                    Some(s) if s.item.applied.contains(&self.shard, record.seq) => {
                        replayed.insert(*dev);
                    }
                    Some(_) => {}
                }
            }
        }
        (new_span, replayed)
    }

    fn unreadable(&self, slot: u32, expected: &str, found: &ItemState) -> ApplyError {
        let key = &self.keys[slot as usize];
        ApplyError::Unreadable {
            key: format!("{}/{}", key.pk(), key.sk()),
            detail: mismatch(expected, found),
        }
    }
}

/// Plans, loads both rounds through `load` and applies: the whole core for
/// a caller whose store answers at once (tests, examples, benchmarks).
pub fn fold(
    shard: &str,
    records: &[Record],
    cfg: &AggregateConfig,
    mut load: impl FnMut(&[ItemKey]) -> Vec<Option<Stored>>,
) -> Result<Applied, ApplyError> {
    let mut p = plan(shard, records, cfg);
    while !p.keys().is_empty() {
        let loaded = load(p.keys());
        p.receive(loaded, cfg)?;
    }
    apply(p, cfg)
}

/// The watermark write of a shard that has nothing to read at `now`: every
/// record it will still deliver arrives after `now` less the slack, so
/// nothing below that can change through it. Without this an idle shard
/// would hold every fleet window short of final. `None` if it would not
/// move the watermark.
pub fn idle_watermark(
    shard: &str,
    loaded: Option<Stored>,
    now: i64,
    cfg: &AggregateConfig,
) -> Result<Option<Write>, ApplyError> {
    let claim = now.saturating_sub(cfg.watermark_slack_ms);
    let (condition, mut item) = match loaded {
        Some(s) => (Condition::Version(s.version), s.item),
        None => (Condition::Absent, Item::default()),
    };
    match item.state {
        ItemState::Empty => {}
        ItemState::Watermark(w) if w < claim => {}
        ItemState::Watermark(_) => return Ok(None),
        ref other => {
            return Err(ApplyError::Unreadable {
                key: format!("{}/{shard}", crate::keys::WATERMARK_PK),
                detail: mismatch("watermark", other),
            });
        }
    }
    item.state = ItemState::Watermark(claim);
    Ok(Some(Write {
        key: ItemKey::Watermark {
            shard: shard.to_string(),
        },
        condition,
        item,
        expires_at: None,
    }))
}

/// Lateness is judged against `received_at`, stamped once at ingest, so a
/// replayed batch decides exactly as the first attempt did.
fn judge(reading: &ReadingView, received_at: i64, cfg: &AggregateConfig) -> Option<Rejection> {
    let finest = cfg.finest();
    let end = finest.window_start(reading.ts) + finest.ms();
    let reason = cfg.lateness().refusal(reading.ts, end, received_at)?;
    let detail = match reason {
        RejectReason::InFuture => format!(
            "ts {} is {} ms after the reading was received (limit {} ms)",
            reading.ts,
            reading.ts - received_at,
            cfg.future_tolerance_ms
        ),
        _ => format!(
            "window ending {end} was final {} ms before the reading was received (allowed lateness {} ms)",
            received_at - end - cfg.allowed_lateness_ms,
            cfg.allowed_lateness_ms
        ),
    };
    Some(Rejection::new(reason, detail))
}

/// Why [`apply`] refused a batch. None of these heals by retrying: the shell
/// stops the shard loudly rather than skip readings silently.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// A loaded item holds another kind of state than its key names: the
    /// store holds something this build cannot read.
    #[error("stored item {key} is unreadable: {detail}")]
    Unreadable { key: String, detail: String },
    /// The shell loaded a different number of items than the plan listed.
    #[error("{loaded} items loaded for {keys} planned keys")]
    LoadedCount { loaded: usize, keys: usize },
    /// The batch touched an item `plan` did not list: a bug in the core, and
    /// refusing the batch is safer than writing blind.
    #[error("item {key} was not planned for this batch")]
    Unplanned { key: String },
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
    /// `item.applied` for this batch's shard, looked up once.
    applied_here: Option<SeqNo>,
    /// The highest record of this batch folded in, if any.
    touched: Option<SeqNo>,
}

impl Slot {
    fn holds(&self, seq: SeqNo) -> bool {
        self.applied_here.is_some_and(|a| seq <= a)
    }
}

/// Readings of one fleet, device, metric and finest window, before they are
/// merged into that window and every coarser one.
struct Cell {
    agg: WindowAgg,
    /// The last record folded in, which the windows will be marked with.
    seq: SeqNo,
    /// `received_at` of readings late in the finest window: they may be late
    /// in coarser windows too, depending on each window's end.
    late: Vec<i64>,
}

/// Folds the planned batch into its items, once every round is loaded.
pub fn apply(mut plan: Plan<'_>, cfg: &AggregateConfig) -> Result<Applied, ApplyError> {
    if plan.rounds < 2 || !plan.keys().is_empty() {
        return Err(ApplyError::LoadedCount {
            loaded: plan.loaded.len(),
            keys: plan.keys.len(),
        });
    }
    let loaded = std::mem::take(&mut plan.loaded);
    let compactions = std::mem::take(&mut plan.compactions);
    let members = std::mem::take(&mut plan.members);
    let (watermark, loaded_watermark) = (plan.watermark, plan.loaded_watermark);
    let shard = plan.shard.clone();
    let mut slots: Vec<Slot> = loaded
        .into_iter()
        .map(|stored| {
            let (version, item) = match stored {
                Some(s) => (Some(s.version), s.item),
                None => (None, Item::default()),
            };
            Slot {
                applied_here: item.applied.get(&shard),
                version,
                item,
                touched: None,
            }
        })
        .collect();
    let first_seq = plan.records.first().map_or(SeqNo::ZERO, |r| r.seq);
    let last_seq = plan.records.last().map_or(SeqNo::ZERO, |r| r.seq);
    // A replay: some item already holds part of this batch. Then cells are
    // merged record by record, so every item skips exactly what it holds.
    let replay = slots.iter().any(|s| s.holds(first_seq));
    let mut b = Batcher {
        plan: &plan,
        cfg,
        slots: &mut slots,
        cells: (0..plan.cells.len()).map(|_| None).collect(),
        active: Vec::new(),
        dead_letters: Vec::new(),
        stats: BatchStats::default(),
        device_slot: plan.device_slots.iter().copied().collect(),
        seen: FxHashMap::default(),
        units: cfg.pending_units(),
    };
    for record in &plan.records {
        b.stats.records += 1;
        match &record.body {
            Body::Readings {
                record: r,
                dev,
                spans,
                cell_ids,
                verdicts,
                ..
            } => {
                let mut ids = &cell_ids[..];
                for (index, ((reading, verdict), span)) in
                    r.readings.iter().zip(verdicts).zip(spans).enumerate()
                {
                    let (these, rest) = ids.split_at(reading.metrics.len());
                    ids = rest;
                    match verdict {
                        Some(rejection) => {
                            b.reject_reading(record.seq, r, reading, index, rejection)?
                        }
                        None => b.accept(record.seq, r, reading, *dev, *span, these)?,
                    }
                }
            }
            Body::Rejected(m) => b.reject_message(record.seq, m)?,
            Body::Unreadable {
                rejection,
                head,
                len,
            } => b.reject_unreadable(record.seq, rejection, head, *len)?,
        }
        if replay {
            b.flush_cells()?;
        }
    }
    b.flush_cells()?;
    for c in &compactions {
        b.compact(c, last_seq)?;
    }
    for (dev, slot) in members {
        b.member(dev, slot as usize)?;
    }
    if loaded_watermark.is_none_or(|w| w < watermark) && !plan.records.is_empty() {
        b.touch(WATERMARK_SLOT as usize, last_seq, |state| {
            *state = ItemState::Watermark(watermark);
            Ok(())
        })?;
    }
    let Batcher {
        dead_letters,
        stats,
        ..
    } = b;
    Ok(finish(plan, slots, dead_letters, stats, cfg))
}

struct Batcher<'a, 'r> {
    plan: &'a Plan<'r>,
    cfg: &'a AggregateConfig,
    slots: &'a mut Vec<Slot>,
    /// Indexed like `plan.cells`; `Some` while a cell holds readings.
    cells: Vec<Option<Cell>>,
    /// Cells holding readings, in the order they were first filled.
    active: Vec<u32>,
    dead_letters: Vec<Write>,
    stats: BatchStats,
    /// Each device's item slot.
    device_slot: FxHashMap<u32, u32>,
    /// Per device, the latest arrival and record of its accepted readings.
    seen: FxHashMap<u32, (i64, SeqNo)>,
    /// The windows a device item tracks until compacted, in ms.
    units: Vec<i64>,
}

impl Batcher<'_, '_> {
    /// Runs `f` on the item in slot `i` unless the record at `seq` is already
    /// in it. Returns whether it ran.
    fn touch(
        &mut self,
        i: usize,
        seq: SeqNo,
        f: impl FnOnce(&mut ItemState) -> Result<(), String>,
    ) -> Result<bool, ApplyError> {
        let slot = &mut self.slots[i];
        if slot.holds(seq) {
            return Ok(false);
        }
        f(&mut slot.item.state).map_err(|detail| ApplyError::Unreadable {
            key: format!("{}/{}", self.plan.keys[i].pk(), self.plan.keys[i].sk()),
            detail,
        })?;
        slot.touched = Some(slot.touched.map_or(seq, |t| t.max(seq)));
        Ok(true)
    }

    fn count(&mut self, seq: SeqNo, counter: Counter) -> Result<bool, ApplyError> {
        let i = match counter {
            Counter::Accepted => ACCEPTED_SLOT,
            Counter::Duplicate => DUPLICATE_SLOT,
            Counter::Rejected(RejectReason::TooLate) => TOO_LATE_SLOT,
            other => match self.plan.slot_of.get(&Key::Counter(other)) {
                Some(i) => *i,
                // plan() lists every counter apply() touches; a miss is a bug.
                None => {
                    return Err(ApplyError::Unplanned {
                        key: format!("{other:?}"),
                    });
                }
            },
        };
        self.touch(i as usize, seq, |state| {
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
        r: &PackedView,
        reading: &ReadingView,
        dev: u32,
        span: u32,
        cell_ids: &[u32],
    ) -> Result<(), ApplyError> {
        let span = span as usize;
        // The span is written after the windows (Commit::then), so if it
        // already holds this record, every window holds it too. The device
        // item is written beside it and may have missed it in a crash: it
        // checks its own mark.
        if self.slots[span].holds(seq) {
            self.stats.replayed_readings += 1;
            self.saw(dev, r.received_at, seq);
            return self.track_pending(seq, r, reading.ts, dev);
        }
        let finest = self.cfg.finest();
        let fine_start = finest.window_start(reading.ts);
        let late = r.received_at >= fine_start + finest.ms();
        let mut is_new = false;
        self.touch(span, seq, |state| {
            if let ItemState::Empty = state {
                *state = ItemState::Span(SpanState::default());
            }
            let ItemState::Span(s) = state else {
                return Err(mismatch("span", state));
            };
            is_new = s.dedup.insert(reading.id());
            if !is_new {
                return Ok(());
            }
            s.last_seen = s.last_seen.max(r.received_at);
            if s.fleet != r.fleet {
                s.fleet = r.fleet.to_string();
            }
            for m in &reading.metrics {
                let w = s.window_mut(fine_start, &m.name);
                w.agg.add(reading.ts, m.value, late);
                if late {
                    w.late_at.push(r.received_at);
                }
            }
            Ok(())
        })?;
        if !is_new {
            self.stats.duplicate_readings += 1;
            self.count(seq, Counter::Duplicate)?;
            return Ok(());
        }
        self.stats.accepted_readings += 1;
        self.count(seq, Counter::Accepted)?;
        if late {
            self.stats.late_readings += 1;
        }
        for (m, &cell_id) in reading.metrics.iter().zip(cell_ids) {
            let cell = &mut self.cells[cell_id as usize];
            let cell = match cell {
                Some(c) => c,
                None => {
                    self.active.push(cell_id);
                    cell.insert(Cell {
                        agg: WindowAgg::default(),
                        seq,
                        late: Vec::new(),
                    })
                }
            };
            cell.seq = cell.seq.max(seq);
            cell.agg.add(reading.ts, m.value, late);
            if late {
                cell.late.push(r.received_at);
            }
        }
        self.saw(dev, r.received_at, seq);
        self.track_pending(seq, r, reading.ts, dev)
    }

    fn saw(&mut self, dev: u32, received_at: i64, seq: SeqNo) {
        let seen = self.seen.entry(dev).or_insert((received_at, seq));
        *seen = (seen.0.max(received_at), seen.1.max(seq));
    }

    /// Records in the device item each coarser window the reading enters,
    /// so that it is compacted once it can no longer change. Written only
    /// when the reading is the device's first in that window, which can
    /// only happen in a span new to this batch.
    fn track_pending(
        &mut self,
        seq: SeqNo,
        r: &PackedView,
        ts: i64,
        dev: u32,
    ) -> Result<(), ApplyError> {
        // Not loaded: the reading's span existed before this batch, so its
        // windows are pending already (see `devices_to_load`).
        let Some(&slot) = self.device_slot.get(&dev) else {
            return Ok(());
        };
        let slot = slot as usize;
        let wanted: Vec<(i64, i64)> = self
            .units
            .iter()
            .map(|u| (*u, ts.div_euclid(*u) * u))
            .collect();
        let known = match &self.slots[slot].item.state {
            ItemState::Device(d) => {
                d.shard == self.plan.shard
                    && d.fleet == r.fleet
                    && wanted.iter().all(|w| d.pending.binary_search(w).is_ok())
            }
            _ => false,
        };
        if known {
            return Ok(());
        }
        let shard = &self.plan.shard;
        self.touch(slot, seq, |state| {
            if let ItemState::Empty = state {
                *state = ItemState::Device(DeviceState::default());
            }
            let ItemState::Device(d) = state else {
                return Err(mismatch("device", state));
            };
            if d.shard != *shard {
                d.shard = shard.clone();
            }
            if d.fleet != r.fleet {
                d.fleet = r.fleet.to_string();
            }
            for w in wanted {
                if let Err(i) = d.pending.binary_search(&w) {
                    d.pending.insert(i, w);
                }
            }
            Ok(())
        })?;
        Ok(())
    }

    /// Writes a device's coarser window that can no longer change, once, and
    /// moves what its spans say about the device's latest values into the
    /// device item.
    fn compact(&mut self, c: &Compaction, seq: SeqNo) -> Result<(), ApplyError> {
        let mut spans = Vec::with_capacity(c.spans.len());
        for &slot in &c.spans {
            match &self.slots[slot as usize].item.state {
                ItemState::Empty => {}
                ItemState::Span(s) => spans.push(s.clone()),
                other => {
                    return Err(ApplyError::Unreadable {
                        key: self.key_name(slot as usize),
                        detail: mismatch("span", other),
                    });
                }
            }
        }
        let windows = span::coarse_window(c.res_ms, c.start, &spans);
        if let Some(out) = c.out
            && !windows.metrics.is_empty()
        {
            let compacted = windows.clone();
            self.touch(out as usize, seq, |state| {
                *state = ItemState::Windows(compacted);
                Ok(())
            })?;
        }
        let Some(&slot) = self.device_slot.get(&c.dev) else {
            return Err(ApplyError::Unplanned {
                key: format!("device {}", c.dev),
            });
        };
        let key = (c.res_ms, c.start);
        self.touch(slot as usize, seq, |state| {
            let ItemState::Device(d) = state else {
                return Err(mismatch("device", state));
            };
            span::settle(d, key, &spans, &windows);
            Ok(())
        })?;
        Ok(())
    }

    /// Lists a device in its fleet when it starts a span: often enough for
    /// the list's `last_seen`, rarely enough not to cost a write per reading.
    fn member(&mut self, dev: u32, slot: usize) -> Result<(), ApplyError> {
        let Some(&(received_at, seq)) = self.seen.get(&dev) else {
            return Ok(());
        };
        self.touch(slot, seq, |state| {
            if let ItemState::Empty = state {
                *state = ItemState::Member(MemberState::default());
            }
            match state {
                ItemState::Member(m) => {
                    m.last_seen = m.last_seen.max(received_at);
                    Ok(())
                }
                other => Err(mismatch("fleet member", other)),
            }
        })?;
        Ok(())
    }

    fn key_name(&self, i: usize) -> String {
        format!("{}/{}", self.plan.keys[i].pk(), self.plan.keys[i].sk())
    }

    /// Merges every cell into its fleet windows at every resolution,
    /// skipping items that already hold the cell's records. In a replay cells
    /// are flushed after every record, so a cell never spans a record an item
    /// holds and one it does not.
    fn flush_cells(&mut self) -> Result<(), ApplyError> {
        let resolutions = &self.cfg.resolutions;
        let per_cell = resolutions.len();
        for cell_id in std::mem::take(&mut self.active) {
            let Some(cell) = self.cells[cell_id as usize].take() else {
                continue;
            };
            let fine_start = self.plan.cells[cell_id as usize].2;
            let windows = &self.plan.cell_windows
                [cell_id as usize * per_cell..(cell_id as usize + 1) * per_cell];
            let seq = cell.seq;
            let fine_late = cell.agg.late_count;
            for (i, res) in resolutions.iter().enumerate() {
                let end = res.window_start(fine_start) + res.ms();
                let late = if i == 0 {
                    fine_late
                } else {
                    cell.late.iter().filter(|recv| **recv >= end).count() as u64
                };
                self.touch(windows[i] as usize, seq, |state| {
                    if let ItemState::Empty = state {
                        *state = ItemState::Window(WindowAgg::default());
                    }
                    match state {
                        ItemState::Window(agg) => {
                            agg.merge(&cell.agg);
                            // The cell counted lateness against the finest
                            // window's end; this window ends later.
                            agg.late_count = agg.late_count - fine_late + late;
                            agg.revision = agg.revision - fine_late + late;
                            Ok(())
                        }
                        other => Err(mismatch("window", other)),
                    }
                })?;
            }
        }
        Ok(())
    }

    fn reject_reading(
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
            seq,
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

    fn reject_message(&mut self, seq: SeqNo, m: &RejectedMessage) -> Result<(), ApplyError> {
        if self.count(seq, Counter::Rejected(m.reason))? {
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
                shard: self.plan.shard.clone(),
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
    ) -> Result<(), ApplyError> {
        if self.count(seq, Counter::Rejected(rejection.reason))? {
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
                shard: self.plan.shard.clone(),
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
                shard: self.plan.shard.clone(),
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
}

fn finish(
    plan: Plan<'_>,
    slots: Vec<Slot>,
    dead_letters: Vec<Write>,
    stats: BatchStats,
    cfg: &AggregateConfig,
) -> Applied {
    let mut commit = Commit::default();
    for (slot, key) in slots.into_iter().zip(plan.keys) {
        let Some(seq) = slot.touched else { continue };
        let mut item = slot.item;
        item.applied.advance(&plan.shard, seq);
        let write = Write {
            expires_at: expiry(&key, cfg),
            condition: slot.version.map_or(Condition::Absent, Condition::Version),
            key,
            item,
        };
        if write.key.is_written_last() {
            commit.then.push(write);
        } else {
            commit.writes.push(write);
        }
    }
    commit.writes.extend(dead_letters);
    Applied { commit, stats }
}

pub(crate) fn expiry(key: &ItemKey, cfg: &AggregateConfig) -> Option<i64> {
    match key {
        ItemKey::DeviceWindow { res, start, .. } | ItemKey::FleetWindow { res, start, .. } => {
            let i = cfg.resolutions.iter().position(|r| r == res)?;
            let keep = *cfg.retention_ms.get(i)?;
            Some(start + res.ms() + keep)
        }
        ItemKey::Span { start, .. } => Some(start + cfg.span_ms() + cfg.span_retention_ms()),
        _ => None,
    }
}

fn mismatch(expected: &str, found: &ItemState) -> String {
    let found = match found {
        ItemState::Empty => "nothing",
        ItemState::Window(_) => "a window",
        ItemState::Span(_) => "a span",
        ItemState::Windows(_) => "a device window",
        ItemState::Device(_) => "a device",
        ItemState::Member(_) => "a fleet member",
        ItemState::Counter(_) => "a counter",
        ItemState::Watermark(_) => "a watermark",
        ItemState::DeadLetter(_) => "a dead letter",
    };
    format!("expected a {expected}, found {found}")
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
