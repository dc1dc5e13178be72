//! The cache's entries, found by their [`ItemKey`] and walked in the inner
//! store's (pk, sk) order.
//!
//! Processors load and commit by `ItemKey`, several times per reading, so the
//! entries are a hash map keyed by it: a lookup hashes the key's fields and
//! builds no strings. Queries and the flush need (pk, sk) order (ranges of a
//! partition, scans, writes in the inner B-tree's order), which the `order`
//! index gives; a key's strings are built once, when its entry is created.
//!
//! **Invariant:** `entries` and `order` hold the same keys; entries are only
//! added by [`State::insert`] and [`State::get_or_insert_with`] and only
//! dropped by [`State::evict`].

use std::collections::{BTreeMap, HashMap};

use rollup::LoadedItem;
use rollup::keys::ItemKey;
use schemas::state::Item;

/// A stored item's (pk, sk).
pub(super) type Id = (String, String);

#[derive(Debug)]
pub(super) struct Entry {
    /// `None`: known to be absent from the inner store.
    pub value: Option<Item>,
    /// The version commits are conditional on; bumped by every commit.
    pub version: u64,
    /// The inner store's version of the item, `None` if it has none.
    pub inner_version: Option<u64>,
    pub dirty: bool,
    /// Written once and never loaded (dead letters): flushed as InsertOnce.
    pub insert_once: bool,
    pub expires_at: Option<i64>,
    /// The flush generation that last used the entry, for eviction.
    pub used: u64,
}

impl Entry {
    /// An entry for what the inner store holds (`None`: nothing).
    pub fn stored(stored: Option<LoadedItem>, generation: u64) -> Self {
        let (value, version) = match stored {
            Some(s) => (Some(s.item), Some(s.version)),
            None => (None, None),
        };
        Entry {
            value,
            version: version.unwrap_or(0),
            inner_version: version,
            dirty: false,
            insert_once: false,
            expires_at: None,
            used: generation,
        }
    }

    /// What a load returns for the entry.
    pub fn loaded(&self) -> Option<LoadedItem> {
        self.value.as_ref().map(|item| LoadedItem {
            version: self.version,
            item: item.clone(),
        })
    }
}

#[derive(Debug, Default)]
pub(super) struct State {
    /// foldhash, not the standard SipHash: keys are hashed several times
    /// per reading, and the change took 5 % off the processors' instructions
    /// per reading (callgrind, `examples/cached_fleet.rs`). Still seeded per
    /// process, so device ids cannot be chosen to collide.
    pub entries: HashMap<ItemKey, Entry, foldhash::fast::RandomState>,
    /// Every entry's key by its (pk, sk).
    pub order: BTreeMap<Id, ItemKey>,
    pub generation: u64,
    /// Entries with `dirty` set, kept as a count so that the flush policy
    /// can look at it after every batch without a scan.
    pub dirty: usize,
}

impl State {
    /// Adds an entry for a key the cache does not hold yet.
    pub fn insert(&mut self, key: ItemKey, entry: Entry) {
        self.order.insert((key.pk(), key.sk()), key.clone());
        self.entries.insert(key, entry);
    }

    /// The entry at `key`, created by `make` if the cache holds none.
    pub fn get_or_insert_with(&mut self, key: ItemKey, make: impl FnOnce() -> Entry) -> &mut Entry {
        match self.entries.entry(key) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                self.order
                    .insert((v.key().pk(), v.key().sk()), v.key().clone());
                v.insert(make())
            }
        }
    }

    /// The entry stored at (pk, sk), for queries.
    pub fn get_by_id(&self, id: &Id) -> Option<&Entry> {
        self.entries.get(self.order.get(id)?)
    }

    /// Drops clean entries unused for more than `idle` flushes, then the
    /// least recently used clean ones beyond `max_items`.
    pub fn evict(&mut self, idle: u64, max_items: usize) {
        let generation = self.generation;
        let mut gone: Vec<ItemKey> = Vec::new();
        self.entries.retain(|key, e| {
            let keep = e.dirty || generation.saturating_sub(e.used) <= idle;
            if !keep {
                gone.push(key.clone());
            }
            keep
        });
        if self.entries.len() > max_items {
            let mut clean: Vec<(u64, &ItemKey)> = self
                .entries
                .iter()
                .filter(|(_, e)| !e.dirty)
                .map(|(key, e)| (e.used, key))
                .collect();
            clean.sort_unstable();
            let excess = self.entries.len() - max_items;
            let drop: Vec<ItemKey> = clean
                .into_iter()
                .take(excess)
                .map(|(_, key)| key.clone())
                .collect();
            for key in &drop {
                self.entries.remove(key);
            }
            gone.extend(drop);
        }
        for key in gone {
            self.order.remove(&(key.pk(), key.sk()));
        }
    }
}
