//! The first step: decode a batch in place, judge each reading by its own
//! `received_at`, intern names, and list the items the batch may touch.

use rustc_hash::{FxHashMap, FxHashSet};
use schemas::Presence;
use schemas::record::{PackedView, RecordView, RejectedMessage};
use schemas::shard::Record;
use schemas::{RejectReason, Rejection, SeqNo, decode_record_view};

use super::compaction::Compaction;
use super::late::judge;
use super::{CellKey, Counter, Key, Names};
use crate::commit::LoadedItem;
use crate::config::AggregateConfig;
use crate::keys::ItemKey;

/// A decoded batch and the keys it may touch.
#[derive(Debug)]
pub struct Plan<'a> {
    pub(super) shard: String,
    pub(super) records: Vec<Decoded<'a>>,
    pub(super) devices: Names,
    pub(super) fleets: Names,
    pub(super) metrics: Names,
    /// Every item the batch may touch, in the order `keys` lists them.
    pub(super) slot_of: FxHashMap<Key, u32>,
    pub(super) key_list: Vec<Key>,
    pub(super) keys: Vec<ItemKey>,
    /// The config's resolutions; a `Key` names one by its index.
    pub(super) resolutions: Vec<schemas::Resolution>,
    /// The config's span, worked out once a batch rather than per reading.
    span_ms: i64,
    /// Cells in first-seen order, and for each its fleet window slots, one
    /// per resolution.
    pub(super) cells: Vec<CellKey>,
    pub(super) cell_windows: Vec<u32>,
    /// Per device with accepted readings, its fleet, in first-seen order.
    pub(super) devices_seen: Vec<(u32, u32)>,
    /// Devices whose item is loaded (they start a span, or the batch is a
    /// replay for them), and its slot.
    pub(super) device_slots: Vec<(u32, u32)>,
    /// The earliest `received_at` of the batch's records.
    pub(super) min_received: Option<i64>,
    /// Every item loaded so far, in the order of `keys`.
    pub(super) loaded: Vec<Option<LoadedItem>>,
    /// Rounds received so far.
    pub(super) rounds: u8,
    /// What the batch's records prove has been applied (see
    /// [`AggregateConfig::watermark_slack_ms`]).
    pub(super) watermark: i64,
    /// The watermark as loaded; the batch writes it only if it advanced.
    pub(super) loaded_watermark: Option<i64>,
    pub(super) compactions: Vec<Compaction>,
    /// Devices that start a span in this batch, and their member slot.
    pub(super) members: Vec<(u32, u32)>,
    /// Per presence record that names no fleet: its index in `records`, its
    /// device, and the slot of the device item that names the fleet.
    pub(super) presence_fleets: Vec<(usize, u32, u32)>,
}

impl Plan<'_> {
    /// The items to load next and hand to [`Plan::receive`]; none once the
    /// plan is ready for [`super::apply`].
    pub fn keys(&self) -> &[ItemKey] {
        &self.keys[self.loaded.len()..]
    }

    /// Sequence number of the last record in the batch.
    pub fn last_seq(&self) -> Option<SeqNo> {
        self.records.last().map(|r| r.seq)
    }

    pub(super) fn add_key(&mut self, key: Key) -> u32 {
        let next = self.key_list.len() as u32;
        let slot = *self.slot_of.entry(key).or_insert(next);
        if slot == next {
            self.key_list.push(key);
        }
        slot
    }

    pub(super) fn item_key(&self, key: Key) -> ItemKey {
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

    pub(super) fn resolution(&self, index: u8) -> schemas::Resolution {
        self.resolutions[index as usize]
    }

    /// Adds keys after the first round and lists them.
    pub(super) fn extend_keys(&mut self, from: usize) {
        let more: Vec<ItemKey> = self.key_list[from..]
            .iter()
            .map(|k| self.item_key(*k))
            .collect();
        self.keys.extend(more);
    }
}

#[derive(Debug)]
pub(super) struct Decoded<'a> {
    pub(super) seq: SeqNo,
    pub(super) body: Body<'a>,
}

#[derive(Debug)]
pub(super) enum Body<'a> {
    Readings {
        record: PackedView<'a>,
        dev: u32,
        /// Per reading, its span's slot (meaningless if it is refused).
        spans: Vec<u32>,
        /// Per metric of every reading, in order: its cell.
        cell_ids: Vec<u32>,
        /// Per reading: `None` if it may be accepted, else why not.
        refusals: Vec<Option<Rejection>>,
    },
    Rejected(RejectedMessage),
    /// A connect or disconnect, folded into the device's fleet member row
    /// at `member` (`None` while, or if, its fleet is unknown).
    Presence {
        presence: Presence,
        member: Option<u32>,
    },
    Unreadable {
        rejection: Rejection,
        head: Vec<u8>,
        len: u64,
    },
}

/// What planning a batch remembers only while it decodes the records.
struct Seen {
    /// Each cell's index in `Plan::cells`.
    cells: FxHashMap<CellKey, u32>,
    /// Devices with an accepted reading so far.
    devices: FxHashSet<u32>,
}

/// How many devices a batch of `records` is sized for up front: a device a
/// record, the shape of a fleet's batch, so that its maps do not grow a step
/// at a time (growing them was 3 % of the processors' instructions at 19,000
/// devices, `examples/cached_fleet.rs`). Bounded, because a chatty shape's
/// large batches hold few devices.
fn presize(records: usize) -> usize {
    records.min(1024)
}

/// Decodes a batch of one shard and lists the items it may touch.
pub fn plan<'a>(shard: &str, records: &'a [Record], config: &AggregateConfig) -> Plan<'a> {
    let mut p = Plan::new(shard, records.len(), config);
    let mut seen = Seen {
        cells: FxHashMap::default(),
        devices: FxHashSet::with_capacity_and_hasher(presize(records.len()), Default::default()),
    };
    for r in records {
        let body = match decode_record_view(&r.data) {
            Ok(RecordView::Readings(record)) => p.plan_readings(record, config, &mut seen),
            Ok(RecordView::Rejected(message)) => {
                p.add_key(Key::Counter(Counter::Rejected(message.reason)));
                Body::Rejected(message)
            }
            Ok(RecordView::Presence(presence)) => p.plan_presence(presence),
            Err(rejection) => p.plan_unreadable(r, rejection),
        };
        p.records.push(Decoded { seq: r.seq, body });
    }
    p.list_fleet_windows();
    p.keys = p.key_list.iter().map(|k| p.item_key(*k)).collect();
    p
}

impl<'a> Plan<'a> {
    /// An empty plan that lists first the items every batch touches.
    fn new(shard: &str, records: usize, config: &AggregateConfig) -> Self {
        let mut p = Plan {
            shard: shard.to_string(),
            records: Vec::with_capacity(records),
            devices: Names::with_capacity(presize(records)),
            fleets: Names::default(),
            metrics: Names::default(),
            slot_of: FxHashMap::with_capacity_and_hasher(
                2 * presize(records) + 8,
                Default::default(),
            ),
            key_list: Vec::new(),
            keys: Vec::new(),
            resolutions: config.resolutions.clone(),
            span_ms: config.span_ms(),
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
            presence_fleets: Vec::new(),
        };
        p.add_key(Key::Counter(Counter::Accepted));
        p.add_key(Key::Counter(Counter::Duplicate));
        // A reading may yet be refused as too late once the watermark is loaded.
        p.add_key(Key::Counter(Counter::Rejected(RejectReason::TooLate)));
        p.add_key(Key::Watermark);
        p
    }

    /// Judges each reading of a record and lists the span and the cells of
    /// each one accepted, and the counter of each one refused.
    fn plan_readings(
        &mut self,
        record: PackedView<'a>,
        config: &AggregateConfig,
        seen: &mut Seen,
    ) -> Body<'a> {
        self.min_received = Some(
            self.min_received
                .map_or(record.received_at, |m| m.min(record.received_at)),
        );
        let dev = self.devices.id(&record.device_id);
        let fleet = self.fleets.id(&record.fleet);
        let finest = config.finest();
        let mut spans = Vec::with_capacity(record.readings.len());
        let mut cell_ids = Vec::with_capacity(record.readings.len() * 2);
        let mut refusals = Vec::with_capacity(record.readings.len());
        let mut any = false;
        for reading in &record.readings {
            let refusal = judge(reading, record.received_at, config);
            match &refusal {
                Some(rejection) => {
                    self.add_key(Key::Counter(Counter::Rejected(rejection.reason)));
                    spans.push(u32::MAX);
                    cell_ids.extend(reading.metrics.iter().map(|_| u32::MAX));
                }
                None => {
                    any = true;
                    spans.push(self.add_key(Key::Span {
                        dev,
                        start: crate::config::span_start_in(self.span_ms, reading.ts),
                    }));
                    let start = finest.window_start(reading.ts);
                    for m in &reading.metrics {
                        let metric = self.metrics.id(&m.name);
                        cell_ids.push(self.add_cell((fleet, metric, start), seen));
                    }
                }
            }
            refusals.push(refusal);
        }
        if any && seen.devices.insert(dev) {
            self.devices_seen.push((dev, fleet));
        }
        Body::Readings {
            record,
            dev,
            spans,
            cell_ids,
            refusals,
        }
    }

    /// The index of a cell, added if it is new.
    fn add_cell(&mut self, key: CellKey, seen: &mut Seen) -> u32 {
        let next = self.cells.len() as u32;
        let id = *seen.cells.entry(key).or_insert(next);
        if id == next {
            self.cells.push(key);
        }
        id
    }

    /// A presence record: its device's member row, when it names the fleet;
    /// otherwise the device item is read first for it (see
    /// `Plan::resolve_presence_fleets`).
    fn plan_presence(&mut self, presence: Presence) -> Body<'a> {
        let member = presence.fleet.as_deref().map(|fleet| {
            let dev = self.devices.id(&presence.device_id);
            let fleet = self.fleets.id(fleet);
            self.add_key(Key::Member { fleet, dev })
        });
        Body::Presence { presence, member }
    }

    /// A record that does not decode: counted, and kept in part.
    fn plan_unreadable(&mut self, r: &Record, rejection: Rejection) -> Body<'a> {
        self.add_key(Key::Counter(Counter::Rejected(rejection.reason)));
        Body::Unreadable {
            rejection,
            head: r.data[..r.data.len().min(schemas::record::REJECTED_PAYLOAD_KEEP)].to_vec(),
            len: r.data.len() as u64,
        }
    }

    /// Lists every cell's fleet window at every resolution, after the spans
    /// and counters.
    fn list_fleet_windows(&mut self) {
        // Taken out while `add_key` borrows the plan.
        let cells = std::mem::take(&mut self.cells);
        let resolutions = std::mem::take(&mut self.resolutions);
        let mut cell_windows = Vec::with_capacity(cells.len() * resolutions.len());
        for &(fleet, metric, fine_start) in &cells {
            for (i, res) in resolutions.iter().enumerate() {
                cell_windows.push(self.add_key(Key::FleetWindow {
                    fleet,
                    metric,
                    res: i as u8,
                    start: res.window_start(fine_start),
                }));
            }
        }
        self.cells = cells;
        self.resolutions = resolutions;
        self.cell_windows = cell_windows;
    }
}
