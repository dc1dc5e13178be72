//! The flush: the dirty items, copied a chunk at a time, written to the
//! inner store in transactions of at most [`FLUSH_TRANSACTION`] items.
//!
//! At a fleet's shape a flush writes every device's items, 14–18 MB of
//! SQLite pages at 19,000 devices; in one transaction the log's
//! `fdatasync`s wait behind that one sync, and the endpoint's PUBACKs
//! behind them. Smaller transactions let go of the SQLite writer (and the
//! disk) between them.
//!
//! A flush that fails part way is still safe: every item carries the
//! stream positions it holds, so a replay skips what a written transaction
//! holds and applies the rest; and the shard loop checkpoints a batch only
//! once a whole flush that started after it succeeded. What the order of
//! the transactions keeps is the order a [`Commit`] promises: every plain
//! write before the items written last (spans hold the dedup sets, a
//! device item drops a pending window only once its compacted item is
//! written), and the watermarks after those, since a watermark moves only
//! once everything below it is written.

use std::ops::Bound;

use rollup::keys::ItemKey;
use rollup::{Commit, Condition, Write};

use super::entries::Id;
use super::{CachedStore, RollupQuery, RollupStore, StoreError};

/// Cache entries a flush looks at per hold of the lock.
pub(super) const FLUSH_CHUNK: usize = 4096;

/// Items per transaction of the inner store.
pub(super) const FLUSH_TRANSACTION: usize = 4096;

/// The writes of a flush as the inner store's transactions, in the order
/// they must be written.
pub(super) fn transactions(commit: Commit) -> Vec<Vec<Write>> {
    let Commit { writes, mut then } = commit;
    // A stable sort: the watermarks move to the end, the rest keep their
    // (pk, sk) order, which is the inner store's B-tree order.
    then.sort_by_key(|w| matches!(w.key, ItemKey::Watermark { .. }));
    let mut out = Vec::new();
    for group in [writes, then] {
        let mut rest = group.into_iter().peekable();
        while rest.peek().is_some() {
            out.push(rest.by_ref().take(FLUSH_TRANSACTION).collect());
        }
    }
    out
}

impl<S: RollupStore + RollupQuery> CachedStore<S> {
    /// Moves up to [`FLUSH_CHUNK`] entries' worth of dirty items after
    /// `after` (from the start if `None`) into `commit`, marking them clean.
    /// Returns where to go on from, or `None` once the end of the cache is
    /// reached.
    fn take_dirty(&self, after: Option<Id>, commit: &mut Commit) -> Option<Id> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let start = match after {
            Some(id) => Bound::Excluded(id),
            None => Bound::Unbounded,
        };
        let mut taken = 0;
        let mut visited = 0;
        let mut last = None;
        for (id, key) in state.order.range((start, Bound::Unbounded)) {
            if visited == FLUSH_CHUNK {
                break;
            }
            visited += 1;
            last = Some(id);
            let Some(e) = state.entries.get_mut(key) else {
                continue;
            };
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
                key: key.clone(),
                condition,
                item,
                expires_at: e.expires_at,
            };
            if key.is_written_last() {
                commit.then.push(write);
            } else {
                commit.writes.push(write);
            }
        }
        let next = (visited == FLUSH_CHUNK).then(|| last.cloned()).flatten();
        state.dirty -= taken;
        next
    }

    /// Records that the inner store now holds `written`: its version of
    /// each is the one its write was conditional on, plus one.
    fn written(&self, written: &[(ItemKey, Condition)]) {
        let mut state = self.lock();
        for (key, condition) in written {
            if let Some(entry) = state.entries.get_mut(key) {
                entry.inner_version = match condition {
                    Condition::InsertOnce => None,
                    Condition::Absent => Some(1),
                    Condition::Version(v) => Some(v + 1),
                };
            }
        }
    }

    /// Marks the items of writes that did not reach the inner store dirty
    /// again, for the next flush: nothing is lost.
    fn not_written<'a>(&self, keys: impl Iterator<Item = &'a ItemKey>) {
        let mut guard = self.lock();
        let state = &mut *guard;
        let mut again = 0;
        for key in keys {
            if let Some(entry) = state.entries.get_mut(key)
                && !entry.dirty
            {
                entry.dirty = true;
                again += 1;
            }
        }
        state.dirty += again;
    }

    /// Writes every dirty item to the inner store; see the module's
    /// overview. Returns the items written.
    pub(super) async fn flush_dirty(&self) -> Result<usize, StoreError> {
        let _one = self.flushing.lock().await;
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
            after = self.take_dirty(after, &mut commit);
            if after.is_none() {
                break;
            }
            tokio::task::yield_now().await;
        }
        let mut written = 0;
        let mut transactions = transactions(commit).into_iter();
        while let Some(writes) = transactions.next() {
            let done: Vec<(ItemKey, Condition)> = writes
                .iter()
                .map(|w| (w.key.clone(), w.condition))
                .collect();
            let transaction = Commit {
                writes,
                then: Vec::new(),
            };
            if let Err(e) = self.inner.commit(transaction).await {
                let rest: Vec<Vec<Write>> = transactions.collect();
                self.not_written(
                    done.iter()
                        .map(|(key, _)| key)
                        .chain(rest.iter().flatten().map(|w| &w.key)),
                );
                return Err(e);
            }
            self.written(&done);
            written += done.len();
        }
        let mut state = self.lock();
        state.generation += 1;
        state.evict(self.config.idle_flushes, self.config.max_items);
        Ok(written)
    }
}
