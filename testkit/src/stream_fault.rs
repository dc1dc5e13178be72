//! Fault injection for tests: wrappers that make any producer or reader fail,
//! partially fail, slow down or stall, at seeded rates and chosen points, the
//! way Kinesis and a flaky network do. Tests use them to show that nothing is
//! lost and nothing is counted twice when the stream misbehaves.
//!
//! - [`Dice`]: the seeded random source every wrapper draws its faults from.
//! - [`Gate`] and [`Stall`]: hold calls until a test releases them.
//! - [`StreamFaults`]: what to inject, shared by every wrapper built from it.
//! - [`FaultyProducer`]: wraps an `Arc<dyn StreamProducer>`.
//! - [`FaultyReader`]: wraps a `Box<dyn ShardReader>` (or any reader).
//! - [`Injected`]: how many faults were injected, for tests to assert on.
//!
//! Decisions are deterministic for a given seed and a given order of calls;
//! concurrent callers race for that order, so a test that needs exact outcomes
//! calls from one task.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use stream::{
    Lag, ProduceError, PutOutcome, PutRecord, ReadError, Record, SeqNo, ShardReader, StreamProducer,
};

/// The message of every injected failure, so logs tell them from real ones.
const INJECTED: &str = "injected fault";

/// A seeded random source that many tasks may draw from at once.
///
/// A SplitMix64 sequence of our own rather than a `rand` generator: the
/// faults a seed produces must not change when a dependency is upgraded.
#[derive(Debug)]
pub struct Dice {
    seed: u64,
    /// Draws so far: the sequence is indexed, so drawing needs no lock.
    draws: AtomicU64,
}

impl Dice {
    pub fn new(seed: u64) -> Self {
        Dice {
            seed,
            draws: AtomicU64::new(0),
        }
    }

    pub fn next_u64(&self) -> u64 {
        let n = self.draws.fetch_add(1, Ordering::Relaxed);
        let mut z = self
            .seed
            .wrapping_add(n.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// True with probability `p`; draws nothing when `p <= 0`, so a fault
    /// that is off leaves the other faults' sequence unchanged.
    pub fn chance(&self, p: f64) -> bool {
        if p <= 0.0 {
            return false;
        }
        // The top 53 bits as a float in [0, 1).
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        unit < p
    }

    /// A number in `0..n`; 0 when `n` is 0.
    pub fn below(&self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        // Modulo bias is below 2^-40 for the sizes tests use.
        self.next_u64() % n
    }

    /// A new source seeded from this one: one per call, so that a call's
    /// draws stay together when other calls run concurrently.
    pub fn fork(&self) -> Dice {
        Dice::new(self.next_u64())
    }
}

/// A seed mixed with a name, so that wrappers built in any order (one reader
/// per shard) draw independent, reproducible sequences.
pub fn seed_for(seed: u64, name: &str) -> u64 {
    // FNV-1a: stable across builds and platforms, unlike `DefaultHasher`.
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01B3);
    }
    seed ^ h
}

#[derive(Debug, Clone, Copy, Default)]
struct GateState {
    closed: bool,
    /// Calls waiting at the gate now: lets a test wait until a call is
    /// really stuck instead of sleeping.
    held: usize,
}

/// Holds calls while closed. Clones share one gate. Open when created.
#[derive(Debug, Clone)]
pub struct Gate {
    state: Arc<watch::Sender<GateState>>,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            state: Arc::new(watch::channel(GateState::default()).0),
        }
    }
}

impl Gate {
    pub fn new() -> Self {
        Self::default()
    }

    /// Calls arriving from now on wait until [`Gate::open`].
    pub fn close(&self) {
        self.state.send_modify(|s| s.closed = true);
    }

    /// Releases every waiting call and lets new ones through.
    pub fn open(&self) {
        self.state.send_modify(|s| s.closed = false);
    }

    pub fn is_closed(&self) -> bool {
        self.state.borrow().closed
    }

    /// How many calls are waiting at the gate now.
    pub fn held(&self) -> usize {
        self.state.borrow().held
    }

    /// Resolves once at least `n` calls are waiting at the gate.
    pub async fn wait_held(&self, n: usize) {
        let mut rx = self.state.subscribe();
        // The sender lives in `self`, so the wait cannot end in an error.
        let _ = rx.wait_for(|s| s.held >= n).await;
    }

    /// Waits while the gate is closed. Cancel safe: a dropped wait is no
    /// longer counted as held.
    pub async fn pass(&self) {
        if !self.is_closed() {
            return;
        }
        struct Held<'a>(&'a watch::Sender<GateState>);
        impl Drop for Held<'_> {
            fn drop(&mut self) {
                self.0.send_modify(|s| s.held -= 1);
            }
        }
        let mut rx = self.state.subscribe();
        self.state.send_modify(|s| s.held += 1);
        let _held = Held(&self.state);
        let _ = rx.wait_for(|s| !s.closed).await;
    }
}

/// Where a stalled call waits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StallPoint {
    /// Before the wrapped call: nothing has happened yet.
    #[default]
    Before,
    /// After the wrapped call succeeded: its effect is durable but the caller
    /// does not know yet, the window in which a crash or a timeout makes the
    /// caller retry something already done.
    After,
}

/// Holds one kind of call at a [`Gate`].
#[derive(Debug, Clone, Default)]
pub struct Stall {
    /// Calls wait here while it is closed; keep a clone to release them.
    pub gate: Gate,
    pub point: StallPoint,
    /// Close the gate when the call with this index (from 0, counted per
    /// wrapper) reaches `point`, so a test can stall exactly the n-th call
    /// without racing it.
    pub from_call: Option<u64>,
}

impl Stall {
    /// Called by a wrapper at `point` of its call number `call`: closes the
    /// gate if this is the call to stall from, then waits while it is closed.
    pub async fn at(&self, point: StallPoint, call: u64) {
        if point != self.point {
            return;
        }
        if self.from_call == Some(call) {
            self.gate.close();
        }
        self.gate.pass().await;
    }
}

/// What the stream wrappers inject. Rates are probabilities in `[0, 1]`;
/// the default injects nothing.
#[derive(Debug, Clone, Default)]
pub struct StreamFaults {
    pub seed: u64,
    /// Whole `put` calls that fail with `Unavailable`, nothing stored.
    pub put_unavailable: f64,
    /// Records that are not stored and come back `Failed { retryable: true }`,
    /// as in a Kinesis PutRecords partial failure.
    pub record_failed: f64,
    /// Records that are stored but come back `Failed { retryable: true }`:
    /// the ambiguous timeout after which a retry stores a duplicate.
    pub record_stored_but_failed: f64,
    /// Added to every `put`, as a throttled stream would.
    pub put_delay: Duration,
    pub put_stall: Stall,
    /// `next_batch` calls that fail with `ReadError::Io`, reading nothing.
    pub read_error: f64,
    /// `checkpoint` calls that fail with `ReadError::Io`, storing nothing.
    pub checkpoint_error: f64,
    /// Holds `next_batch` calls. They always wait before reading: records
    /// read and then held back would be lost to this reader if the wait were
    /// dropped, which is a fault of the wrapper, not of a stream.
    pub read_stall: Stall,
    pub checkpoint_stall: Stall,
    /// Shared by every wrapper built from this configuration and its clones;
    /// keep a clone to read the totals.
    pub injected: Arc<Injected>,
    /// Sees every record stored but reported failed: the stream now holds it
    /// once more than its sender meant to, and a test that checks exact
    /// counts downstream needs to know which records those were.
    pub on_stored_but_failed: Option<RecordObserver>,
}

/// A callback on records; see [`StreamFaults::on_stored_but_failed`].
#[derive(Clone)]
pub struct RecordObserver(pub Arc<dyn Fn(&PutRecord) + Send + Sync>);

impl std::fmt::Debug for RecordObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecordObserver")
    }
}

/// Counts of the faults injected so far.
#[derive(Debug, Default)]
pub struct Injected {
    pub put_unavailable: AtomicU64,
    pub record_failed: AtomicU64,
    pub record_stored_but_failed: AtomicU64,
    pub read_errors: AtomicU64,
    pub checkpoint_errors: AtomicU64,
}

/// A snapshot of [`Injected`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InjectedCounts {
    pub put_unavailable: u64,
    pub record_failed: u64,
    pub record_stored_but_failed: u64,
    pub read_errors: u64,
    pub checkpoint_errors: u64,
}

/// `$counts { field: $from.field, … }`, each counter read once: the
/// snapshot of a set of fault counters. A macro because it names fields.
macro_rules! counts {
    ($from:expr => $counts:ident { $($field:ident),* $(,)? }) => {
        $counts { $($field: $from.$field.load(std::sync::atomic::Ordering::Relaxed)),* }
    };
}
pub(crate) use counts;

impl Injected {
    pub fn snapshot(&self) -> InjectedCounts {
        counts!(self => InjectedCounts {
            put_unavailable, record_failed, record_stored_but_failed, read_errors, checkpoint_errors
        })
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// What happens to one record of a `put`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Put,
    Dropped,
    StoredButFailed,
}

/// A [`StreamProducer`] that injects [`StreamFaults`] around another.
pub struct FaultyProducer {
    inner: Arc<dyn StreamProducer>,
    faults: StreamFaults,
    dice: Dice,
    /// Numbers calls for [`Stall::from_call`].
    calls: AtomicU64,
}

impl std::fmt::Debug for FaultyProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyProducer")
            .field("faults", &self.faults)
            .finish_non_exhaustive()
    }
}

impl FaultyProducer {
    pub fn new(inner: Arc<dyn StreamProducer>, faults: StreamFaults) -> Self {
        FaultyProducer {
            inner,
            dice: Dice::new(seed_for(faults.seed, "producer")),
            faults,
            calls: AtomicU64::new(0),
        }
    }

    /// The same, as the trait object a pipeline takes.
    pub fn wrap(inner: Arc<dyn StreamProducer>, faults: StreamFaults) -> Arc<dyn StreamProducer> {
        Arc::new(Self::new(inner, faults))
    }
}

fn injected_failure(what: &str) -> PutOutcome {
    PutOutcome::Failed {
        retryable: true,
        message: format!("{INJECTED}: {what}"),
    }
}

#[async_trait]
impl StreamProducer for FaultyProducer {
    async fn put(&self, records: Vec<PutRecord>) -> Result<Vec<PutOutcome>, ProduceError> {
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        let dice = self.dice.fork();
        let f = &self.faults;
        if !f.put_delay.is_zero() {
            tokio::time::sleep(f.put_delay).await;
        }
        f.put_stall.at(StallPoint::Before, call).await;
        if dice.chance(f.put_unavailable) {
            bump(&f.injected.put_unavailable);
            return Err(ProduceError::Unavailable(format!(
                "{INJECTED}: stream unavailable"
            )));
        }
        let fates: Vec<Fate> = records
            .iter()
            .map(|_| {
                if dice.chance(f.record_failed) {
                    Fate::Dropped
                } else if dice.chance(f.record_stored_but_failed) {
                    Fate::StoredButFailed
                } else {
                    Fate::Put
                }
            })
            .collect();
        let kept: Vec<PutRecord> = records
            .into_iter()
            .zip(&fates)
            .filter(|(_, fate)| **fate != Fate::Dropped)
            .map(|(r, _)| r)
            .collect();
        // Kept only when someone watches for duplicates: most puts need no copy.
        let watched = f.on_stored_but_failed.as_ref().map(|_| kept.clone());
        let stored = if kept.is_empty() {
            Vec::new()
        } else {
            self.inner.put(kept).await?
        };
        f.put_stall.at(StallPoint::After, call).await;
        let mut stored = stored.into_iter();
        let mut kept = watched.iter().flatten();
        let outcomes = fates
            .into_iter()
            .map(|fate| {
                if fate == Fate::Dropped {
                    bump(&f.injected.record_failed);
                    return injected_failure("record not stored");
                }
                let record = kept.next();
                match stored.next() {
                    Some(PutOutcome::Stored { .. }) if fate == Fate::StoredButFailed => {
                        bump(&f.injected.record_stored_but_failed);
                        if let (Some(observe), Some(record)) = (&f.on_stored_but_failed, record) {
                            (observe.0)(record);
                        }
                        injected_failure("record stored but reported failed")
                    }
                    Some(outcome) => outcome,
                    // The inner producer broke its contract; say so rather
                    // than guess.
                    None => PutOutcome::Failed {
                        retryable: true,
                        message: "the wrapped producer returned too few outcomes".into(),
                    },
                }
            })
            .collect();
        Ok(outcomes)
    }
}

/// A [`ShardReader`] that injects [`StreamFaults`] around another.
pub struct FaultyReader<R = Box<dyn ShardReader>> {
    inner: R,
    faults: StreamFaults,
    dice: Dice,
    /// Numbers `next_batch` and `checkpoint` calls for [`Stall::from_call`].
    reads: u64,
    checkpoints: u64,
}

impl<R> std::fmt::Debug for FaultyReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyReader")
            .field("faults", &self.faults)
            .finish_non_exhaustive()
    }
}

impl<R: ShardReader> FaultyReader<R> {
    /// Each reader draws from a sequence of its own, seeded by the shard, so
    /// the faults of one shard do not depend on the others.
    pub fn new(inner: R, faults: StreamFaults) -> Self {
        let dice = Dice::new(seed_for(faults.seed, inner.shard_id()));
        FaultyReader {
            inner,
            faults,
            dice,
            reads: 0,
            checkpoints: 0,
        }
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl FaultyReader {
    /// The same, as the boxed reader a pipeline takes.
    pub fn wrap(inner: Box<dyn ShardReader>, faults: StreamFaults) -> Box<dyn ShardReader> {
        Box::new(Self::new(inner, faults))
    }
}

#[async_trait]
impl<R: ShardReader> ShardReader for FaultyReader<R> {
    fn shard_id(&self) -> &str {
        self.inner.shard_id()
    }

    async fn next_batch(&mut self, max: usize, wait: Duration) -> Result<Vec<Record>, ReadError> {
        let call = self.reads;
        self.reads += 1;
        let f = &self.faults;
        f.read_stall.at(f.read_stall.point, call).await;
        if self.dice.chance(f.read_error) {
            bump(&f.injected.read_errors);
            return Err(ReadError::Io(format!("{INJECTED}: read failed")));
        }
        self.inner.next_batch(max, wait).await
    }

    async fn checkpoint(&mut self, seq: SeqNo) -> Result<(), ReadError> {
        let call = self.checkpoints;
        self.checkpoints += 1;
        let f = &self.faults;
        f.checkpoint_stall.at(StallPoint::Before, call).await;
        if self.dice.chance(f.checkpoint_error) {
            bump(&f.injected.checkpoint_errors);
            return Err(ReadError::Io(format!("{INJECTED}: checkpoint failed")));
        }
        self.inner.checkpoint(seq).await?;
        f.checkpoint_stall.at(StallPoint::After, call).await;
        Ok(())
    }

    fn lag(&self) -> Lag {
        self.inner.lag()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use std::sync::Mutex;

    use bytes::Bytes;

    use super::*;
    use crate::MemoryProducer;

    /// A shard of `n` records, each batch one record.
    struct MemoryReader {
        next: u64,
        n: u64,
        checkpoint: Option<SeqNo>,
    }

    #[async_trait]
    impl ShardReader for MemoryReader {
        fn shard_id(&self) -> &str {
            "shard-0"
        }

        async fn next_batch(
            &mut self,
            _max: usize,
            _wait: Duration,
        ) -> Result<Vec<Record>, ReadError> {
            if self.next >= self.n {
                return Ok(Vec::new());
            }
            self.next += 1;
            Ok(vec![Record {
                seq: SeqNo::from(self.next),
                partition_key: "k".into(),
                data: Bytes::new(),
                arrival_ms: 0,
            }])
        }

        async fn checkpoint(&mut self, seq: SeqNo) -> Result<(), ReadError> {
            self.checkpoint = Some(seq);
            Ok(())
        }
    }

    fn records(n: usize) -> Vec<PutRecord> {
        (0..n)
            .map(|i| PutRecord {
                partition_key: format!("dev-{}", i % 7),
                data: Bytes::from(i.to_string()),
            })
            .collect()
    }

    fn faults(seed: u64) -> StreamFaults {
        StreamFaults {
            seed,
            put_unavailable: 0.1,
            record_failed: 0.1,
            record_stored_but_failed: 0.05,
            ..StreamFaults::default()
        }
    }

    /// Puts 1000 calls of 10 records; returns every outcome (None for a
    /// failed call) and what the inner producer stored.
    async fn run(seed: u64) -> (Vec<Option<Vec<PutOutcome>>>, Vec<PutRecord>, InjectedCounts) {
        let inner = Arc::new(MemoryProducer::default());
        let f = faults(seed);
        let p = FaultyProducer::new(inner.clone(), f.clone());
        let mut outcomes = Vec::new();
        for _ in 0..1000 {
            outcomes.push(p.put(records(10)).await.ok());
        }
        let stored = inner.records();
        (outcomes, stored, f.injected.snapshot())
    }

    #[tokio::test]
    async fn producer_rates_are_honoured_and_a_seed_repeats_itself() {
        let (outcomes, stored, counts) = run(7).await;
        let calls_failed = outcomes.iter().filter(|o| o.is_none()).count() as u64;
        assert_eq!(calls_failed, counts.put_unavailable);
        assert!((70..=130).contains(&calls_failed), "{calls_failed}");
        let records = (1000 - calls_failed) * 10;
        let within = |n: u64, p: f64| {
            let want = records as f64 * p;
            (n as f64 - want).abs() < want * 0.2
        };
        assert!(within(counts.record_failed, 0.1), "{counts:?}");
        // Drawn only for records that were not dropped.
        assert!(
            within(counts.record_stored_but_failed, 0.9 * 0.05),
            "{counts:?}"
        );
        let reported_failed: u64 = outcomes
            .iter()
            .flatten()
            .flatten()
            .filter(|o| {
                matches!(
                    o,
                    PutOutcome::Failed {
                        retryable: true,
                        ..
                    }
                )
            })
            .count() as u64;
        assert_eq!(
            reported_failed,
            counts.record_failed + counts.record_stored_but_failed
        );
        // Stored-but-failed records are stored; dropped ones are not.
        assert_eq!(stored.len() as u64, records - counts.record_failed);
        assert_eq!(run(7).await, (outcomes, stored, counts));
        assert_ne!(run(8).await.2, counts, "another seed, other faults");
    }

    #[tokio::test]
    async fn outcomes_line_up_with_the_records_put() {
        let inner = Arc::new(MemoryProducer::default());
        let p = FaultyProducer::new(
            inner.clone(),
            StreamFaults {
                record_failed: 0.5,
                ..StreamFaults::default()
            },
        );
        let put = records(200);
        let outcomes = p.put(put.clone()).await.unwrap();
        assert_eq!(outcomes.len(), 200);
        let stored = inner.records();
        let kept: Vec<_> = put
            .iter()
            .zip(&outcomes)
            .filter(|(_, o)| matches!(o, PutOutcome::Stored { .. }))
            .map(|(r, o)| {
                let PutOutcome::Stored { seq, .. } = o else {
                    unreachable!()
                };
                assert_eq!(
                    &stored[seq.to_u64().unwrap_or(0) as usize - 1],
                    r,
                    "outcome names another record"
                );
                r.clone()
            })
            .collect();
        assert_eq!(kept, stored);
        assert!((60..=140).contains(&kept.len()), "{}", kept.len());
    }

    #[tokio::test]
    async fn the_observer_sees_each_record_stored_but_reported_failed() {
        let inner = Arc::new(MemoryProducer::default());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let f = StreamFaults {
            seed: 9,
            record_failed: 0.2,
            record_stored_but_failed: 0.2,
            on_stored_but_failed: Some(RecordObserver(Arc::new({
                let seen = seen.clone();
                move |r: &PutRecord| seen.lock().unwrap().push(r.clone())
            }))),
            ..StreamFaults::default()
        };
        let p = FaultyProducer::new(inner.clone(), f.clone());
        let put = records(300);
        let outcomes = p.put(put.clone()).await.unwrap();
        let stored = inner.records();
        let want: Vec<PutRecord> = put
            .into_iter()
            .zip(&outcomes)
            .filter(|(r, o)| matches!(o, PutOutcome::Failed { .. }) && stored.contains(r))
            .map(|(r, _)| r)
            .collect();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen, want);
        assert_eq!(
            seen.len() as u64,
            f.injected.snapshot().record_stored_but_failed
        );
        assert!(seen.len() > 20, "{}", seen.len());
    }

    #[tokio::test]
    async fn a_stall_after_the_put_holds_a_stored_record_until_released() {
        let inner = Arc::new(MemoryProducer::default());
        let f = StreamFaults {
            put_stall: Stall {
                point: StallPoint::After,
                from_call: Some(1),
                ..Stall::default()
            },
            ..StreamFaults::default()
        };
        let gate = f.put_stall.gate.clone();
        let p = Arc::new(FaultyProducer::new(inner.clone(), f));
        p.put(records(1)).await.unwrap();
        let task = tokio::spawn({
            let p = p.clone();
            async move { p.put(records(2)).await }
        });
        tokio::time::timeout(Duration::from_secs(5), gate.wait_held(1))
            .await
            .unwrap();
        assert!(gate.is_closed());
        assert_eq!(inner.records().len(), 3, "stored before the stall");
        assert!(!task.is_finished());
        gate.open();
        let outcomes = task.await.unwrap().unwrap();
        assert_eq!(outcomes.len(), 2);
        assert_eq!(gate.held(), 0);
    }

    #[tokio::test]
    async fn a_throttled_put_takes_its_delay() {
        let p = FaultyProducer::new(
            Arc::new(MemoryProducer::default()),
            StreamFaults {
                put_delay: Duration::from_millis(30),
                ..StreamFaults::default()
            },
        );
        let started = std::time::Instant::now();
        assert_eq!(p.put(records(3)).await.unwrap().len(), 3);
        assert!(started.elapsed() >= Duration::from_millis(30));
    }

    #[tokio::test]
    async fn reader_faults_fail_calls_without_losing_records() {
        let f = StreamFaults {
            seed: 3,
            read_error: 0.2,
            checkpoint_error: 0.3,
            ..StreamFaults::default()
        };
        let inner: Box<dyn ShardReader> = Box::new(MemoryReader {
            next: 0,
            n: 500,
            checkpoint: None,
        });
        let mut reader = FaultyReader::new(inner, f.clone());
        let mut seen = Vec::new();
        let mut checkpoint_failures = 0;
        let mut calls = 0;
        while seen.len() < 500 {
            calls += 1;
            let Ok(batch) = reader.next_batch(10, Duration::ZERO).await else {
                continue;
            };
            for r in batch {
                seen.push(r.seq);
                while reader.checkpoint(r.seq).await.is_err() {
                    checkpoint_failures += 1;
                }
            }
        }
        assert_eq!(seen, (1..=500u64).map(SeqNo::from).collect::<Vec<SeqNo>>());
        let counts = f.injected.snapshot();
        assert_eq!(counts.read_errors, calls - 500);
        assert_eq!(counts.checkpoint_errors, checkpoint_failures);
        assert!((70..=180).contains(&counts.read_errors), "{counts:?}");
        assert!(
            (150..=300).contains(&counts.checkpoint_errors),
            "{counts:?}"
        );
    }

    #[tokio::test]
    async fn a_stalled_read_waits_and_a_dropped_wait_is_not_held() {
        let f = StreamFaults {
            read_stall: Stall {
                from_call: Some(0),
                ..Stall::default()
            },
            ..StreamFaults::default()
        };
        let gate = f.read_stall.gate.clone();
        let mut reader = FaultyReader::new(
            MemoryReader {
                next: 0,
                n: 1,
                checkpoint: None,
            },
            f,
        );
        {
            let read = reader.next_batch(1, Duration::ZERO);
            tokio::pin!(read);
            tokio::select! {
                biased;
                _ = &mut read => panic!("the read went through a closed gate"),
                _ = gate.wait_held(1) => {}
            }
        }
        assert_eq!(gate.held(), 0, "a dropped read is still counted");
        gate.open();
        let batch = reader.next_batch(1, Duration::ZERO).await.unwrap();
        assert_eq!(batch.len(), 1, "nothing was read while stalled");
        assert_eq!(reader.into_inner().next, 1);
    }

    #[test]
    fn dice_are_reproducible_and_roughly_uniform() {
        let a = Dice::new(42);
        let b = Dice::new(42);
        let xs: Vec<u64> = (0..100).map(|_| a.below(10)).collect();
        let ys: Vec<u64> = (0..100).map(|_| b.below(10)).collect();
        assert_eq!(xs, ys);
        let d = Dice::new(1);
        let hits = (0..100_000).filter(|_| d.chance(0.25)).count();
        assert!((24_000..=26_000).contains(&hits), "{hits}");
        assert!(!(0..1000).any(|_| d.chance(0.0)));
        assert!((0..1000).all(|_| d.chance(1.0)));
        assert_ne!(seed_for(1, "shard-0"), seed_for(1, "shard-1"));
    }
}
