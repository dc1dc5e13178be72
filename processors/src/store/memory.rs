//! An in-memory store: the reference for the conformance suite, the fast path
//! in benchmarks, and nothing a user should keep data in.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;
use schemas::state::Item;

use rollup::{Commit, Condition, LoadedItem, Write};

use super::{KeyedItem, Range, RollupQuery, RollupStore, Scan, StoreError};
use rollup::keys::ItemKey;

#[derive(Debug, Default)]
pub struct MemoryStore {
    items: Mutex<BTreeMap<(String, String), (u64, Item)>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), (u64, Item)>> {
        // A panic while holding the lock leaves whole items behind, never half
        // of one, so the map is still usable.
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies one write under the lock; conditions as a real store checks them.
    fn write(
        map: &mut BTreeMap<(String, String), (u64, Item)>,
        w: Write,
    ) -> Result<(), StoreError> {
        let id = (w.key.pk(), w.key.sk());
        let current = map.get(&id).map(|(v, _)| *v);
        let version = match (w.condition, current) {
            (Condition::Version(v), Some(c)) if v == c => c + 1,
            (Condition::Absent, None) | (Condition::InsertOnce, None) => 1,
            (Condition::InsertOnce, Some(_)) => return Ok(()),
            _ => return Err(StoreError::Conflict(format!("{}/{}", id.0, id.1))),
        };
        map.insert(id, (version, w.item));
        Ok(())
    }

    /// Every item, for tests that compare whole stores.
    pub fn dump(&self) -> Vec<((String, String), Item)> {
        self.lock()
            .iter()
            .map(|(k, (_, item))| (k.clone(), item.clone()))
            .collect()
    }
}

#[async_trait]
impl RollupStore for MemoryStore {
    async fn load(&self, keys: &[ItemKey]) -> Result<Vec<Option<LoadedItem>>, StoreError> {
        let map = self.lock();
        Ok(keys
            .iter()
            .map(|k| {
                map.get(&(k.pk(), k.sk()))
                    .map(|(version, item)| LoadedItem {
                        version: *version,
                        item: item.clone(),
                    })
            })
            .collect())
    }

    async fn commit(&self, commit: Commit) -> Result<(), StoreError> {
        let mut map = self.lock();
        // Check every condition first so a failed batch changes nothing, as a
        // transaction would.
        let mut staged = map.clone();
        for w in commit.writes.into_iter().chain(commit.then) {
            Self::write(&mut staged, w)?;
        }
        *map = staged;
        Ok(())
    }
}

#[async_trait]
impl RollupQuery for MemoryStore {
    async fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>, StoreError> {
        Ok(self
            .lock()
            .get(&(pk.to_string(), sk.to_string()))
            .map(|(_, item)| item.clone()))
    }

    async fn range(&self, range: Range) -> Result<Vec<(String, Item)>, StoreError> {
        let map = self.lock();
        let from = (range.pk.clone(), range.from.clone());
        let to = (range.pk.clone(), range.to.clone());
        if from >= to {
            return Ok(Vec::new());
        }
        let iter = map
            .range(from..to)
            .map(|((_, sk), (_, item))| (sk.clone(), item.clone()));
        Ok(if range.descending {
            iter.rev().take(range.limit).collect()
        } else {
            iter.take(range.limit).collect()
        })
    }

    async fn scan_prefix(&self, scan: Scan) -> Result<Vec<KeyedItem>, StoreError> {
        let map = self.lock();
        Ok(map
            .range((scan.start(), std::ops::Bound::Unbounded))
            .take_while(|((pk, _), _)| pk.starts_with(&scan.pk_prefix))
            .take(scan.limit)
            .map(|((pk, sk), (_, item))| (pk.clone(), sk.clone(), item.clone()))
            .collect())
    }
}
