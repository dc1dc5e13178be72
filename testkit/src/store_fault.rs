//! Fault injection for tests: [`FaultyStore`] wraps any rollup store and
//! makes loads and commits fail, fail halfway, conflict, slow down or stall,
//! at seeded rates, the way a remote store does under load. Tests use it to
//! show that a batch retried after any of these changes every rollup exactly
//! once.
//!
//! The seeded dice and the stall gates are the stream's
//! ([`crate::stream_fault`]), so one seed drives every wrapper alike.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::stream_fault::{Dice, Stall, StallPoint, counts, seed_for};
use async_trait::async_trait;
use schemas::state::Item;

use rollup::{Commit, LoadedItem};

use processors::store::{KeyedItem, Range, RollupQuery, RollupStore, Scan, StoreError};
use rollup::keys::ItemKey;

/// The message of every injected failure, so logs tell them from real ones.
const INJECTED: &str = "injected fault";

/// What [`FaultyStore`] injects. Rates are probabilities in `[0, 1]` per
/// call; the default injects nothing.
#[derive(Debug, Clone, Default)]
pub struct StoreFaults {
    pub seed: u64,
    /// Loads that fail with `Unavailable`.
    pub load_error: f64,
    /// Commits that fail with `Unavailable` before writing anything.
    pub commit_error_before: f64,
    /// Commits that write a prefix of their items and then fail with
    /// `Unavailable`: a store that stops or times out halfway through a
    /// batch. The prefix runs over `writes` and then `then`, as a real commit
    /// does, and has 1 to all items, so it includes a whole commit reported
    /// as failed.
    pub commit_error_partial: f64,
    /// Commits that fail with `Conflict` before writing anything, as if
    /// another process had written one of the items.
    pub conflict: f64,
    /// Added to every load and commit, as a throttled store would.
    pub delay: Duration,
    pub load_stall: Stall,
    /// With [`StallPoint::After`], holds a commit that is already durable.
    pub commit_stall: Stall,
    /// Shared by every wrapper built from this configuration and its clones;
    /// keep a clone to read the totals.
    pub injected: Arc<StoreInjected>,
}

/// Counts of the faults injected so far.
#[derive(Debug, Default)]
pub struct StoreInjected {
    pub load_errors: AtomicU64,
    pub commit_errors_before: AtomicU64,
    pub partial_commits: AtomicU64,
    /// Items written by partial commits before they failed.
    pub partial_writes: AtomicU64,
    pub conflicts: AtomicU64,
}

/// A snapshot of [`StoreInjected`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreInjectedCounts {
    pub load_errors: u64,
    pub commit_errors_before: u64,
    pub partial_commits: u64,
    pub partial_writes: u64,
    pub conflicts: u64,
}

impl StoreInjected {
    pub fn snapshot(&self) -> StoreInjectedCounts {
        counts!(self => StoreInjectedCounts {
            load_errors, commit_errors_before, partial_commits, partial_writes, conflicts
        })
    }
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// A [`RollupStore`] that injects [`StoreFaults`] around another; also a
/// [`RollupQuery`], passed through untouched, when the inner store is one.
pub struct FaultyStore<S: ?Sized = dyn RollupStore> {
    inner: Arc<S>,
    faults: StoreFaults,
    dice: Dice,
    /// Number loads and commits for [`Stall::from_call`].
    loads: AtomicU64,
    commits: AtomicU64,
}

impl<S: ?Sized> std::fmt::Debug for FaultyStore<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyStore")
            .field("faults", &self.faults)
            .finish_non_exhaustive()
    }
}

impl<S: ?Sized> FaultyStore<S> {
    pub fn new(inner: Arc<S>, faults: StoreFaults) -> Self {
        FaultyStore {
            inner,
            dice: Dice::new(seed_for(faults.seed, "store")),
            faults,
            loads: AtomicU64::new(0),
            commits: AtomicU64::new(0),
        }
    }

    /// What every call does first: numbers it in `calls`, draws its dice,
    /// waits out the delay and then `stall`'s hold before the inner call.
    async fn begin(&self, calls: &AtomicU64, stall: &Stall) -> (u64, Dice) {
        let call = calls.fetch_add(1, Ordering::Relaxed);
        let dice = self.dice.fork();
        if !self.faults.delay.is_zero() {
            tokio::time::sleep(self.faults.delay).await;
        }
        stall.at(StallPoint::Before, call).await;
        (call, dice)
    }
}

impl FaultyStore {
    /// The same, as the trait object a pipeline takes.
    pub fn wrap(inner: Arc<dyn RollupStore>, faults: StoreFaults) -> Arc<dyn RollupStore> {
        Arc::new(Self::new(inner, faults))
    }
}

/// The first `k` items of a commit, in the order a commit writes them.
fn prefix(mut commit: Commit, k: usize) -> Commit {
    let then = k.saturating_sub(commit.writes.len());
    commit.writes.truncate(k);
    commit.then.truncate(then);
    commit
}

fn unavailable(what: &str) -> StoreError {
    StoreError::Unavailable(format!("{INJECTED}: {what}"))
}

#[async_trait]
impl<S: RollupStore + ?Sized> RollupStore for FaultyStore<S> {
    async fn load(&self, keys: &[ItemKey]) -> Result<Vec<Option<LoadedItem>>, StoreError> {
        let f = &self.faults;
        let (call, dice) = self.begin(&self.loads, &f.load_stall).await;
        if dice.chance(f.load_error) {
            bump(&f.injected.load_errors, 1);
            return Err(unavailable("load failed"));
        }
        let loaded = self.inner.load(keys).await?;
        f.load_stall.at(StallPoint::After, call).await;
        Ok(loaded)
    }

    async fn commit(&self, commit: Commit) -> Result<(), StoreError> {
        let f = &self.faults;
        let (call, dice) = self.begin(&self.commits, &f.commit_stall).await;
        if dice.chance(f.commit_error_before) {
            bump(&f.injected.commit_errors_before, 1);
            return Err(unavailable("commit failed before any write"));
        }
        if dice.chance(f.commit_error_partial) && !commit.is_empty() {
            let total = commit.len();
            let k = 1 + dice.below(total as u64) as usize;
            self.inner.commit(prefix(commit, k)).await?;
            bump(&f.injected.partial_commits, 1);
            bump(&f.injected.partial_writes, k as u64);
            return Err(unavailable(&format!(
                "commit failed after {k} of {total} writes"
            )));
        }
        if dice.chance(f.conflict) {
            bump(&f.injected.conflicts, 1);
            let key = commit
                .writes
                .iter()
                .chain(&commit.then)
                .next()
                .map(|w| format!("{}/{}", w.key.pk(), w.key.sk()))
                .unwrap_or_default();
            return Err(StoreError::Conflict(format!("{key} ({INJECTED})")));
        }
        self.inner.commit(commit).await?;
        f.commit_stall.at(StallPoint::After, call).await;
        Ok(())
    }

    async fn flush(&self) -> Result<usize, StoreError> {
        // A failed flush is a failed commit seen later: nothing was lost, the
        // items stay dirty, and the checkpoint waits.
        if self.dice.fork().chance(self.faults.commit_error_before) {
            bump(&self.faults.injected.commit_errors_before, 1);
            return Err(unavailable("flush failed before any write"));
        }
        self.inner.flush().await
    }

    fn unflushed(&self) -> usize {
        self.inner.unflushed()
    }
}

#[async_trait]
impl<S: RollupQuery + ?Sized> RollupQuery for FaultyStore<S> {
    async fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>, StoreError> {
        self.inner.get(pk, sk).await
    }

    async fn range(&self, range: Range) -> Result<Vec<(String, Item)>, StoreError> {
        self.inner.range(range).await
    }

    async fn scan_prefix(&self, scan: Scan) -> Result<Vec<KeyedItem>, StoreError> {
        self.inner.scan_prefix(scan).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use std::collections::BTreeSet;

    use crate::stream_fault::Gate;

    use super::*;
    use crate::store_conformance;
    use processors::store::memory::MemoryStore;
    use rollup::keys::COUNTER_PK;
    use rollup::{Condition, Write};

    fn write(name: &str) -> Write {
        store_conformance::write(store_conformance::counter("s", name), Condition::Absent, 1)
    }

    /// Five writes and three `then` writes, named in commit order.
    fn commit(tag: &str) -> (Commit, Vec<String>) {
        let names: Vec<String> = (0..8).map(|i| format!("{tag}-{i}")).collect();
        let commit = Commit {
            writes: names[..5].iter().map(|n| write(n)).collect(),
            then: names[5..].iter().map(|n| write(n)).collect(),
        };
        (commit, names)
    }

    fn stored_names(store: &MemoryStore) -> BTreeSet<String> {
        store
            .dump()
            .into_iter()
            .map(|((_, sk), _)| sk.trim_start_matches("s|").to_string())
            .collect()
    }

    #[tokio::test]
    async fn a_partial_commit_applies_exactly_a_prefix() {
        let inner = Arc::new(MemoryStore::new());
        let faults = StoreFaults {
            seed: 5,
            commit_error_partial: 1.0,
            ..StoreFaults::default()
        };
        let store = FaultyStore::new(inner.clone(), faults.clone());
        let mut prefixes = BTreeSet::new();
        let mut written = BTreeSet::new();
        for round in 0..40 {
            let tag = format!("r{round}");
            let (commit, names) = commit(&tag);
            let err = store.commit(commit).await.unwrap_err();
            assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
            let now = stored_names(&inner);
            let new: BTreeSet<String> = now.difference(&written).cloned().collect();
            let k = new.len();
            assert!((1..=8).contains(&k), "{k}");
            assert_eq!(
                new,
                names[..k].iter().cloned().collect::<BTreeSet<_>>(),
                "round {round} did not write a prefix"
            );
            prefixes.insert(k);
            written = now;
        }
        // Prefixes that stop inside `writes`, inside `then`, and the whole.
        assert!(
            prefixes.contains(&8) && prefixes.iter().any(|k| *k < 5),
            "{prefixes:?}"
        );
        assert!(prefixes.iter().any(|k| (6..8).contains(k)), "{prefixes:?}");
        let counts = faults.injected.snapshot();
        assert_eq!(counts.partial_commits, 40);
        assert_eq!(counts.partial_writes, written.len() as u64);
    }

    /// Counts the items it is asked to write, and nothing else: cheap enough
    /// for thousands of commits.
    #[derive(Default)]
    struct CountingStore {
        writes: AtomicU64,
    }

    #[async_trait]
    impl RollupStore for CountingStore {
        async fn load(&self, keys: &[ItemKey]) -> Result<Vec<Option<LoadedItem>>, StoreError> {
            Ok(vec![None; keys.len()])
        }

        async fn commit(&self, commit: Commit) -> Result<(), StoreError> {
            bump(&self.writes, commit.len() as u64);
            Ok(())
        }
    }

    /// 2000 one-write commits; returns which ones failed, the counts and how
    /// many items reached the inner store.
    async fn run(seed: u64) -> (Vec<bool>, StoreInjectedCounts, u64) {
        let inner = Arc::new(CountingStore::default());
        let faults = StoreFaults {
            seed,
            commit_error_before: 0.1,
            commit_error_partial: 0.1,
            conflict: 0.05,
            ..StoreFaults::default()
        };
        let store = FaultyStore::new(inner.clone(), faults.clone());
        let mut failed = Vec::new();
        for i in 0..2000 {
            let c = Commit {
                writes: vec![write(&i.to_string())],
                then: Vec::new(),
            };
            failed.push(store.commit(c).await.is_err());
        }
        let stored = inner.writes.load(Ordering::Relaxed);
        (failed, faults.injected.snapshot(), stored)
    }

    #[tokio::test]
    async fn commit_rates_are_honoured_and_a_seed_repeats_itself() {
        let (failed, counts, stored) = run(11).await;
        let within = |n: u64, want: f64| (n as f64 - want).abs() < want * 0.2;
        assert!(within(counts.commit_errors_before, 200.0), "{counts:?}");
        assert!(within(counts.partial_commits, 0.9 * 200.0), "{counts:?}");
        assert!(within(counts.conflicts, 0.81 * 100.0), "{counts:?}");
        let n_failed = failed.iter().filter(|f| **f).count() as u64;
        assert_eq!(
            n_failed,
            counts.commit_errors_before + counts.partial_commits + counts.conflicts
        );
        // A one-write partial commit is the whole commit, reported failed.
        assert_eq!(counts.partial_writes, counts.partial_commits);
        assert_eq!(
            stored,
            2000 - counts.commit_errors_before - counts.conflicts
        );
        assert_eq!(run(11).await, (failed, counts, stored));
        assert_ne!(run(12).await.1, counts);
    }

    #[tokio::test]
    async fn load_errors_and_conflicts_change_nothing() {
        let inner = Arc::new(MemoryStore::new());
        let faults = StoreFaults {
            seed: 2,
            load_error: 0.3,
            conflict: 1.0,
            ..StoreFaults::default()
        };
        let store = FaultyStore::new(inner.clone(), faults.clone());
        let keys = [write("a").key];
        let mut errors = 0;
        for _ in 0..1000 {
            match store.load(&keys).await {
                Ok(items) => assert!(items[0].is_none()),
                Err(StoreError::Unavailable(_)) => errors += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(faults.injected.snapshot().load_errors, errors);
        assert!((240..=360).contains(&errors), "{errors}");
        let err = store.commit(commit("c").0).await.unwrap_err();
        let StoreError::Conflict(key) = err else {
            panic!("{err}")
        };
        assert!(key.starts_with(COUNTER_PK), "{key}");
        assert!(inner.dump().is_empty());
        // The query side passes through.
        inner.commit(commit("q").0).await.unwrap();
        let sk = write("q-0").key.sk();
        assert!(store.get(COUNTER_PK, &sk).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_commit_stalled_after_writing_is_durable_but_unanswered() {
        let inner = Arc::new(MemoryStore::new());
        let gate = Gate::new();
        let store = Arc::new(FaultyStore::new(
            inner.clone(),
            StoreFaults {
                commit_stall: Stall {
                    gate: gate.clone(),
                    point: StallPoint::After,
                    from_call: Some(0),
                },
                ..StoreFaults::default()
            },
        ));
        let task = tokio::spawn({
            let store = store.clone();
            async move { store.commit(commit("a").0).await }
        });
        tokio::time::timeout(Duration::from_secs(5), gate.wait_held(1))
            .await
            .unwrap();
        assert_eq!(inner.dump().len(), 8);
        assert!(!task.is_finished());
        gate.open();
        task.await.unwrap().unwrap();
    }
}
