//! An in-memory [`StreamProducer`] for tests: it keeps what it stores, and can
//! be held, made unavailable or told to fail chosen records, so tests can
//! prove that nothing is acknowledged before it is stored.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use stream::{ProduceError, PutOutcome, PutRecord, StreamProducer};
use tokio::sync::watch;

#[derive(Debug, Default)]
struct State {
    records: Vec<PutRecord>,
    puts: usize,
    unavailable: bool,
    /// Record data → (failures left, retryable).
    failing: HashMap<Vec<u8>, (usize, bool)>,
}

/// A producer backed by a `Vec` behind a mutex.
#[derive(Debug)]
pub struct MemoryProducer {
    state: Mutex<State>,
    /// While `true`, `put` waits: the test decides when records become durable.
    held: watch::Sender<bool>,
    /// Records stored so far, for tests to wait on.
    stored: watch::Sender<usize>,
    /// `put` calls begun so far, for tests to wait on.
    begun: watch::Sender<usize>,
    /// What [`StreamProducer::max_puts_in_order`] claims. Held puts resume in
    /// any order, so a test that claims more than 1 must not hold two puts of
    /// one key.
    puts_in_order: usize,
}

impl Default for MemoryProducer {
    fn default() -> Self {
        MemoryProducer {
            state: Mutex::default(),
            held: watch::Sender::new(false),
            stored: watch::Sender::new(0),
            begun: watch::Sender::new(0),
            puts_in_order: 1,
        }
    }
}

/// A wait in a test ran out of time.
#[derive(Debug, thiserror::Error)]
#[error("timed out waiting for {0}")]
pub struct Timeout(pub String);

impl MemoryProducer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Lets callers run `n` puts at once.
    pub fn with_puts_in_order(mut self, n: usize) -> Self {
        self.puts_in_order = n;
        self
    }

    /// Makes `put` wait until [`release`](Self::release).
    pub fn hold(&self) {
        self.held.send_replace(true);
    }

    pub fn release(&self) {
        self.held.send_replace(false);
    }

    /// While set, `put` fails with [`ProduceError::Unavailable`].
    pub fn set_unavailable(&self, unavailable: bool) {
        self.lock().unavailable = unavailable;
    }

    /// The record whose data is `data` gets a retryable `Failed` outcome the
    /// next `times` times it is put.
    pub fn fail_record(&self, data: impl AsRef<[u8]>, times: usize) {
        self.lock()
            .failing
            .insert(data.as_ref().to_vec(), (times, true));
    }

    /// The record whose data is `data` is always refused, not retryably.
    pub fn fail_record_permanently(&self, data: impl AsRef<[u8]>) {
        self.lock()
            .failing
            .insert(data.as_ref().to_vec(), (usize::MAX, false));
    }

    pub fn records(&self) -> Vec<PutRecord> {
        self.lock().records.clone()
    }

    /// Stored records' data, lossily as text.
    pub fn data(&self) -> Vec<String> {
        self.lock()
            .records
            .iter()
            .map(|r| String::from_utf8_lossy(&r.data).into_owned())
            .collect()
    }

    /// `put` calls that returned.
    pub fn puts(&self) -> usize {
        self.lock().puts
    }

    /// `put` calls begun so far, returned or not.
    pub fn puts_begun(&self) -> usize {
        *self.begun.borrow()
    }

    /// Waits until at least `n` records are stored.
    pub async fn wait_stored(&self, n: usize, within: Duration) -> Result<(), Timeout> {
        wait_count(&self.stored, n, within, "stored records").await
    }

    /// Waits until at least `n` `put` calls have begun (and, if held, are
    /// waiting).
    pub async fn wait_puts_begun(&self, n: usize, within: Duration) -> Result<(), Timeout> {
        wait_count(&self.begun, n, within, "puts").await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl StreamProducer for MemoryProducer {
    fn max_puts_in_order(&self) -> usize {
        self.puts_in_order
    }

    async fn put(&self, records: Vec<PutRecord>) -> Result<Vec<PutOutcome>, ProduceError> {
        self.begun.send_modify(|n| *n += 1);
        let mut held = self.held.subscribe();
        // The sender lives in `self`, so the wait can only end by release.
        let _ = held.wait_for(|h| !*h).await;
        let mut state = self.lock();
        state.puts += 1;
        if state.unavailable {
            return Err(ProduceError::Unavailable(
                "held unavailable by the test".into(),
            ));
        }
        let mut outcomes = Vec::with_capacity(records.len());
        for record in records {
            if let Some((left, retryable)) = state.failing.get_mut(record.data.as_ref())
                && *left > 0
            {
                *left -= 1;
                outcomes.push(PutOutcome::Failed {
                    retryable: *retryable,
                    message: "failed by the test".into(),
                });
                continue;
            }
            state.records.push(record);
            let seq = state.records.len() as u64;
            outcomes.push(PutOutcome::Stored {
                shard: "shardId-000000000000".into(),
                seq: seq.into(),
            });
        }
        let n = state.records.len();
        drop(state);
        self.stored.send_replace(n);
        Ok(outcomes)
    }
}

/// Waits until `count` reaches `n`, or `within` passes.
async fn wait_count(
    count: &watch::Sender<usize>,
    n: usize,
    within: Duration,
    what: &str,
) -> Result<(), Timeout> {
    let mut rx = count.subscribe();
    tokio::time::timeout(within, rx.wait_for(|c| *c >= n))
        .await
        .map(drop)
        .map_err(|_| Timeout(format!("{n} {what}")))
}
