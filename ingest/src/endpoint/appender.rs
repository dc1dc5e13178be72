//! Group commit: one task gathers records from every connection into
//! batches and puts each batch into the stream once, then tells each
//! connection which of its records are durable.
//!
//! Several puts may be in flight at once, as many as the stream can take
//! while keeping each partition key's records in call order (see
//! [`StreamProducer::max_puts_in_order`]): a record then waits only for its
//! own put, not also for the one ahead of it. Records arriving while every
//! slot is busy gather into the next batch, which is where batching comes
//! from under load.
//!
//! A record the stream did not store is retried with backoff, in its batch's
//! retry loop. A device's records enter the stream in the order they arrived,
//! barring a partial failure: the stream may already have stored later
//! records, from the same batch or from a batch in flight behind it. That is
//! the reordering Kinesis producers show, and one the processors tolerate.
//! Nothing is reported durable that the stream did not report `Stored`.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use stream::{ProduceError, PutOutcome, PutRecord, StreamProducer};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;

use super::mailbox::{Completion, Mailbox, Reasons};
use super::tap::{TapHub, TapMessage};
use crate::config::GroupCommit;
use crate::metrics::{IngestMetrics, add, bump};

/// Records from one connection, in the order its session made them.
#[derive(Debug)]
pub(crate) struct AppendRequest {
    pub items: Vec<AppendItem>,
    /// Where the items' fate is reported: the connection that sent them.
    pub reply: Arc<Mailbox>,
}

#[derive(Debug)]
pub(crate) struct AppendItem {
    /// The session's token, echoed back in the [`Completion`].
    pub token: u64,
    pub record: PutRecord,
    /// Accepted telemetry to show live subscribers once stored; `None` when
    /// nobody subscribes or the message was refused.
    pub tap: Option<TapMessage>,
}

/// Runs until every sender of `requests` is gone and every batch is settled.
/// Once `abandon` is cancelled, records the stream has not stored are given
/// up on instead of retried.
///
/// Puts keep a `commit_interval` cadence: a record arriving after a quiet
/// spell is put at once, and under load records gather until the next slot,
/// one interval after the previous put began. Slots follow each other by the
/// interval however late the timer fires (it ticks in whole milliseconds), so
/// the stream sees one put per interval on average and no record waits much
/// longer than the interval for its put to start. A zero interval puts
/// whenever a slot is free, and so does any interval while fewer than
/// `commit_interval_min_connections` connections are open.
pub(crate) async fn run(
    mut requests: mpsc::UnboundedReceiver<AppendRequest>,
    producer: Arc<dyn StreamProducer>,
    config: GroupCommit,
    metrics: Arc<IngestMetrics>,
    tap: Arc<TapHub>,
    abandon: CancellationToken,
) {
    let slots = config
        .max_puts_in_flight
        .min(producer.max_puts_in_order())
        .max(1);
    let mut in_flight = FuturesUnordered::new();
    let mut open = true;
    let mut batch = Batch::default();
    let mut due = Instant::now();
    let mut last_slot: Option<Instant> = None;
    loop {
        let ready = batch.is_full(&config) || !open || due <= Instant::now();
        if !batch.is_empty() && ready && in_flight.len() < slots {
            let mut put = Box::pin(commit(
                std::mem::take(&mut batch),
                &*producer,
                &config,
                &metrics,
                &tap,
                &abandon,
            ));
            // The stream keeps a key's records in the order puts reach it, so
            // this put must reach it before any later one: poll it now, ahead
            // of the next.
            if futures::poll!(put.as_mut()).is_pending() {
                in_flight.push(put);
            }
            continue;
        }
        if !open && batch.is_empty() {
            while in_flight.next().await.is_some() {}
            return;
        }
        let gathering = open && !batch.is_full(&config);
        let waiting_for_due = !batch.is_empty() && !ready;
        tokio::select! {
            biased;
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            r = requests.recv(), if gathering => match r {
                Some(first) => {
                    if batch.is_empty() {
                        let now = Instant::now();
                        let interval = if metrics.connections_current.load(Relaxed)
                            >= config.commit_interval_min_connections
                        {
                            config.commit_interval
                        } else {
                            Duration::ZERO
                        };
                        due = last_slot
                            .map(|t| t + interval)
                            .filter(|next| *next > now)
                            .unwrap_or(now);
                        last_slot = Some(due);
                    }
                    batch.push(first);
                    // Whatever is queued already joins the batch.
                    while !batch.is_full(&config) {
                        match requests.try_recv() {
                            Ok(r) => batch.push(r),
                            Err(_) => break,
                        }
                    }
                }
                None => open = false,
            },
            _ = sleep_until(due), if waiting_for_due => {}
        }
    }
}

#[derive(Default)]
struct Batch {
    requests: Vec<AppendRequest>,
    records: usize,
    bytes: usize,
}

impl Batch {
    fn push(&mut self, r: AppendRequest) {
        self.records += r.items.len();
        self.bytes += r.items.iter().map(|i| i.record.data.len()).sum::<usize>();
        self.requests.push(r);
    }

    fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }

    fn is_full(&self, config: &GroupCommit) -> bool {
        // A zero limit would put empty batches: one record or byte at least.
        self.records >= config.commit_max_records.max(1)
            || self.bytes >= config.commit_max_bytes.max(1)
    }
}

/// Where one record sits in a batch: request index, item index.
type Slot = (usize, usize);

async fn commit(
    batch: Batch,
    producer: &dyn StreamProducer,
    config: &GroupCommit,
    metrics: &IngestMetrics,
    tap: &TapHub,
    abandon: &CancellationToken,
) {
    let requests = batch.requests;
    let mut todo: Vec<Slot> = requests
        .iter()
        .enumerate()
        .flat_map(|(r, req)| (0..req.items.len()).map(move |i| (r, i)))
        .collect();
    let mut backoff = config.retry_backoff_min;
    while !todo.is_empty() {
        let records: Vec<PutRecord> = todo
            .iter()
            .map(|&(r, i)| requests[r].items[i].record.clone())
            .collect();
        bump(&metrics.appends);
        let started = Instant::now();
        let result = tokio::select! {
            r = producer.put(records) => Some(r),
            // A put that never returns must not hold shutdown forever; its
            // records count as not stored.
            _ = abandon.cancelled() => None,
        };
        metrics.append_latency.record(started.elapsed());

        todo = settle(
            &requests,
            &todo,
            result,
            metrics,
            tap,
            abandon.is_cancelled(),
        );
        if !todo.is_empty() {
            tokio::select! {
                _ = sleep(backoff) => {}
                _ = abandon.cancelled() => {}
            }
            backoff = (backoff * 2).min(config.retry_backoff_max);
        }
    }
}

/// Reports what one put did with the records at `todo` to their
/// connections and returns those to put again. Once `abandoned`, none are.
fn settle(
    requests: &[AppendRequest],
    todo: &[Slot],
    result: Option<Result<Vec<PutOutcome>, ProduceError>>,
    metrics: &IngestMetrics,
    tap: &TapHub,
    abandoned: bool,
) -> Vec<Slot> {
    let mut deliveries = Deliveries::new(requests);
    let mut retry = Vec::new();
    let mut stored_taps = Vec::new();
    let mut record = |slot: Slot, outcome: Settled| {
        let (r, i) = slot;
        match outcome {
            Settled::Stored => {
                deliveries.deliver(slot, true);
                if let Some(t) = &requests[r].items[i].tap {
                    stored_taps.push(t.clone());
                }
            }
            Settled::Retry => retry.push(slot),
            Settled::Failed => deliveries.deliver(slot, false),
        }
    };
    match result {
        Some(Ok(outcomes)) => {
            for (k, slot) in todo.iter().enumerate() {
                record(*slot, Settled::from_outcome(outcomes.get(k)));
            }
        }
        Some(Err(ProduceError::Unavailable(message))) => {
            tracing::warn!(records = todo.len(), %message, "The stream is unavailable; the batch will be retried.");
            todo.iter().for_each(|s| record(*s, Settled::Retry));
        }
        Some(Err(ProduceError::Closed)) => {
            tracing::error!(
                records = todo.len(),
                "The stream is closed; records are not stored and stay unacknowledged."
            );
            todo.iter().for_each(|s| record(*s, Settled::Failed));
        }
        None => todo.iter().for_each(|s| record(*s, Settled::Retry)),
    }
    add(&metrics.append_failures, retry.len() as u64);
    if !retry.is_empty() && abandoned {
        tracing::warn!(
            records = retry.len(),
            "Shutdown ran out of time; records the stream did not store stay unacknowledged."
        );
        for slot in retry.drain(..) {
            deliveries.deliver(slot, false);
        }
    }

    add(&metrics.records_appended, deliveries.stored as u64);
    add(&metrics.append_abandoned, deliveries.failed as u64);
    tap.publish(&stored_taps, metrics);
    // A closed connection's mailbox takes its outcomes and nobody reads
    // them.
    deliveries.raise();
    retry
}

/// Hands one put's outcomes to the requests' mailboxes: one lock for each
/// run of a request's records (a batch holds them in request order), and
/// one wake for each request once the put is settled.
struct Deliveries<'a> {
    requests: &'a [AppendRequest],
    /// The request whose mailbox is open, and its outcomes.
    open: Option<(usize, std::sync::MutexGuard<'a, Completion>)>,
    /// Requests given outcomes, each at least once.
    touched: Vec<usize>,
    stored: usize,
    failed: usize,
}

impl<'a> Deliveries<'a> {
    fn new(requests: &'a [AppendRequest]) -> Self {
        Deliveries {
            requests,
            open: None,
            touched: Vec::new(),
            stored: 0,
            failed: 0,
        }
    }

    fn deliver(&mut self, (r, i): Slot, stored: bool) {
        let token = self.requests[r].items[i].token;
        let mailbox = &self.requests[r].reply;
        let outcomes = match &mut self.open {
            Some((open, outcomes)) if Arc::ptr_eq(&self.requests[*open].reply, mailbox) => outcomes,
            _ => {
                // Unlocked before the next is locked: requests of one
                // connection (or the bridge's) share a mailbox.
                self.open = None;
                self.touched.push(r);
                &mut self.open.insert((r, mailbox.outcomes())).1
            }
        };
        if stored {
            outcomes.stored.push(token);
            self.stored += 1;
        } else {
            outcomes.failed.push(token);
            self.failed += 1;
        }
    }

    /// Wakes every connection given outcomes.
    fn raise(mut self) {
        self.open = None;
        // A request met again (in the abandoned retries) is woken once; a
        // mailbox shared by several requests may be woken more than once,
        // which costs a spurious wake and nothing else.
        self.touched.sort_unstable();
        self.touched.dedup();
        for &r in &self.touched {
            self.requests[r].reply.raise(Reasons::DURABLE);
        }
    }
}

enum Settled {
    Stored,
    Retry,
    Failed,
}

impl Settled {
    fn from_outcome(outcome: Option<&PutOutcome>) -> Self {
        match outcome {
            Some(PutOutcome::Stored { .. }) => Settled::Stored,
            Some(PutOutcome::Failed {
                retryable: false,
                message,
            }) => {
                tracing::error!(%message, "The stream refused a record for good; it stays unacknowledged.");
                Settled::Failed
            }
            // A missing outcome is a short answer from the backend: not
            // stored as far as anyone can tell.
            Some(PutOutcome::Failed { .. }) | None => Settled::Retry,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MemoryProducer;
    use bytes::Bytes;
    use std::time::Duration;

    fn config() -> GroupCommit {
        GroupCommit {
            commit_interval: Duration::from_millis(2),
            commit_interval_min_connections: 0,
            commit_max_records: 3,
            commit_max_bytes: 1 << 20,
            max_puts_in_flight: 4,
            retry_backoff_min: Duration::from_millis(10),
            retry_backoff_max: Duration::from_millis(40),
        }
    }

    fn item(token: u64, key: &str) -> AppendItem {
        AppendItem {
            token,
            record: PutRecord {
                partition_key: key.into(),
                data: Bytes::from(format!("{key}-{token}")),
            },
            tap: None,
        }
    }

    struct Harness {
        tx: mpsc::UnboundedSender<AppendRequest>,
        producer: Arc<MemoryProducer>,
        metrics: Arc<IngestMetrics>,
        abandon: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    fn start() -> Harness {
        start_with(MemoryProducer::default())
    }

    fn start_with(producer: MemoryProducer) -> Harness {
        start_configured(producer, config())
    }

    fn start_configured(producer: MemoryProducer, config: GroupCommit) -> Harness {
        let (tx, rx) = mpsc::unbounded_channel();
        let producer = Arc::new(producer);
        let metrics = Arc::new(IngestMetrics::new());
        let abandon = CancellationToken::new();
        let task = tokio::spawn(run(
            rx,
            producer.clone(),
            config,
            metrics.clone(),
            Arc::new(TapHub::default()),
            abandon.clone(),
        ));
        Harness {
            tx,
            producer,
            metrics,
            abandon,
            task,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_put_per_batch_and_every_record_reported() {
        let h = start();
        let (first, second) = (Mailbox::new(), Mailbox::new());
        h.tx.send(AppendRequest {
            items: vec![item(0, "a"), item(1, "b")],
            reply: first.clone(),
        })
        .unwrap();
        h.tx.send(AppendRequest {
            items: vec![item(2, "a")],
            reply: second.clone(),
        })
        .unwrap();
        let c1 = first.next().await;
        let c2 = second.next().await;
        assert_eq!(c1.stored, vec![0, 1]);
        assert_eq!(c2.stored, vec![2]);
        assert_eq!(h.producer.puts(), 1);
        assert_eq!(h.producer.data(), vec!["a-0", "b-1", "a-2"]);
        drop(h.tx);
        h.task.await.unwrap();
        assert_eq!(h.metrics.snapshot().records_appended, 3);
    }

    /// A connection's requests share its mailbox: a batch holding several
    /// of them reports every record to it (and does not lock it twice).
    #[tokio::test(start_paused = true)]
    async fn requests_sharing_a_mailbox_are_reported_together() {
        let h = start();
        let mailbox = Mailbox::new();
        for items in [vec![item(0, "a"), item(1, "a")], vec![item(2, "a")]] {
            h.tx.send(AppendRequest {
                items,
                reply: mailbox.clone(),
            })
            .unwrap();
        }
        let mut stored = Vec::new();
        while stored.len() < 3 {
            stored.extend(mailbox.next().await.stored);
        }
        assert_eq!(stored, vec![0, 1, 2]);
        assert_eq!(h.producer.puts(), 1);
    }

    /// A request that arrives while a put syncs starts its own put at once
    /// when the stream keeps order across puts, and waits for the first one
    /// when it does not.
    async fn puts_begun_while_one_is_held(puts_in_order: usize) -> usize {
        let h = start_with(MemoryProducer::default().with_puts_in_order(puts_in_order));
        let reply = Mailbox::new();
        let done = reply.clone();
        h.producer.hold();
        h.tx.send(AppendRequest {
            items: vec![item(0, "a")],
            reply: reply.clone(),
        })
        .unwrap();
        h.producer
            .wait_puts_begun(1, Duration::from_secs(1))
            .await
            .unwrap();
        h.tx.send(AppendRequest {
            items: vec![item(1, "b")],
            reply,
        })
        .unwrap();
        // The clock is paused: this ends only once every task is idle, well
        // past the commit interval, so any put that may start has started.
        sleep(Duration::from_millis(50)).await;
        let begun = h.producer.puts_begun();
        h.producer.release();
        let mut stored = Vec::new();
        while stored.len() < 2 {
            stored.extend(done.next().await.stored);
        }
        stored.sort();
        assert_eq!(stored, vec![0, 1]);
        begun
    }

    /// How long a second request, sent the moment the first is stored,
    /// waits for its own put, with `connections` open.
    async fn wait_for_the_next_put(connections: u64) -> Duration {
        let h = start_configured(
            MemoryProducer::default(),
            GroupCommit {
                commit_interval_min_connections: 10,
                ..config()
            },
        );
        h.metrics.connections_current.store(connections, Relaxed);
        let reply = Mailbox::new();
        let done = reply.clone();
        h.tx.send(AppendRequest {
            items: vec![item(0, "a")],
            reply: reply.clone(),
        })
        .unwrap();
        assert_eq!(done.next().await.stored, vec![0]);
        let stored_first = Instant::now();
        h.tx.send(AppendRequest {
            items: vec![item(1, "a")],
            reply,
        })
        .unwrap();
        assert_eq!(done.next().await.stored, vec![1]);
        stored_first.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn the_commit_interval_holds_only_with_enough_connections_open() {
        // The clock is paused and the producer stores at once: a put that
        // waits, waits exactly until its slot.
        assert_eq!(wait_for_the_next_put(9).await, Duration::ZERO);
        assert_eq!(wait_for_the_next_put(10).await, config().commit_interval);
    }

    #[tokio::test(start_paused = true)]
    async fn puts_overlap_only_where_the_stream_keeps_their_order() {
        assert_eq!(puts_begun_while_one_is_held(4).await, 2);
        assert_eq!(puts_begun_while_one_is_held(1).await, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_records_are_retried_before_newer_ones() {
        let h = start();
        let (older, newer) = (Mailbox::new(), Mailbox::new());
        // Record "a-0" fails twice, then is stored.
        h.producer.fail_record("a-0", 2);
        h.tx.send(AppendRequest {
            items: vec![item(0, "a"), item(1, "b")],
            reply: older.clone(),
        })
        .unwrap();
        let first = older.next().await;
        assert_eq!(first.stored, vec![1]);
        h.tx.send(AppendRequest {
            items: vec![item(2, "a")],
            reply: newer.clone(),
        })
        .unwrap();
        let second = older.next().await;
        assert_eq!(second.stored, vec![0]);
        let third = newer.next().await;
        assert_eq!(third.stored, vec![2]);
        assert_eq!(h.producer.data(), vec!["b-1", "a-0", "a-2"]);
        assert_eq!(h.metrics.snapshot().append_failures, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unavailable_stream_is_retried_and_abandoned_at_shutdown() {
        let h = start();
        let reply = Mailbox::new();
        let done = reply.clone();
        h.producer.set_unavailable(true);
        h.tx.send(AppendRequest {
            items: vec![item(0, "a")],
            reply,
        })
        .unwrap();
        // Let a few retries happen (paused time advances on its own).
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(done.raised(), Reasons::NONE);
        assert!(h.metrics.snapshot().appends >= 3);
        h.abandon.cancel();
        let c = done.next().await;
        assert_eq!(c.failed, vec![0]);
        assert!(h.producer.data().is_empty());
        assert_eq!(h.metrics.snapshot().append_abandoned, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_failures_are_reported_not_retried() {
        let h = start();
        let reply = Mailbox::new();
        let done = reply.clone();
        h.producer.fail_record_permanently("a-0");
        h.tx.send(AppendRequest {
            items: vec![item(0, "a"), item(1, "a")],
            reply,
        })
        .unwrap();
        let c = done.next().await;
        assert_eq!(c.failed, vec![0]);
        assert_eq!(c.stored, vec![1]);
        assert_eq!(h.producer.puts(), 1);
    }
}
