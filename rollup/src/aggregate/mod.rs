//! The aggregation core: a batch of stream records in, the store writes that
//! fold it into the rollups out. No I/O and no clock.
//!
//! A batch goes through two pure steps around the store:
//!
//! 1. [`plan`] decodes the records, judges each reading's lateness against its
//!    `received_at`, and lists the items the batch may touch.
//! 2. The shell loads those items (`processors::store::RollupStore::load`).
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
//!
//! Speed comes from pre-aggregation: readings first fold into *cells* (one
//! per fleet, device, metric and finest window), and each cell is then merged
//! once into each of its windows, so the work per window is per cell, not per
//! reading. Names are interned to small integers while a batch is planned, so
//! the inner loops hash integers, not strings. When a batch is a replay (some
//! loaded item already holds part of it), cells are merged after every record
//! so that each item skips exactly the records it holds.

#[cfg(test)]
mod tests;

use rustc_hash::FxHashMap;
use schemas::record::{PackedView, ReadingView, RecordView, RejectedMessage};
use schemas::shard::Record;
use schemas::state::{DeadLetter, DedupSet, DeviceState, Item, ItemState, MemberState};
use schemas::{Point, RejectReason, Rejection, SeqNo, WindowAgg, decode_record_view};

use crate::commit::{Commit, Condition, Stored, Write};
use crate::config::AggregateConfig;
use crate::keys::{ItemKey, counters};

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
    DeviceWindow {
        dev: u32,
        metric: u32,
        res: u8,
        start: i64,
    },
    FleetWindow {
        fleet: u32,
        metric: u32,
        res: u8,
        start: i64,
    },
    Dedup {
        dev: u32,
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

/// A fleet, device, metric and finest window: where readings pre-aggregate.
type CellKey = (u32, u32, u32, i64);

/// The slots a reading touches besides its windows, found once in `plan`.
#[derive(Debug, Clone, Copy, Default)]
struct ReadingSlots {
    dedup: u32,
    device: u32,
    member: u32,
}

/// Slots of the two counters every batch touches: `plan` adds them first.
const ACCEPTED_SLOT: u32 = 0;
const DUPLICATE_SLOT: u32 = 1;

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
    /// Cells in first-seen order, and for each its window slots: device then
    /// fleet, per resolution (`2 × resolutions` entries per cell).
    cells: Vec<CellKey>,
    cell_windows: Vec<u32>,
}

impl Plan<'_> {
    /// The items to load before [`apply`].
    pub fn keys(&self) -> &[ItemKey] {
        &self.keys
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
            Key::DeviceWindow {
                dev,
                metric,
                res,
                start,
            } => ItemKey::DeviceWindow {
                device: self.devices.name(dev).to_string(),
                metric: self.metrics.name(metric).to_string(),
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
            Key::Dedup { dev, start } => ItemKey::Dedup {
                device: self.devices.name(dev).to_string(),
                start,
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
        }
    }

    fn resolution(&self, index: u8) -> schemas::Resolution {
        self.resolutions[index as usize]
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
        /// Per reading, its item slots (meaningless if it is refused).
        slots: Vec<ReadingSlots>,
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
    };
    let mut cell_index: FxHashMap<CellKey, u32> = FxHashMap::default();
    p.add_key(Key::Counter(Counter::Accepted));
    p.add_key(Key::Counter(Counter::Duplicate));
    for r in records {
        let body = match decode_record_view(&r.data) {
            Ok(RecordView::Readings(record)) => {
                let dev = p.devices.id(&record.device_id);
                let fleet = p.fleets.id(&record.fleet);
                let mut slots = Vec::with_capacity(record.readings.len());
                let mut cell_ids = Vec::with_capacity(record.readings.len() * 2);
                let mut verdicts = Vec::with_capacity(record.readings.len());
                for reading in &record.readings {
                    let verdict = judge(reading, record.received_at, cfg);
                    match &verdict {
                        Some(rejection) => {
                            p.add_key(Key::Counter(Counter::Rejected(rejection.reason)));
                            slots.push(ReadingSlots::default());
                            cell_ids.extend(reading.metrics.iter().map(|_| u32::MAX));
                        }
                        None => {
                            let start = finest.window_start(reading.ts);
                            slots.push(ReadingSlots {
                                dedup: p.add_key(Key::Dedup { dev, start }),
                                device: p.add_key(Key::Device { dev }),
                                member: p.add_key(Key::Member { fleet, dev }),
                            });
                            for m in &reading.metrics {
                                let metric = p.metrics.id(&m.name);
                                let key = (fleet, dev, metric, start);
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
                Body::Readings {
                    record,
                    slots,
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
    let mut cell_windows = Vec::with_capacity(cells.len() * 2 * cfg.resolutions.len());
    for &(fleet, dev, metric, start) in &cells {
        for (i, res) in cfg.resolutions.iter().enumerate() {
            let start = res.window_start(start);
            let res = i as u8;
            cell_windows.push(p.add_key(Key::DeviceWindow {
                dev,
                metric,
                res,
                start,
            }));
            cell_windows.push(p.add_key(Key::FleetWindow {
                fleet,
                metric,
                res,
                start,
            }));
        }
    }
    p.cells = cells;
    p.cell_windows = cell_windows;
    p.keys = p.key_list.iter().map(|k| p.item_key(*k)).collect();
    p
}

/// Lateness is judged against `received_at`, stamped once at ingest, so a
/// replayed batch decides exactly as the first attempt did.
fn judge(reading: &ReadingView, received_at: i64, cfg: &AggregateConfig) -> Option<Rejection> {
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

/// Folds the planned batch into the loaded items. `loaded` is in the order of
/// [`Plan::keys`].
pub fn apply(
    plan: Plan<'_>,
    loaded: Vec<Option<Stored>>,
    cfg: &AggregateConfig,
) -> Result<Applied, ApplyError> {
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
    if slots.len() != plan.keys.len() {
        return Err(ApplyError::LoadedCount {
            loaded: slots.len(),
            keys: plan.keys.len(),
        });
    }
    let first_seq = plan.records.first().map_or(SeqNo::ZERO, |r| r.seq);
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
    };
    for record in &plan.records {
        b.stats.records += 1;
        match &record.body {
            Body::Readings {
                record: r,
                slots,
                cell_ids,
                verdicts,
            } => {
                let mut ids = &cell_ids[..];
                for (index, ((reading, verdict), slots)) in
                    r.readings.iter().zip(verdicts).zip(slots).enumerate()
                {
                    let (these, rest) = ids.split_at(reading.metrics.len());
                    ids = rest;
                    match verdict {
                        Some(rejection) => {
                            b.reject_reading(record.seq, r, reading, index, rejection)?
                        }
                        None => b.accept(record.seq, r, reading, *slots, these)?,
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
}

impl Batcher<'_, '_> {
    fn slot(&self, key: Key) -> Result<usize, ApplyError> {
        match self.plan.slot_of.get(&key) {
            Some(i) => Ok(*i as usize),
            // plan() lists every key apply() touches; a miss is a bug.
            None => Err(ApplyError::Unplanned {
                key: format!("{key:?}"),
            }),
        }
    }

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
            Counter::Accepted => ACCEPTED_SLOT as usize,
            Counter::Duplicate => DUPLICATE_SLOT as usize,
            other => self.slot(Key::Counter(other))?,
        };
        self.touch(i, seq, |state| {
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
        slots: ReadingSlots,
        cell_ids: &[u32],
    ) -> Result<(), ApplyError> {
        let dedup = slots.dedup as usize;
        // The dedup set is written last (Commit::then), so if it already holds
        // this record, every other item of the reading holds it too.
        if self.slots[dedup].holds(seq) {
            self.stats.replayed_readings += 1;
            return Ok(());
        }
        let mut is_new = false;
        self.touch(dedup, seq, |state| {
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
            self.count(seq, Counter::Duplicate)?;
            return Ok(());
        }
        self.stats.accepted_readings += 1;
        self.count(seq, Counter::Accepted)?;
        let finest = self.cfg.finest();
        let fine_end = finest.window_start(reading.ts) + finest.ms();
        let late = r.received_at >= fine_end;
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
        self.touch(slots.device as usize, seq, |state| {
            if let ItemState::Empty = state {
                *state = ItemState::Device(DeviceState::default());
            }
            match state {
                ItemState::Device(d) => {
                    d.last_seen = d.last_seen.max(r.received_at);
                    if d.fleet != r.fleet {
                        d.fleet = r.fleet.to_string();
                    }
                    for m in &reading.metrics {
                        d.observe(
                            &m.name,
                            Point {
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
        self.touch(slots.member as usize, seq, |state| {
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

    /// Merges every cell into its windows at every resolution, device and
    /// fleet, skipping items that already hold the cell's records. In a
    /// replay cells are flushed after every record, so a cell never spans a
    /// record an item holds and one it does not.
    fn flush_cells(&mut self) -> Result<(), ApplyError> {
        let resolutions = &self.cfg.resolutions;
        let per_cell = 2 * resolutions.len();
        for cell_id in std::mem::take(&mut self.active) {
            let Some(cell) = self.cells[cell_id as usize].take() else {
                continue;
            };
            let fine_start = self.plan.cells[cell_id as usize].3;
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
                for &slot in &windows[2 * i..2 * i + 2] {
                    self.touch(slot as usize, seq, |state| {
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
    for ((slot, key), short) in slots.into_iter().zip(plan.keys).zip(&plan.key_list) {
        let Some(seq) = slot.touched else { continue };
        let mut item = slot.item;
        item.applied.advance(&plan.shard, seq);
        let write = Write {
            expires_at: expiry(&key, cfg),
            condition: slot.version.map_or(Condition::Absent, Condition::Version),
            key,
            item,
        };
        if matches!(short, Key::Dedup { .. }) {
            commit.then.push(write);
        } else {
            commit.writes.push(write);
        }
    }
    commit.writes.extend(dead_letters);
    Applied { commit, stats }
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
