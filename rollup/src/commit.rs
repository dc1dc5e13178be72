//! What the core hands a store: the items of a batch as loaded, and the
//! conditional writes that fold the batch into them.
//!
//! These are the core's side of the store contract. The store roles that
//! move them (`RollupStore`, with its I/O error type) belong to the shells
//! that do the I/O.

use schemas::state::{DeadLetter, Item, ItemState};

use crate::keys::ItemKey;

/// An item as loaded, with the version its next write is conditional on.
#[derive(Debug, Clone)]
pub struct LoadedItem {
    pub version: u64,
    pub item: Item,
}

/// How a write may proceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// Only if the item is still at this version.
    Version(u64),
    /// Only if the item does not exist yet.
    Absent,
    /// Insert if absent, else leave the existing item alone: for write-once
    /// items such as dead letters, whose key already makes them idempotent.
    InsertOnce,
}

#[derive(Debug, Clone)]
pub struct Write {
    pub key: ItemKey,
    pub condition: Condition,
    pub item: Item,
    /// When the store may delete the item, ms since the epoch.
    pub expires_at: Option<i64>,
}

/// The writes of one batch. `then` is written only after every write in
/// `writes` has succeeded: the dedup sets go there, so that after a crash
/// between the two, a replay still sees the readings as new and lets each
/// rollup's applied marks decide.
#[derive(Debug, Clone, Default)]
pub struct Commit {
    pub writes: Vec<Write>,
    pub then: Vec<Write>,
}

impl Write {
    /// The write that keeps `letter`, the `index`th refusal of its record:
    /// written once, whatever the retries, since its key names the record.
    pub fn dead_letter(letter: DeadLetter, index: u32, retention_ms: i64) -> Write {
        Write {
            key: ItemKey::DeadLetter {
                reason: letter.reason,
                received_at: letter.received_at,
                shard: letter.shard.clone(),
                seq: letter.seq,
                index,
            },
            condition: Condition::InsertOnce,
            expires_at: Some(letter.received_at.saturating_add(retention_ms)),
            item: Item {
                applied: Default::default(),
                state: ItemState::DeadLetter(letter),
            },
        }
    }
}

impl Commit {
    pub fn len(&self) -> usize {
        self.writes.len() + self.then.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
