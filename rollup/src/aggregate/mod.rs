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
//!
//! Layout, in the order a batch meets it:
//!
//! - `plan`: decode, intern, list the first round's keys;
//! - `late`: judging a reading by its `received_at`, then by the watermark;
//! - `receive`: the rounds of loads between plan and apply;
//! - `apply`: folding readings into spans and fleet cells, and the writes;
//! - `pending`: a device's pending coarser windows and its fleet entry;
//! - `compaction`: writing a coarser window once it can no longer change;
//! - `reject`: counted refusals and their dead letters;
//! - `watermark`: the watermark of a shard with nothing to read.

mod apply;
mod compaction;
mod late;
mod pending;
mod plan;
mod receive;
mod reject;
#[cfg(test)]
mod tests;
mod watermark;

use rustc_hash::FxHashMap;
use schemas::RejectReason;
use schemas::shard::Record;
use schemas::state::ItemState;

pub(crate) use apply::Expiry;
pub use apply::apply;
pub use plan::{Plan, plan};
pub use watermark::idle_watermark;

use crate::commit::{Commit, LoadedItem};
use crate::config::AggregateConfig;
use crate::keys::{ItemKey, counters};

/// Strings of a batch, interned so that keys are small integers.
#[derive(Debug, Default)]
struct Names {
    list: Vec<String>,
    index: FxHashMap<String, u32>,
}

impl Names {
    fn with_capacity(n: usize) -> Self {
        Names {
            list: Vec::with_capacity(n),
            index: FxHashMap::with_capacity_and_hasher(n, Default::default()),
        }
    }

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

/// Plans, loads both rounds through `load` and applies: the whole core for
/// a caller whose store answers at once (tests, examples, benchmarks).
pub fn fold(
    shard: &str,
    records: &[Record],
    config: &AggregateConfig,
    mut load: impl FnMut(&[ItemKey]) -> Vec<Option<LoadedItem>>,
) -> Result<AppliedBatch, ApplyError> {
    let mut p = plan(shard, records, config);
    while !p.keys().is_empty() {
        let loaded = load(p.keys());
        p.receive(loaded, config)?;
    }
    apply(p, config)
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
pub struct AppliedBatch {
    pub commit: Commit,
    pub stats: BatchStats,
}

fn mismatch(expected: &str, found: &ItemState) -> String {
    let found = match found {
        ItemState::Empty => "nothing",
        ItemState::Window(_) => "a window",
        ItemState::Span(_) => "a span",
        ItemState::Windows(_) => "a device window",
        ItemState::Device(_) => "a device",
        ItemState::Member(_) | ItemState::FleetMember(_) => "a fleet member",
        ItemState::Alert(_) | ItemState::AlertDelivered(_) => "an alert",
        ItemState::Counter(_) => "a counter",
        ItemState::Watermark(_) => "a watermark",
        ItemState::DeadLetter(_) => "a dead letter",
        ItemState::Layout(_) => "the store's layout",
    };
    format!("expected a {expected}, found {found}")
}
