//! Reading one Kinesis shard for one consumer: GetShardIterator and
//! GetRecords, with the consumer's checkpoint in the lease table.
//!
//! A shard born of a resharding is read only after its parents are done
//! (their checkpoints say `SHARD_END`), so a device's records stay in order
//! across the split or merge. A reader records `SHARD_END` itself once its
//! closed shard is read to the end and every record it returned is
//! checkpointed.

use std::time::Duration;

use async_trait::async_trait;
use aws::backoff::Backoff;
use aws::client::{describe, is_retryable};
use aws::seq;
use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::types::ShardIteratorType;
use bytes::Bytes;
use tokio::time::Instant;

use super::lease::{Checkpoint, LeaseTable};
use crate::lease::LeaseStore;
use crate::{Lag, ReadError, Record, SeqNo, ShardReader};

/// GetRecords returns at most this many records per call.
const MAX_GET_RECORDS: usize = 10_000;

/// How a reader polls.
#[derive(Debug, Clone)]
pub struct ReaderConfig {
    /// Pause between reads that found nothing new. Kinesis allows five
    /// GetRecords calls per second per shard, shared by all consumers.
    pub poll_interval: Duration,
    /// Delays after a throttled or failed read, with full jitter.
    pub backoff: Backoff,
    /// Failed reads in a row before `next_batch` reports an error.
    pub max_failures: u32,
}

impl Default for ReaderConfig {
    fn default() -> Self {
        ReaderConfig {
            poll_interval: Duration::from_millis(250),
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            max_failures: 10,
        }
    }
}

/// A shard as ListShards describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    pub id: String,
    /// The shards this one was split or merged from, while they are still
    /// in the stream.
    pub parents: Vec<String>,
    /// Whether the shard was closed by a resharding; it takes no new records.
    pub closed: bool,
}

pub struct KinesisShardReader {
    client: Client,
    stream_name: String,
    shard: ShardInfo,
    consumer: String,
    leases: LeaseTable,
    /// The process holding this shard's lease, for a leased reader: every
    /// checkpoint is conditional on it still holding it.
    owner: Option<String>,
    cfg: ReaderConfig,
    /// Parents whose `SHARD_END` has not been seen yet; nothing is read
    /// before this is empty.
    waiting_for: Vec<String>,
    /// The current shard iterator; `None` until the first read and after
    /// one expired.
    iterator: Option<String>,
    /// Where a new iterator starts: after this sequence number (the last
    /// record returned, else the checkpoint), or at the trim horizon.
    after: Option<String>,
    /// The last record returned, which bounds what may be checkpointed.
    last_returned: Option<SeqNo>,
    /// The checkpoint as this reader last read or wrote it.
    checkpoint: Option<Checkpoint>,
    /// The shard is closed and read to its end.
    at_end: bool,
    lag: Lag,
}

impl std::fmt::Debug for KinesisShardReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KinesisShardReader")
            .field("stream", &self.stream_name)
            .field("shard", &self.shard.id)
            .field("consumer", &self.consumer)
            .finish()
    }
}

impl KinesisShardReader {
    pub(crate) async fn open(
        client: Client,
        stream_name: String,
        shard: ShardInfo,
        consumer: String,
        leases: LeaseTable,
        owner: Option<String>,
        cfg: ReaderConfig,
    ) -> Result<Self, ReadError> {
        if consumer.is_empty() {
            return Err(ReadError::InvalidArgument(
                "a consumer needs a name".to_string(),
            ));
        }
        let checkpoint = leases.get(&consumer, &shard.id).await?;
        let (after, at_end) = match &checkpoint {
            Some(Checkpoint::At(seq)) => (Some(seq.clone()), false),
            Some(Checkpoint::ShardEnd) => (None, true),
            None => (None, false),
        };
        Ok(KinesisShardReader {
            client,
            stream_name,
            waiting_for: if at_end {
                Vec::new()
            } else {
                shard.parents.clone()
            },
            shard,
            consumer,
            leases,
            owner,
            cfg,
            iterator: None,
            after,
            last_returned: None,
            checkpoint,
            at_end,
            lag: Lag::default(),
        })
    }

    /// The parent shards this reader still waits for before reading.
    pub fn waiting_for_parents(&self) -> &[String] {
        &self.waiting_for
    }

    /// Whether every parent is done; forgets the ones that are.
    async fn parents_done(&mut self) -> Result<bool, ReadError> {
        let mut still = Vec::new();
        for parent in std::mem::take(&mut self.waiting_for) {
            if self.leases.get(&self.consumer, &parent).await? != Some(Checkpoint::ShardEnd) {
                still.push(parent);
            }
        }
        self.waiting_for = still;
        Ok(self.waiting_for.is_empty())
    }

    async fn new_iterator(&self) -> Result<String, ReadError> {
        let request = self
            .client
            .get_shard_iterator()
            .stream_name(&self.stream_name)
            .shard_id(&self.shard.id);
        let request = match &self.after {
            Some(seq) => request
                .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .starting_sequence_number(seq),
            None => request.shard_iterator_type(ShardIteratorType::TrimHorizon),
        };
        let out = request.send().await.map_err(|e| {
            if e.as_service_error()
                .is_some_and(|s| s.is_resource_not_found_exception())
            {
                ReadError::NoSuchShard(self.shard.id.clone())
            } else {
                ReadError::Io(format!("GetShardIterator: {}", describe(&e)))
            }
        })?;
        out.shard_iterator()
            .map(str::to_string)
            .ok_or_else(|| ReadError::Io("GetShardIterator returned no iterator".to_string()))
    }

    /// Records `SHARD_END` once the shard is read to its end and everything
    /// returned is checkpointed.
    async fn finish_if_done(&mut self) -> Result<(), ReadError> {
        if !self.at_end || self.checkpoint == Some(Checkpoint::ShardEnd) {
            return Ok(());
        }
        let all_checkpointed = match (self.last_returned, &self.checkpoint) {
            (None, _) => true,
            (Some(last), Some(Checkpoint::At(at))) => seq::parse(at).ok() == Some(last),
            (Some(_), _) => false,
        };
        if all_checkpointed {
            self.leases
                .set(
                    &self.consumer,
                    &self.shard.id,
                    self.owner.as_deref(),
                    self.checkpoint.as_ref(),
                    &Checkpoint::ShardEnd,
                )
                .await?;
            self.checkpoint = Some(Checkpoint::ShardEnd);
            tracing::info!(shard = %self.shard.id, consumer = %self.consumer, "Shard read to its end; its children may start.");
        }
        Ok(())
    }

    /// One GetRecords call: the records, or `None` for a retryable failure.
    async fn read_once(&mut self, max: usize) -> Result<Option<Vec<Record>>, ReadError> {
        let iterator = match self.iterator.take() {
            Some(it) => it,
            None => self.new_iterator().await?,
        };
        let out = match self
            .client
            .get_records()
            .shard_iterator(&iterator)
            .limit(max.clamp(1, MAX_GET_RECORDS) as i32)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) => {
                let expired = e
                    .as_service_error()
                    .is_some_and(|s| s.is_expired_iterator_exception());
                if expired {
                    // Iterators live five minutes; a fresh one starts after
                    // the last record returned.
                    return Ok(None);
                }
                if is_retryable(&e) {
                    self.iterator = Some(iterator);
                    tracing::debug!(shard = %self.shard.id, error = %describe(&e), "GetRecords failed; retrying.");
                    return Ok(None);
                }
                return Err(ReadError::Io(format!("GetRecords: {}", describe(&e))));
            }
        };
        let behind = out.millis_behind_latest();
        let mut records = Vec::with_capacity(out.records.len());
        for r in out.records {
            let seq = seq::parse(r.sequence_number())
                .map_err(|e| ReadError::InvalidArgument(e.to_string()))?;
            let arrival_ms = r
                .approximate_arrival_timestamp()
                .and_then(|t| t.to_millis().ok())
                .unwrap_or(0);
            records.push(Record {
                seq,
                partition_key: r.partition_key().unwrap_or_default().to_string(),
                arrival_ms,
                data: Bytes::from(r.data.into_inner()),
            });
        }
        self.iterator = out.next_shard_iterator;
        // A closed shard ends where GetRecords stops handing out iterators;
        // caught up on a shard known to be closed means the same.
        let caught_up = records.is_empty() && behind == Some(0);
        if self.iterator.is_none() || (self.shard.closed && caught_up) {
            self.at_end = true;
            self.iterator = None;
        }
        if let Some(last) = records.last() {
            self.last_returned = Some(last.seq);
            self.after = Some(seq::format(last.seq));
        }
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        self.lag = Lag {
            records_behind: 0,
            oldest_unread_arrival_ms: behind.filter(|ms| *ms > 0).map(|ms| now_ms - ms),
        };
        Ok(Some(records))
    }
}

#[async_trait]
impl ShardReader for KinesisShardReader {
    fn shard_id(&self) -> &str {
        &self.shard.id
    }

    async fn next_batch(&mut self, max: usize, wait: Duration) -> Result<Vec<Record>, ReadError> {
        let deadline = Instant::now() + wait;
        let mut failures = 0;
        loop {
            let pause = if !self.waiting_for.is_empty() && !self.parents_done().await? {
                self.cfg.poll_interval
            } else if self.at_end {
                self.finish_if_done().await?;
                // Nothing will ever arrive; wait out the caller's wait.
                wait
            } else {
                match self.read_once(max).await? {
                    Some(records) if !records.is_empty() => return Ok(records),
                    Some(_) if self.lag.oldest_unread_arrival_ms.is_some() => {
                        // Behind but handed nothing: the iterator crossed a
                        // gap in the shard; read on at once.
                        failures = 0;
                        Duration::ZERO
                    }
                    Some(_) => {
                        failures = 0;
                        self.cfg.poll_interval
                    }
                    None => {
                        failures += 1;
                        if failures >= self.cfg.max_failures {
                            return Err(ReadError::Io(format!(
                                "GetRecords on {} failed {failures} times in a row",
                                self.shard.id
                            )));
                        }
                        self.cfg.backoff.delay(failures, &mut rand::rng())
                    }
                }
            };
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            tokio::time::sleep_until((now + pause).min(deadline)).await;
            if Instant::now() >= deadline && pause > Duration::ZERO {
                return Ok(Vec::new());
            }
        }
    }

    async fn checkpoint(&mut self, seq: SeqNo) -> Result<(), ReadError> {
        if self.checkpoint == Some(Checkpoint::ShardEnd) {
            // Everything is done already; moving back would hold the
            // children up again.
            return Ok(());
        }
        if self.last_returned.is_none_or(|last| seq > last) {
            return Err(ReadError::InvalidArgument(format!(
                "checkpoint {seq} in {} is past the last record read",
                self.shard.id
            )));
        }
        let new = Checkpoint::At(seq::format(seq));
        self.leases
            .set(
                &self.consumer,
                &self.shard.id,
                self.owner.as_deref(),
                self.checkpoint.as_ref(),
                &new,
            )
            .await?;
        self.checkpoint = Some(new);
        self.finish_if_done().await
    }

    fn lag(&self) -> Lag {
        self.lag
    }
}
