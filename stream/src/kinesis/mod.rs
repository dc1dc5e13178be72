//! The Kinesis backend: a producer and shard readers on Amazon Kinesis Data
//! Streams (or a wire-compatible stand-in), with consumer checkpoints in a
//! DynamoDB lease table.
//!
//! On AWS the processors run as Lambda functions fed by an event source
//! mapping, which reads and checkpoints by itself; the readers here are for
//! running processors anywhere else (`iotpipe up --stream kinesis`).
//!
//! - `producer`: [`StreamProducer`] on PutRecords, order kept per key: an
//!   async driver around `put_plan`, the pure queue state (what to send
//!   next, what to retry, which outcomes are final).
//! - `reader`: [`ShardReader`] on GetShardIterator and GetRecords.
//! - `lease`: the lease table on DynamoDB, a [`crate::lease::LeaseStore`]:
//!   per (consumer, shard) an owner, a lease counter and the checkpoint
//!   (`SHARD_END` for finished shards), and a heartbeat per process. Which
//!   leases a process takes and how it keeps them is the backend-neutral
//!   [`crate::lease`].
//!
//! **Architecture Invariant:** a record is reported `Stored` only with the
//! shard and sequence number Kinesis returned for it, and a partition key's
//! records are never sent past an earlier one that is not yet stored.

pub mod lease;
mod producer;
mod put_plan;
mod reader;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws::client::describe;
use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::types::{StreamMode, StreamModeDetails, StreamStatus};

pub use self::lease::LeaseTable;
pub use self::producer::{
    MAX_PARTITION_KEY_CHARS, MAX_RECORD_BYTES, MAX_REQUEST_BYTES, MAX_REQUEST_RECORDS,
    ProducerConfig,
};
pub use self::reader::{KinesisShardReader, ReaderConfig, ShardInfo};
pub use crate::lease::{
    Checkpoint, Lease, LeaseChanges, LeaseConfig, LeaseKeeper, LeasePlan, LeasePlanner,
    LeaseSnapshot,
};
use crate::lease::{LeaseStore, LeasedStream};
use crate::{ProduceError, PutOutcome, PutRecord, ReadError, ShardReader, StreamProducer};

/// Where the clients connect; defined in `aws`, re-exported because
/// [`KinesisStream::connect`] takes it.
pub use aws::AwsConfig;

/// How long a new stream may take to become ACTIVE.
const ACTIVE_TIMEOUT: Duration = Duration::from_secs(300);
const ACTIVE_POLL: Duration = Duration::from_millis(500);

/// Tuning of the producer and the readers; the defaults suit AWS.
#[derive(Debug, Clone, Default)]
pub struct KinesisConfig {
    pub producer: ProducerConfig,
    pub reader: ReaderConfig,
}

/// One Kinesis stream, as a producer and a source of shard readers.
#[derive(Debug, Clone)]
pub struct KinesisStream {
    client: Client,
    stream_name: String,
    /// Where readers keep their checkpoints.
    leases: LeaseTable,
    cfg: KinesisConfig,
}

impl KinesisStream {
    pub fn new(client: Client, stream_name: impl Into<String>, leases: LeaseTable) -> Self {
        KinesisStream {
            client,
            stream_name: stream_name.into(),
            leases,
            cfg: KinesisConfig::default(),
        }
    }

    /// Builds the Kinesis and DynamoDB clients from `aws` and opens stream
    /// `stream_name` with checkpoints in `lease_table`. Creates nothing;
    /// see [`KinesisStream::create`] and [`LeaseTable::ensure_table`].
    pub async fn connect(aws: &AwsConfig, stream_name: &str, lease_table: &str) -> Self {
        let sdk = aws.load().await;
        let leases = LeaseTable::new(aws_sdk_dynamodb::Client::new(&sdk), lease_table);
        KinesisStream::new(Client::new(&sdk), stream_name, leases)
    }

    pub fn with_config(mut self, cfg: KinesisConfig) -> Self {
        self.cfg = cfg;
        self
    }

    pub fn stream_name(&self) -> &str {
        &self.stream_name
    }

    pub fn leases(&self) -> &LeaseTable {
        &self.leases
    }

    /// Creates the stream unless it exists (`shards`: provisioned with that
    /// many shards; `None`: on-demand), waits until it is ACTIVE, and creates
    /// the lease table.
    pub async fn create(&self, shards: Option<u32>) -> Result<(), ReadError> {
        let request = self.client.create_stream().stream_name(&self.stream_name);
        let request = match shards {
            Some(n) => request.shard_count(n as i32).stream_mode_details(
                StreamModeDetails::builder()
                    .stream_mode(StreamMode::Provisioned)
                    .build()
                    .map_err(|e| ReadError::InvalidArgument(e.to_string()))?,
            ),
            None => request.stream_mode_details(
                StreamModeDetails::builder()
                    .stream_mode(StreamMode::OnDemand)
                    .build()
                    .map_err(|e| ReadError::InvalidArgument(e.to_string()))?,
            ),
        };
        if let Err(e) = request.send().await {
            let exists = e
                .as_service_error()
                .is_some_and(|s| s.is_resource_in_use_exception());
            if !exists {
                return Err(ReadError::Io(format!(
                    "creating stream {}: {}",
                    self.stream_name,
                    describe(&e)
                )));
            }
        }
        let deadline = tokio::time::Instant::now() + ACTIVE_TIMEOUT;
        loop {
            let out = self
                .client
                .describe_stream_summary()
                .stream_name(&self.stream_name)
                .send()
                .await
                .map_err(|e| ReadError::Io(format!("describing stream: {}", describe(&e))))?;
            let status = out.stream_description_summary().map(|s| s.stream_status());
            if status == Some(&StreamStatus::Active) {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ReadError::Io(format!(
                    "stream {} is still {status:?} after {ACTIVE_TIMEOUT:?}",
                    self.stream_name
                )));
            }
            tokio::time::sleep(ACTIVE_POLL).await;
        }
        self.leases.ensure_table().await
    }

    /// Every shard still in the stream, open and closed, ordered by id
    /// (which orders parents before their children).
    pub async fn shards(&self) -> Result<Vec<ShardInfo>, ReadError> {
        let mut raw = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let request = self.client.list_shards();
            // ListShards takes the stream name or a continuation, not both.
            let request = match &next {
                Some(token) => request.next_token(token),
                None => request.stream_name(&self.stream_name),
            };
            let out = request.send().await.map_err(|e| {
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_not_found_exception())
                {
                    ReadError::Io(format!("stream {} does not exist", self.stream_name))
                } else {
                    ReadError::Io(format!("ListShards: {}", describe(&e)))
                }
            })?;
            raw.extend(out.shards().iter().cloned());
            match out.next_token() {
                Some(token) => next = Some(token.to_string()),
                None => break,
            }
        }
        let ids: std::collections::HashSet<String> =
            raw.iter().map(|s| s.shard_id().to_string()).collect();
        let mut shards: Vec<ShardInfo> = raw
            .iter()
            .map(|s| ShardInfo {
                id: s.shard_id().to_string(),
                // A parent no longer listed has aged out of the stream: no
                // record of it can still be read, so nothing waits for it.
                parents: [s.parent_shard_id(), s.adjacent_parent_shard_id()]
                    .into_iter()
                    .flatten()
                    .filter(|p| ids.contains(*p))
                    .map(str::to_string)
                    .collect(),
                closed: s
                    .sequence_number_range()
                    .is_some_and(|r| r.ending_sequence_number().is_some()),
            })
            .collect();
        shards.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(shards)
    }

    /// The ids of [`KinesisStream::shards`].
    pub async fn shard_ids(&self) -> Result<Vec<String>, ReadError> {
        Ok(self.shards().await?.into_iter().map(|s| s.id).collect())
    }

    /// A reader of `shard` for `consumer`, resuming after its checkpoint.
    /// Unleased: nothing stops another process reading the same shard; see
    /// [`LeasedStream::leased_shard_reader`].
    pub async fn reader(
        &self,
        shard: &str,
        consumer: &str,
    ) -> Result<KinesisShardReader, ReadError> {
        self.open_reader(shard, consumer, None).await
    }

    /// Shares this stream's shards for `consumer` with the other processes
    /// that run one, as `owner` (unique per process).
    pub fn lease_keeper(&self, consumer: &str, owner: &str, config: &LeaseConfig) -> LeaseKeeper {
        LeaseKeeper::new(Arc::new(self.leases.clone()), consumer, owner, config)
    }

    async fn open_reader(
        &self,
        shard: &str,
        consumer: &str,
        owner: Option<String>,
    ) -> Result<KinesisShardReader, ReadError> {
        let info = self
            .shards()
            .await?
            .into_iter()
            .find(|s| s.id == shard)
            .ok_or_else(|| ReadError::NoSuchShard(shard.to_string()))?;
        KinesisShardReader::open(
            self.client.clone(),
            self.stream_name.clone(),
            info,
            consumer.to_string(),
            self.leases.clone(),
            owner,
            self.cfg.reader.clone(),
        )
        .await
    }
}

#[async_trait]
impl LeasedStream for KinesisStream {
    async fn lease_shards(&self) -> Result<Vec<String>, ReadError> {
        self.shard_ids().await
    }

    fn lease_store(&self) -> Arc<dyn LeaseStore> {
        Arc::new(self.leases.clone())
    }

    async fn leased_shard_reader(
        &self,
        shard: &str,
        consumer: &str,
        owner: &str,
    ) -> Result<Box<dyn ShardReader>, ReadError> {
        let reader = self.open_reader(shard, consumer, Some(owner.to_string()));
        Ok(Box::new(reader.await?))
    }
}

#[async_trait]
impl StreamProducer for KinesisStream {
    async fn put(&self, records: Vec<PutRecord>) -> Result<Vec<PutOutcome>, ProduceError> {
        let api = producer::SdkPutRecords {
            client: &self.client,
            stream_name: &self.stream_name,
        };
        producer::put_ordered(&api, &records, &self.cfg.producer).await
    }
}

/// What became of each record, in a word (`stored`, `retryable`, `final`),
/// so that a test states a whole batch's outcomes in one line.
#[cfg(test)]
fn fates(out: &[PutOutcome]) -> Vec<&'static str> {
    out.iter()
        .map(|o| match o {
            PutOutcome::Stored { .. } => "stored",
            PutOutcome::Failed {
                retryable: true, ..
            } => "retryable",
            PutOutcome::Failed {
                retryable: false, ..
            } => "final",
        })
        .collect()
}
