//! The last step: fold every reading into its items as loaded, and hand
//! back the conditional writes.

use rustc_hash::FxHashMap;
use schemas::record::{PackedView, ReadingView};
use schemas::state::{Item, ItemState, SpanState};
use schemas::{RejectReason, SeqNo, WindowAgg};

use super::plan::{Body, Decoded, Plan};
use super::{
    ACCEPTED_SLOT, AppliedBatch, ApplyError, BatchStats, Counter, DUPLICATE_SLOT, Key,
    TOO_LATE_SLOT, WATERMARK_SLOT, mismatch,
};
use crate::commit::{Commit, Condition, LoadedItem, Write};
use crate::config::AggregateConfig;
use crate::keys::ItemKey;

/// A loaded item being changed by the batch.
pub(super) struct Slot {
    /// The version the write is conditional on; `None` if the item is new.
    pub(super) version: Option<u64>,
    pub(super) item: Item,
    /// `item.applied` for this batch's shard, looked up once.
    pub(super) applied_here: Option<SeqNo>,
    /// The highest record of this batch folded in, if any.
    pub(super) touched: Option<SeqNo>,
}

impl Slot {
    pub(super) fn holds(&self, seq: SeqNo) -> bool {
        self.applied_here.is_some_and(|a| seq <= a)
    }
}

/// Readings of one fleet, device, metric and finest window, before they are
/// merged into that window and every coarser one.
pub(super) struct Cell {
    pub(super) agg: WindowAgg,
    /// The last record folded in, which the windows will be marked with.
    pub(super) seq: SeqNo,
    /// `received_at` of readings late in the finest window: they may be late
    /// in coarser windows too, depending on each window's end.
    pub(super) late: Vec<i64>,
}

/// Folds the planned batch into its items, once every round is loaded.
pub fn apply(mut plan: Plan<'_>, config: &AggregateConfig) -> Result<AppliedBatch, ApplyError> {
    if plan.rounds < 2 || !plan.keys().is_empty() {
        return Err(ApplyError::LoadedCount {
            loaded: plan.loaded.len(),
            keys: plan.keys.len(),
        });
    }
    let mut slots = slots(std::mem::take(&mut plan.loaded), &plan.shard);
    let compactions = std::mem::take(&mut plan.compactions);
    let members = std::mem::take(&mut plan.members);
    let last_seq = plan.records.last().map_or(SeqNo::ZERO, |r| r.seq);
    let mut b = Batcher::new(&plan, config, &mut slots);
    b.fold_records()?;
    for c in &compactions {
        b.compact(c, last_seq)?;
    }
    for (dev, slot) in members {
        b.member(dev, slot as usize)?;
    }
    b.advance_watermark(last_seq)?;
    let Batcher {
        dead_letters,
        stats,
        ..
    } = b;
    Ok(finish(plan, slots, dead_letters, stats, config))
}

/// The loaded items, each ready to be changed by the batch.
fn slots(loaded: Vec<Option<LoadedItem>>, shard: &str) -> Vec<Slot> {
    loaded
        .into_iter()
        .map(|stored| {
            let (version, item) = match stored {
                Some(s) => (Some(s.version), s.item),
                None => (None, Item::default()),
            };
            Slot {
                applied_here: item.applied.get(shard),
                version,
                item,
                touched: None,
            }
        })
        .collect()
}

pub(super) struct Batcher<'a, 'r> {
    pub(super) plan: &'a Plan<'r>,
    pub(super) config: &'a AggregateConfig,
    pub(super) slots: &'a mut Vec<Slot>,
    /// Indexed like `plan.cells`; `Some` while a cell holds readings.
    pub(super) cells: Vec<Option<Cell>>,
    /// Cells holding readings, in the order they were first filled.
    pub(super) active: Vec<u32>,
    pub(super) dead_letters: Vec<Write>,
    pub(super) stats: BatchStats,
    /// Each device's item slot.
    pub(super) device_slot: FxHashMap<u32, u32>,
    /// Per device, the latest arrival and record of its accepted readings.
    pub(super) seen: FxHashMap<u32, (i64, SeqNo)>,
    /// The windows a device item tracks until compacted, in ms.
    pub(super) units: Vec<i64>,
}

impl<'a, 'r> Batcher<'a, 'r> {
    fn new(plan: &'a Plan<'r>, config: &'a AggregateConfig, slots: &'a mut Vec<Slot>) -> Self {
        Batcher {
            plan,
            config,
            slots,
            cells: (0..plan.cells.len()).map(|_| None).collect(),
            active: Vec::new(),
            dead_letters: Vec::new(),
            stats: BatchStats::default(),
            device_slot: plan.device_slots.iter().copied().collect(),
            seen: FxHashMap::with_capacity_and_hasher(plan.devices_seen.len(), Default::default()),
            units: config.pending_units(),
        }
    }
}

impl Batcher<'_, '_> {
    /// Folds every record in, and its cells into the fleet windows.
    fn fold_records(&mut self) -> Result<(), ApplyError> {
        let plan = self.plan;
        let first_seq = plan.records.first().map_or(SeqNo::ZERO, |r| r.seq);
        // A replay: some item already holds part of this batch. Then cells are
        // merged record by record, so every item skips exactly what it holds.
        let replay = self.slots.iter().any(|s| s.holds(first_seq));
        for record in &plan.records {
            self.stats.records += 1;
            self.fold_record(record)?;
            if replay {
                self.flush_cells()?;
            }
        }
        self.flush_cells()
    }

    fn fold_record(&mut self, record: &Decoded<'_>) -> Result<(), ApplyError> {
        match &record.body {
            Body::Readings {
                record: r,
                dev,
                spans,
                cell_ids,
                refusals,
                ..
            } => {
                let mut ids = &cell_ids[..];
                for (index, ((reading, refusal), span)) in
                    r.readings.iter().zip(refusals).zip(spans).enumerate()
                {
                    let (these, rest) = ids.split_at(reading.metrics.len());
                    ids = rest;
                    match refusal {
                        Some(rejection) => {
                            self.reject_reading(record.seq, r, reading, index, rejection)?
                        }
                        None => self.accept(record.seq, r, reading, *dev, *span, these)?,
                    }
                }
                Ok(())
            }
            Body::Rejected(m) => self.reject_message(record.seq, m),
            Body::Presence { presence, member } => self.presence(record.seq, presence, *member),
            Body::Unreadable {
                rejection,
                head,
                len,
            } => self.reject_unreadable(record.seq, rejection, head, *len),
        }
    }

    /// Writes the shard's watermark if the batch moved it forward.
    fn advance_watermark(&mut self, last_seq: SeqNo) -> Result<(), ApplyError> {
        let (watermark, loaded) = (self.plan.watermark, self.plan.loaded_watermark);
        if loaded.is_none_or(|w| w < watermark) && !self.plan.records.is_empty() {
            self.touch(WATERMARK_SLOT as usize, last_seq, |state| {
                *state = ItemState::Watermark(watermark);
                Ok(())
            })?;
        }
        Ok(())
    }
}

impl Batcher<'_, '_> {
    /// Runs `f` on the item in slot `i` unless the record at `seq` is already
    /// in it. Returns whether it ran.
    pub(super) fn touch(
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

    pub(super) fn count(&mut self, seq: SeqNo, counter: Counter) -> Result<bool, ApplyError> {
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

    pub(super) fn accept(
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
        let finest = self.config.finest();
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

    pub(super) fn saw(&mut self, dev: u32, received_at: i64, seq: SeqNo) {
        let seen = self.seen.entry(dev).or_insert((received_at, seq));
        *seen = (seen.0.max(received_at), seen.1.max(seq));
    }

    pub(super) fn key_name(&self, i: usize) -> String {
        format!("{}/{}", self.plan.keys[i].pk(), self.plan.keys[i].sk())
    }

    /// Merges every cell into its fleet windows at every resolution,
    /// skipping items that already hold the cell's records. In a replay cells
    /// are flushed after every record, so a cell never spans a record an item
    /// holds and one it does not.
    pub(super) fn flush_cells(&mut self) -> Result<(), ApplyError> {
        let resolutions = &self.config.resolutions;
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
}

pub(super) fn finish(
    plan: Plan<'_>,
    slots: Vec<Slot>,
    dead_letters: Vec<Write>,
    stats: BatchStats,
    config: &AggregateConfig,
) -> AppliedBatch {
    let mut commit = Commit::default();
    let expiry = Expiry::new(config);
    for (slot, key) in slots.into_iter().zip(plan.keys) {
        let Some(seq) = slot.touched else { continue };
        let mut item = slot.item;
        item.applied.advance(&plan.shard, seq);
        let write = Write {
            expires_at: expiry.of(&key),
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
    AppliedBatch { commit, stats }
}

/// When a written item expires (`None`: kept forever). A batch writes a
/// span item for nearly every reading of a quiet device, so the span's
/// lifetime, which follows from the config alone, is worked out once.
pub(crate) struct Expiry<'a> {
    config: &'a AggregateConfig,
    /// A span item's length and retention together.
    span: Option<i64>,
}

impl<'a> Expiry<'a> {
    pub(crate) fn new(config: &'a AggregateConfig) -> Self {
        Expiry {
            config,
            span: config
                .span_retention_ms()
                .map(|keep| config.span_ms() + keep),
        }
    }

    pub(crate) fn of(&self, key: &ItemKey) -> Option<i64> {
        match key {
            ItemKey::DeviceWindow { res, start, .. } | ItemKey::FleetWindow { res, start, .. } => {
                let i = self.config.resolutions.iter().position(|r| r == res)?;
                let keep = (*self.config.retention_ms.get(i)?)?;
                Some(start + res.ms() + keep)
            }
            ItemKey::Span { start, .. } => self.span.map(|life| start + life),
            _ => None,
        }
    }
}
