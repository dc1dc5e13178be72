//! The stream between the ingest endpoint and the processors.
//!
//! Two roles, each a small trait, and a backend per home:
//!
//! - [`StreamProducer`]: appends records; returns once they are durable, with a
//!   result per record (Kinesis PutRecords semantics: partial failure is normal).
//! - [`ShardReader`]: reads one shard in order for one consumer and keeps that
//!   consumer's checkpoint.
//! - `partition`: Kinesis's rule for which shard a partition key lands on
//!   (MD5 of the key into the shards' hash-key ranges), used by every backend
//!   so that both homes order and group records alike.
//! - [`lease`]: sharing a stream's shards between processes by leases
//!   ([`lease::LeaseStore`], [`lease::LeasedStream`]), on Kinesis and on
//!   NATS.
//! - [`embedded`]: the local durable, sharded log ([`embedded::EmbeddedLog`]).
//! - [`kinesis`]: Amazon Kinesis ([`kinesis::KinesisStream`]), leases and
//!   checkpoints in a DynamoDB lease table.
//! - [`nats`]: NATS JetStream ([`nats::NatsStream`]), partitions as subjects,
//!   leases and checkpoints in a KV bucket.
//!
//! The trait contract as checks every backend runs, and the wrappers that
//! inject faults into any producer or reader, are test support: they live in
//! the dev-only `testkit` crate, not here.
//!
//! **Architecture Invariant:** a producer's `put` returns `Ok` for a record only
//! once that record survives a crash of the process. The ingest endpoint
//! acknowledges devices on that, and nothing earlier.

pub mod embedded;
pub mod kinesis;
pub mod lease;
pub mod nats;
pub mod partition;

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

/// A position in a shard (wide enough for Kinesis sequence numbers).
pub use schemas::SeqNo;
/// What [`ShardReader::next_batch`] returns; defined in `schemas` so that the
/// aggregation core takes it without depending on the stream.
pub use schemas::shard::Record;

/// A record to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutRecord {
    /// Chooses the shard: iotpipe uses the device id, so a device's records
    /// stay in order.
    pub partition_key: String,
    pub data: Bytes,
}

/// Where one appended record landed, or why it did not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutOutcome {
    Stored {
        shard: String,
        seq: SeqNo,
    },
    /// Not stored; the caller retries it (throttling, a failed write).
    Failed {
        retryable: bool,
        message: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    /// Nothing was stored; the whole call may be retried.
    #[error("stream unavailable: {0}")]
    Unavailable(String),
    /// The stream is shut down; nothing more will be stored.
    #[error("stream is closed")]
    Closed,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("stream read failed: {0}")]
    Io(String),
    #[error("shard {0} does not exist")]
    NoSuchShard(String),
    /// The caller asked for something the stream cannot do: a consumer name
    /// it cannot store, a checkpoint past the shard's end.
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    #[error("stream is closed")]
    Closed,
    /// Another process holds this shard's lease now: this reader must stop
    /// and must not checkpoint.
    #[error("the lease on shard {0} was lost to another process")]
    LeaseLost(String),
}

#[async_trait]
pub trait StreamProducer: Send + Sync + 'static {
    /// Appends `records` and returns one outcome per record, in order. A
    /// `Stored` outcome means the record is durable.
    async fn put(&self, records: Vec<PutRecord>) -> Result<Vec<PutOutcome>, ProduceError>;

    /// How many `put` calls may be in flight at once with each partition
    /// key's records still stored in the order the calls began (barring
    /// failed records). A caller that wants a device's records in order runs
    /// no more puts at once than this.
    fn max_puts_in_order(&self) -> usize {
        1
    }
}

#[async_trait]
pub trait ShardReader: Send + 'static {
    fn shard_id(&self) -> &str;

    /// The next records after the last one returned (at start: after the
    /// checkpoint), at most `max`, waiting up to `wait` for the first one. An
    /// empty batch means nothing arrived in time.
    async fn next_batch(&mut self, max: usize, wait: Duration) -> Result<Vec<Record>, ReadError>;

    /// Records that this consumer is done with every record up to `seq`; a
    /// restart resumes after it.
    async fn checkpoint(&mut self, seq: SeqNo) -> Result<(), ReadError>;

    /// How far behind the consumer is: records not yet returned and the
    /// arrival time of the oldest of them (Kinesis's IteratorAge).
    fn lag(&self) -> Lag {
        Lag::default()
    }
}

/// Lets a boxed reader (a backend chosen at run time, or a wrapper around
/// one) go wherever a `R: ShardReader` is taken.
#[async_trait]
impl<T: ShardReader + ?Sized> ShardReader for Box<T> {
    fn shard_id(&self) -> &str {
        (**self).shard_id()
    }

    async fn next_batch(&mut self, max: usize, wait: Duration) -> Result<Vec<Record>, ReadError> {
        (**self).next_batch(max, wait).await
    }

    async fn checkpoint(&mut self, seq: SeqNo) -> Result<(), ReadError> {
        (**self).checkpoint(seq).await
    }

    fn lag(&self) -> Lag {
        (**self).lag()
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lag {
    pub records_behind: u64,
    pub oldest_unread_arrival_ms: Option<i64>,
}
