//! A write-behind cache in front of the embedded store.
//!
//! A busy device's windows change with every batch; writing each change to
//! SQLite costs a row write per item per batch, which at many devices is
//! the pipeline's bottleneck (about nine items per reading when each batch
//! holds one reading per device). The cache keeps loaded items in memory,
//! applies commits there, and [`CachedStore::flush`]es the dirty ones to the
//! inner store in one commit, so an item that changed ten times between
//! flushes is written once.
//!
//! Exactly-once still holds: the shard loop checkpoints only after a flush
//! (`RollupStore::flush`), so a crash replays from the last flushed position,
//! and the inner store's applied marks skip what it already holds. Queries
//! read through the cache, so what is applied is visible before it is
//! flushed.
//!
//! **Architecture Invariant:** the cache is the only writer of the inner
//! store while it runs; its notion of the inner store's versions would be
//! wrong otherwise (and a flush then fails with a conflict rather than
//! overwrite).

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use schemas::state::Item;

use rollup::{Commit, Condition, LoadedItem, Write};

use super::{KeyedItem, Range, RollupQuery, RollupStore, Scan, StoreError};
use rollup::keys::ItemKey;

/// How much the cache keeps.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Clean items beyond this many are dropped after a flush, least
    /// recently used first.
    pub max_items: usize,
    /// Clean items not used for this many flushes are dropped.
    pub idle_flushes: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_items: 2_000_000,
            idle_flushes: 120,
        }
    }
}

#[derive(Debug)]
struct Entry {
    key: ItemKey,
    /// `None`: known to be absent from the inner store.
    value: Option<Item>,
    /// The version commits are conditional on; bumped by every commit.
    version: u64,
    /// The inner store's version of the item, `None` if it has none.
    inner_version: Option<u64>,
    dirty: bool,
    /// Written once and never loaded (dead letters): flushed as InsertOnce.
    insert_once: bool,
    expires_at: Option<i64>,
    /// The flush generation that last used the entry, for eviction.
    used: u64,
}

#[derive(Debug, Default)]
struct State {
    entries: BTreeMap<(String, String), Entry>,
    generation: u64,
    /// Entries with `dirty` set, kept as a count so that the flush policy
    /// can look at it after every batch without a scan.
    dirty: usize,
}

pub struct CachedStore<S> {
    inner: Arc<S>,
    state: Mutex<State>,
    /// One flush at a time, so that inner versions advance in order.
    flushing: tokio::sync::Mutex<()>,
    config: CacheConfig,
}

impl<S> std::fmt::Debug for CachedStore<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedStore").finish_non_exhaustive()
    }
}

impl<S: RollupStore + RollupQuery> CachedStore<S> {
    pub fn new(inner: Arc<S>, config: CacheConfig) -> Self {
        CachedStore {
            inner,
            state: Mutex::new(State::default()),
            flushing: tokio::sync::Mutex::new(()),
            config,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Entries are replaced whole under the lock; a panic elsewhere cannot
        // leave half of one behind.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Items applied but not yet written to the inner store.
    pub fn dirty(&self) -> usize {
        self.lock().dirty
    }

    /// Items held in memory.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Moves up to [`FLUSH_CHUNK`] entries' worth of dirty items after
    /// `after` (from the start if `None`) into `commit`, marking them clean
    /// and recording each in `flushed`. Returns where to go on from, or
    /// `None` once the end of the cache is reached.
    fn take_dirty(
        &self,
        after: Option<(String, String)>,
        commit: &mut Commit,
        flushed: &mut Vec<((String, String), Option<u64>, bool)>,
    ) -> Option<(String, String)> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let start = match after {
            Some(id) => Bound::Excluded(id),
            None => Bound::Unbounded,
        };
        let mut taken = 0;
        let mut visited = 0;
        let mut last = None;
        for (id, e) in state.entries.range_mut((start, Bound::Unbounded)) {
            if visited == FLUSH_CHUNK {
                break;
            }
            visited += 1;
            last = Some(id);
            if !e.dirty {
                continue;
            }
            let Some(item) = e.value.clone() else {
                continue;
            };
            e.dirty = false;
            taken += 1;
            let condition = if e.insert_once {
                Condition::InsertOnce
            } else {
                e.inner_version
                    .map_or(Condition::Absent, Condition::Version)
            };
            let write = Write {
                key: e.key.clone(),
                condition,
                item,
                expires_at: e.expires_at,
            };
            if e.key.is_written_last() {
                commit.then.push(write);
            } else {
                commit.writes.push(write);
            }
            flushed.push((id.clone(), e.inner_version, e.insert_once));
        }
        let next = (visited == FLUSH_CHUNK).then(|| last.cloned()).flatten();
        state.dirty -= taken;
        next
    }
}

/// Cache entries a flush looks at per hold of the lock.
const FLUSH_CHUNK: usize = 4096;

#[async_trait]
impl<S: RollupStore + RollupQuery> RollupStore for CachedStore<S> {
    async fn load(&self, keys: &[ItemKey]) -> Result<Vec<Option<LoadedItem>>, StoreError> {
        let ids: Vec<(String, String)> = keys.iter().map(|k| (k.pk(), k.sk())).collect();
        let missing: Vec<usize> = {
            let state = self.lock();
            ids.iter()
                .enumerate()
                .filter(|(_, id)| !state.entries.contains_key(*id))
                .map(|(i, _)| i)
                .collect()
        };
        if !missing.is_empty() {
            let wanted: Vec<ItemKey> = missing.iter().map(|&i| keys[i].clone()).collect();
            let found = self.inner.load(&wanted).await?;
            let mut state = self.lock();
            let generation = state.generation;
            for ((i, key), stored) in missing.iter().zip(wanted).zip(found) {
                // A commit may have filled the entry while the lock was free.
                state.entries.entry(ids[*i].clone()).or_insert_with(|| {
                    let (value, version) = match stored {
                        Some(s) => (Some(s.item), Some(s.version)),
                        None => (None, None),
                    };
                    Entry {
                        key,
                        value,
                        version: version.unwrap_or(0),
                        inner_version: version,
                        dirty: false,
                        insert_once: false,
                        expires_at: None,
                        used: generation,
                    }
                });
            }
        }
        let mut state = self.lock();
        let generation = state.generation;
        Ok(ids
            .iter()
            .map(|id| {
                let entry = state.entries.get_mut(id)?;
                entry.used = generation;
                let item = entry.value.clone()?;
                Some(LoadedItem {
                    version: entry.version,
                    item,
                })
            })
            .collect())
    }

    async fn commit(&self, commit: Commit) -> Result<(), StoreError> {
        // Conditions are checked against the cache, so an item a writer did
        // not load first (processors always do) is fetched now.
        let unknown: Vec<ItemKey> = {
            let state = self.lock();
            commit
                .writes
                .iter()
                .chain(&commit.then)
                .filter(|w| w.condition != Condition::InsertOnce)
                .filter(|w| !state.entries.contains_key(&(w.key.pk(), w.key.sk())))
                .map(|w| w.key.clone())
                .collect()
        };
        if !unknown.is_empty() {
            self.load(&unknown).await?;
        }
        let mut guard = self.lock();
        let state = &mut *guard;
        // Check every condition before applying any, as a transaction would.
        let mut ids = Vec::with_capacity(commit.len());
        for w in commit.writes.iter().chain(&commit.then) {
            let id = (w.key.pk(), w.key.sk());
            let ok = match (w.condition, state.entries.get(&id)) {
                (Condition::InsertOnce, _) => true,
                (Condition::Absent, Some(e)) => e.value.is_none(),
                (Condition::Version(v), Some(e)) => e.value.is_some() && e.version == v,
                // Evicted since it was fetched above: reload and try again.
                (_, None) => false,
            };
            if !ok {
                return Err(StoreError::Conflict(format!("{}/{}", id.0, id.1)));
            }
            ids.push(id);
        }
        let generation = state.generation;
        for (w, id) in commit.writes.into_iter().chain(commit.then).zip(ids) {
            let Write {
                key,
                condition,
                item,
                expires_at,
            } = w;
            match state.entries.get_mut(&id) {
                Some(e) if condition == Condition::InsertOnce => {
                    // Write-once items keep their first value.
                    e.used = generation;
                }
                Some(e) => {
                    e.value = Some(item);
                    e.version += 1;
                    if !e.dirty {
                        e.dirty = true;
                        state.dirty += 1;
                    }
                    e.expires_at = expires_at;
                    e.used = generation;
                }
                None => {
                    state.dirty += 1;
                    state.entries.insert(
                        id,
                        Entry {
                            key,
                            value: Some(item),
                            version: 1,
                            inner_version: None,
                            dirty: true,
                            insert_once: condition == Condition::InsertOnce,
                            expires_at,
                            used: generation,
                        },
                    );
                }
            }
        }
        Ok(())
    }

    fn unflushed(&self) -> usize {
        self.dirty()
    }

    async fn flush(&self) -> Result<usize, StoreError> {
        let _one = self.flushing.lock().await;
        let mut flushed: Vec<((String, String), Option<u64>, bool)> = Vec::new();
        let mut commit = Commit::default();
        // The dirty items are copied a chunk at a time, letting go of the
        // lock (and of the worker thread) between chunks: at a fleet's shape
        // a flush copies tens of thousands of items, and the shard loops and
        // the API would otherwise wait for all of them. An item committed
        // while the copy runs is either taken with its newer value or left
        // dirty for the next flush, so the flush still covers everything
        // committed before it started.
        let mut after = None;
        loop {
            after = self.take_dirty(after, &mut commit, &mut flushed);
            if after.is_none() {
                break;
            }
            tokio::task::yield_now().await;
        }
        let written = commit.writes.len() + commit.then.len();
        if !commit.is_empty()
            && let Err(e) = self.inner.commit(commit).await
        {
            // Nothing is lost: mark the items dirty again for the next flush.
            let mut guard = self.lock();
            let state = &mut *guard;
            let mut again = 0;
            for (id, _, _) in &flushed {
                if let Some(entry) = state.entries.get_mut(id)
                    && !entry.dirty
                {
                    entry.dirty = true;
                    again += 1;
                }
            }
            state.dirty += again;
            return Err(e);
        }
        let mut state = self.lock();
        for (id, inner_version, insert_once) in flushed {
            if let Some(entry) = state.entries.get_mut(&id) {
                entry.inner_version = if insert_once {
                    None
                } else {
                    Some(inner_version.map_or(1, |v| v + 1))
                };
            }
        }
        state.generation += 1;
        let generation = state.generation;
        let idle = self.config.idle_flushes;
        state
            .entries
            .retain(|_, e| e.dirty || generation.saturating_sub(e.used) <= idle);
        if state.entries.len() > self.config.max_items {
            let mut clean: Vec<(u64, (String, String))> = state
                .entries
                .iter()
                .filter(|(_, e)| !e.dirty)
                .map(|(id, e)| (e.used, id.clone()))
                .collect();
            clean.sort_unstable();
            let excess = state.entries.len() - self.config.max_items;
            for (_, id) in clean.into_iter().take(excess) {
                state.entries.remove(&id);
            }
        }
        Ok(written)
    }
}

/// Cache entries with values in `[from, to)` of one partition, newest state.
fn overlay(state: &State, pk: &str, from: &str, to: &str) -> Vec<(String, Item)> {
    let lo = Bound::Included((pk.to_string(), from.to_string()));
    let hi = Bound::Excluded((pk.to_string(), to.to_string()));
    if from >= to {
        return Vec::new();
    }
    state
        .entries
        .range((lo, hi))
        .filter_map(|((_, sk), e)| e.value.clone().map(|v| (sk.clone(), v)))
        .collect()
}

#[async_trait]
impl<S: RollupStore + RollupQuery> RollupQuery for CachedStore<S> {
    async fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>, StoreError> {
        let cached = {
            let state = self.lock();
            state
                .entries
                .get(&(pk.to_string(), sk.to_string()))
                .map(|e| e.value.clone())
        };
        match cached {
            Some(value) => Ok(value),
            None => self.inner.get(pk, sk).await,
        }
    }

    async fn range(&self, range: Range) -> Result<Vec<(String, Item)>, StoreError> {
        let stored = self.inner.range(range.clone()).await?;
        let cached = overlay(&self.lock(), &range.pk, &range.from, &range.to);
        if cached.is_empty() {
            return Ok(stored);
        }
        let mut merged: BTreeMap<String, Item> = stored.into_iter().collect();
        // The cache holds every change not yet flushed, so it wins.
        merged.extend(cached);
        let rows: Vec<(String, Item)> = if range.descending {
            merged.into_iter().rev().take(range.limit).collect()
        } else {
            merged.into_iter().take(range.limit).collect()
        };
        Ok(rows)
    }

    async fn scan_prefix(&self, scan: Scan) -> Result<Vec<KeyedItem>, StoreError> {
        let limit = scan.limit;
        let cached: Vec<KeyedItem> = {
            let state = self.lock();
            state
                .entries
                .range((scan.start(), Bound::Unbounded))
                .take_while(|((pk, _), _)| pk.starts_with(&scan.pk_prefix))
                .filter_map(|((pk, sk), e)| e.value.clone().map(|v| (pk.clone(), sk.clone(), v)))
                .take(limit)
                .collect()
        };
        let stored = self.inner.scan_prefix(scan).await?;
        let mut merged: BTreeMap<(String, String), Item> = stored
            .into_iter()
            .map(|(pk, sk, item)| ((pk, sk), item))
            .collect();
        merged.extend(cached.into_iter().map(|(pk, sk, item)| ((pk, sk), item)));
        Ok(merged
            .into_iter()
            .take(limit)
            .map(|((pk, sk), item)| (pk, sk, item))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use schemas::state::ItemState;

    use super::*;
    use crate::store::memory::MemoryStore;

    fn counter(name: &str, condition: Condition, n: u64) -> Commit {
        Commit {
            writes: vec![Write {
                key: ItemKey::Counter {
                    shard: "s".into(),
                    name: name.into(),
                },
                condition,
                item: Item {
                    applied: Default::default(),
                    state: ItemState::Counter(n),
                },
                expires_at: None,
            }],
            then: vec![],
        }
    }

    /// A flush copies the dirty items a chunk at a time; items on both sides
    /// of every chunk boundary reach the inner store, once each.
    #[tokio::test]
    async fn a_flush_larger_than_a_chunk_writes_every_dirty_item_once() {
        let inner = Arc::new(MemoryStore::new());
        let cache = CachedStore::new(inner.clone(), CacheConfig::default());
        let n = FLUSH_CHUNK * 2 + 7;
        for i in 0..n {
            cache
                .commit(counter(&format!("c{i:06}"), Condition::Absent, 1))
                .await
                .unwrap();
        }
        assert_eq!(cache.flush().await.unwrap(), n);
        assert_eq!(cache.unflushed(), 0);
        assert_eq!(cache.flush().await.unwrap(), 0, "nothing is written twice");
        for i in [0, FLUSH_CHUNK - 1, FLUSH_CHUNK, n - 1] {
            let pk = ItemKey::Counter {
                shard: "s".into(),
                name: format!("c{i:06}"),
            };
            assert!(
                inner.get(&pk.pk(), &pk.sk()).await.unwrap().is_some(),
                "counter {i} reached the inner store"
            );
        }
    }
}
