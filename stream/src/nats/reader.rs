//! Reading one partition for one consumer: an ordered consumer of the
//! partition's subject, started after the consumer's checkpoint, which is
//! kept in a KV bucket.
//!
//! Why not a durable consumer with `AckPolicy::All`, acked at the checkpoint?
//! Its position is what it last *delivered*, not what was acked: a reader
//! that restarts after reading past its checkpoint gets the records between
//! only once `ack_wait` runs out, redelivered behind newer ones, and a reader
//! that holds more than `max_ack_pending` unacked records stops receiving.
//! Here a checkpoint is a value, as in the embedded log and the Kinesis lease
//! table: a new reader starts exactly after it, in order, and the consumer
//! behind it is ephemeral and unacknowledged (the client's ordered consumer
//! recreates it after a gap or a server restart). A KV write is itself a
//! JetStream publish, so `checkpoint` returns once the server stored it.
//!
//! The checkpoint shares its KV entry with the partition's lease
//! (`super::lease`): a leased reader's checkpoint is written only while its
//! process holds the lease, and the next owner starts after it.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull::{Ordered, OrderedConfig};
use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use tokio::time::Instant;

use super::lease::NatsLeaseTable;
use super::producer::KEY_HEADER;
use crate::lease::{Checkpoint, LeaseStore};
use crate::{Lag, ReadError, Record, SeqNo, ShardReader};

/// Failed attempts in a row to (re)start reading before `next_batch` reports
/// an error, and the pause between them.
const MAX_FAILURES: u32 = 10;
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// How long one pull request of the consumer lasts; the server sends a
/// heartbeat every half of it. A restarted server has forgotten the consumer,
/// and the client notices by missing heartbeats or a failed pull, so this
/// bounds the stall after a restart (the client's default, 30 s, stalled a
/// reader for 15 s). An idle partition costs a request per period.
const PULL_EXPIRY: Duration = Duration::from_secs(4);

pub struct NatsShardReader {
    js: jetstream::Context,
    stream: String,
    shard: String,
    /// The partition's subject, the consumer's filter.
    subject: String,
    consumer: String,
    /// Where the checkpoint is kept, beside the partition's lease.
    leases: NatsLeaseTable,
    /// The process holding this partition's lease, for a leased reader:
    /// every checkpoint is conditional on it still holding it.
    owner: Option<String>,
    /// The ordered consumer; `None` until the first read and after it failed.
    messages: Option<Ordered>,
    /// Reading resumes after this stream sequence number: the last record
    /// returned, else the checkpoint (0: from the start).
    after: u64,
    /// The last record returned, which bounds what may be checkpointed.
    last_returned: Option<u64>,
    lag: Lag,
}

impl std::fmt::Debug for NatsShardReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsShardReader")
            .field("stream", &self.stream)
            .field("shard", &self.shard)
            .field("consumer", &self.consumer)
            .field("after", &self.after)
            .finish()
    }
}

impl NatsShardReader {
    pub(super) async fn open(
        js: jetstream::Context,
        stream: String,
        partition: (String, String),
        consumer: String,
        leases: NatsLeaseTable,
        owner: Option<String>,
    ) -> Result<Self, ReadError> {
        let (shard, subject) = partition;
        let after = match leases.get(&consumer, &shard).await? {
            Some(Checkpoint::At(seq)) => seq.parse().map_err(|_| {
                ReadError::Io(format!("the checkpoint of {consumer} in {shard} is {seq}"))
            })?,
            Some(Checkpoint::ShardEnd) | None => 0,
        };
        let mut reader = NatsShardReader {
            js,
            stream,
            shard,
            subject,
            consumer,
            leases,
            owner,
            messages: None,
            after,
            last_returned: None,
            lag: Lag::default(),
        };
        // Start now, so that a stream that cannot be read fails the open.
        reader.messages = Some(reader.subscribe().await?);
        Ok(reader)
    }

    /// An ordered consumer of the partition, from just after `after`.
    /// (A free function of its parts: the reader itself is not `Sync`, as
    /// the consumer it holds is not.)
    fn subscribe(&self) -> impl Future<Output = Result<Ordered, ReadError>> + Send + 'static {
        subscribe(
            self.js.clone(),
            self.stream.clone(),
            self.subject.clone(),
            self.after,
        )
    }

    /// The record a message carries, or `None` for one at or before `after`
    /// (a consumer recreated from an older position).
    fn record(&mut self, message: &jetstream::Message) -> Result<Option<Record>, ReadError> {
        let info = message.info().map_err(|e| {
            ReadError::Io(format!(
                "a message of {} has no metadata: {e}",
                self.subject
            ))
        })?;
        let seq = info.stream_sequence;
        if seq <= self.after {
            return Ok(None);
        }
        self.after = seq;
        self.last_returned = Some(seq);
        self.lag = Lag {
            records_behind: info.pending,
            oldest_unread_arrival_ms: None,
        };
        let partition_key = message
            .headers
            .as_ref()
            .and_then(|h| h.get(KEY_HEADER))
            .map(|v| v.as_str().to_string())
            // Only something other than iotpipe writes a record without one;
            // the processors refuse its bytes as they would any stranger's.
            .unwrap_or_default();
        Ok(Some(Record {
            seq: SeqNo::from(seq),
            partition_key,
            data: message.payload.clone(),
            arrival_ms: (info.published.unix_timestamp_nanos() / 1_000_000) as i64,
        }))
    }
}

#[async_trait]
impl ShardReader for NatsShardReader {
    fn shard_id(&self) -> &str {
        &self.shard
    }

    async fn next_batch(&mut self, max: usize, wait: Duration) -> Result<Vec<Record>, ReadError> {
        let deadline = Instant::now() + wait;
        let max = max.max(1);
        let mut out = Vec::new();
        let mut failures = 0;
        loop {
            let messages = match self.messages.as_mut() {
                Some(messages) => messages,
                None => match self.subscribe().await {
                    Ok(messages) => self.messages.insert(messages),
                    Err(e) => {
                        failures += 1;
                        if failures >= MAX_FAILURES {
                            return Err(e);
                        }
                        tracing::debug!(shard = %self.shard, error = %e, "Starting to read failed; retrying.");
                        if Instant::now() + RETRY_PAUSE >= deadline {
                            tokio::time::sleep_until(deadline).await;
                            return Ok(out);
                        }
                        tokio::time::sleep(RETRY_PAUSE).await;
                        continue;
                    }
                },
            };
            // Wait for the first record; then take only what is already here.
            let next = if out.is_empty() {
                match tokio::time::timeout_at(deadline, messages.next()).await {
                    Ok(next) => next,
                    Err(_) => return Ok(out),
                }
            } else {
                match messages.next().now_or_never() {
                    Some(next) => next,
                    None => return Ok(out),
                }
            };
            match next {
                Some(Ok(message)) => {
                    if let Some(record) = self.record(&message)? {
                        out.push(record);
                        if out.len() >= max {
                            return Ok(out);
                        }
                    }
                }
                ended => {
                    // The ordered consumer gave up recreating itself, or
                    // ended: start another after the last record returned.
                    if let Some(Err(e)) = ended {
                        tracing::warn!(shard = %self.shard, error = %e, "Reading from JetStream failed; restarting the consumer.");
                    }
                    self.messages = None;
                    if !out.is_empty() {
                        return Ok(out);
                    }
                    failures += 1;
                    if failures >= MAX_FAILURES {
                        return Err(ReadError::Io(format!(
                            "reading {} failed {failures} times in a row",
                            self.subject
                        )));
                    }
                    if Instant::now() + RETRY_PAUSE >= deadline {
                        tokio::time::sleep_until(deadline).await;
                        return Ok(out);
                    }
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }
    }

    async fn checkpoint(&mut self, seq: SeqNo) -> Result<(), ReadError> {
        let seq_u64 = seq.to_u64().filter(|s| *s > 0).ok_or_else(|| {
            ReadError::InvalidArgument(format!("{seq} is not a JetStream sequence number"))
        })?;
        if self.last_returned.is_none_or(|last| seq_u64 > last) {
            return Err(ReadError::InvalidArgument(format!(
                "checkpoint {seq} in {} is past the last record read",
                self.shard
            )));
        }
        let checkpoint = Checkpoint::At(seq_u64.to_string());
        self.leases
            .set(
                &self.consumer,
                &self.shard,
                self.owner.as_deref(),
                None,
                &checkpoint,
            )
            .await
    }

    /// Records behind as the server counted them when it delivered the last
    /// record returned; the oldest unread one's arrival is not known without
    /// reading it, so it is left out.
    fn lag(&self) -> Lag {
        self.lag
    }
}

async fn subscribe(
    js: jetstream::Context,
    stream: String,
    subject: String,
    after: u64,
) -> Result<Ordered, ReadError> {
    let deliver_policy = match after {
        0 => DeliverPolicy::All,
        after => DeliverPolicy::ByStartSequence {
            start_sequence: after + 1,
        },
    };
    let config = OrderedConfig {
        filter_subject: subject.clone(),
        deliver_policy,
        max_expires: PULL_EXPIRY,
        ..OrderedConfig::default()
    };
    let consumer = js
        .create_consumer_on_stream(config, &stream)
        .await
        .map_err(|e| ReadError::Io(format!("creating a consumer of {subject}: {e}")))?;
    consumer
        .messages()
        .await
        .map_err(|e| ReadError::Io(format!("reading {subject}: {e}")))
}
