//! A write-behind cache in front of the embedded store.
//!
//! A busy device's windows change with every batch; writing each change to
//! SQLite costs a row write per item per batch, which at many devices is
//! the pipeline's bottleneck (about nine items per reading when each batch
//! holds one reading per device). The cache keeps loaded items in memory,
//! applies commits there, and [`CachedStore::flush`]es the dirty ones to the
//! inner store in transactions of a few thousand items, so an item that
//! changed ten times between flushes is written once.
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
//!
//! - `entries`: the entries, by `ItemKey` for the processors' loads and
//!   commits and in (pk, sk) order for queries and flushes;
//! - `flush`: the flush, its transactions and their order;
//! - `query`: the `RollupQuery` side, reading through the cache.

mod entries;
mod flush;
mod query;

use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use rollup::{Commit, Condition, LoadedItem, Write};

use super::{RollupQuery, RollupStore, StoreError};
use entries::{Entry, State};
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
}

/// Why a commit cannot be applied to the cache as it stands.
enum Refused {
    /// Items a write is conditional on that the cache does not hold.
    Unknown(Vec<ItemKey>),
    /// A condition failed.
    Conflict(StoreError),
}

fn conflict(key: &ItemKey) -> StoreError {
    StoreError::Conflict(format!("{}/{}", key.pk(), key.sk()))
}

/// Checks every condition of `commit` against the cache before any is
/// applied, as a transaction would.
fn check(state: &State, commit: &Commit) -> Result<(), Refused> {
    let mut unknown = Vec::new();
    for w in commit.writes.iter().chain(&commit.then) {
        if w.condition == Condition::InsertOnce {
            continue;
        }
        let ok = match (w.condition, state.entries.get(&w.key)) {
            (_, None) => {
                unknown.push(w.key.clone());
                continue;
            }
            (Condition::Absent, Some(e)) => e.value.is_none(),
            (Condition::Version(v), Some(e)) => e.value.is_some() && e.version == v,
            (Condition::InsertOnce, Some(_)) => true,
        };
        if !ok {
            return Err(Refused::Conflict(conflict(&w.key)));
        }
    }
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(Refused::Unknown(unknown))
    }
}

/// Applies a commit whose conditions [`check`] passed.
fn apply(state: &mut State, commit: Commit) {
    let generation = state.generation;
    for w in commit.writes.into_iter().chain(commit.then) {
        let Write {
            key,
            condition,
            item,
            expires_at,
        } = w;
        match state.entries.get_mut(&key) {
            Some(e) if condition == Condition::InsertOnce && e.value.is_some() => {
                // Write-once items keep their first value.
                e.used = generation;
            }
            Some(e) => {
                // A write-once item loaded as absent first (an alert is
                // looked up before it is written) takes this first value.
                e.insert_once |= condition == Condition::InsertOnce;
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
                state.insert(
                    key,
                    Entry {
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
}

#[async_trait]
impl<S: RollupStore + RollupQuery> RollupStore for CachedStore<S> {
    async fn load(&self, keys: &[ItemKey]) -> Result<Vec<Option<LoadedItem>>, StoreError> {
        let mut out = Vec::with_capacity(keys.len());
        let mut missing = Vec::new();
        {
            let mut guard = self.lock();
            let state = &mut *guard;
            for (i, key) in keys.iter().enumerate() {
                match state.entries.get_mut(key) {
                    Some(entry) => {
                        entry.used = state.generation;
                        out.push(entry.loaded());
                    }
                    None => {
                        missing.push(i);
                        out.push(None);
                    }
                }
            }
        }
        if missing.is_empty() {
            return Ok(out);
        }
        let wanted: Vec<ItemKey> = missing.iter().map(|&i| keys[i].clone()).collect();
        let found = self.inner.load(&wanted).await?;
        let mut state = self.lock();
        let generation = state.generation;
        for ((i, key), stored) in missing.into_iter().zip(wanted).zip(found) {
            // A commit may have filled the entry while the lock was free;
            // what it wrote is newer than the inner store's.
            let entry = state.get_or_insert_with(key, || Entry::stored(stored, generation));
            entry.used = generation;
            out[i] = entry.loaded();
        }
        Ok(out)
    }

    async fn commit(&self, commit: Commit) -> Result<(), StoreError> {
        // Conditions are checked against the cache, so an item a writer did
        // not load first (processors always do) is fetched now.
        let unknown = {
            let mut state = self.lock();
            match check(&state, &commit) {
                Ok(()) => {
                    apply(&mut state, commit);
                    return Ok(());
                }
                Err(Refused::Conflict(e)) => return Err(e),
                Err(Refused::Unknown(keys)) => keys,
            }
        };
        self.load(&unknown).await?;
        let mut state = self.lock();
        match check(&state, &commit) {
            Ok(()) => {
                apply(&mut state, commit);
                Ok(())
            }
            Err(Refused::Conflict(e)) => Err(e),
            // Evicted since it was fetched above: reload and try again.
            Err(Refused::Unknown(keys)) => Err(conflict(&keys[0])),
        }
    }

    fn unflushed(&self) -> usize {
        self.dirty()
    }

    async fn flush(&self) -> Result<usize, StoreError> {
        self.flush_dirty().await
    }
}

#[cfg(test)]
mod tests;
