//! The NATS JetStream backend: a producer and shard readers on one JetStream
//! stream, for running iotpipe on several machines without AWS.
//!
//! - Partitions are subjects. Stream `S` of `N` partitions captures exactly
//!   the subjects `S.0` … `S.{N-1}`, fixed when the stream is created; shard
//!   `shard-000i` (named as the embedded log names its shards) is subject
//!   `S.i`. A record goes to the partition [`partition::shard_for`] picks for
//!   its key, as on every backend, so a device's records stay in one
//!   partition and both homes group devices alike.
//! - `producer`: [`StreamProducer`] on JetStream publishes, each `Stored`
//!   only once its PubAck came back, each with a `Nats-Msg-Id` so that a
//!   retried publish is stored once.
//! - `reader`: [`ShardReader`] on an ordered consumer of one subject, with
//!   each consumer's checkpoints in a KV bucket beside the stream.
//! - `lease`: that bucket as a [`LeaseStore`]: each checkpoint shares its
//!   entry with the partition's lease, so processes share the partitions
//!   as they share Kinesis shards ([`crate::lease`]).
//!
//! **Architecture Invariant:** a record is reported `Stored` only with the
//! stream sequence number of a PubAck for it, which JetStream sends once the
//! record is in the stream's store (on a quorum of replicas when clustered).
//!
//! [`partition::shard_for`]: crate::partition::shard_for

mod lease;
mod producer;
mod reader;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use async_trait::async_trait;

pub use self::lease::NatsLeaseTable;
pub use self::reader::NatsShardReader;
use crate::lease::{LeaseStore, LeasedStream};
use crate::{ProduceError, PutOutcome, PutRecord, ReadError, ShardReader, StreamProducer};

/// How a stream is created and how long calls wait.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// Partitions of a stream that [`NatsStream::open`] creates; an existing
    /// stream keeps the partitions it was created with.
    pub partitions: u32,
    /// Copies JetStream keeps of each record and checkpoint: 1 on a single
    /// server, 3 on a cluster (a PubAck then means a quorum stored it).
    pub replicas: usize,
    /// How long records are kept. A record can wait in the stream this long,
    /// which is what the store's dedup sets must outlive.
    pub retention: Duration,
    /// How long the server remembers message ids: a put retried within it
    /// is stored once.
    pub duplicate_window: Duration,
    /// How long a put waits for its PubAcks, and an API call for its answer.
    pub timeout: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            partitions: 4,
            replicas: 1,
            retention: Duration::from_secs(24 * 3600),
            duplicate_window: Duration::from_secs(120),
            timeout: Duration::from_secs(5),
        }
    }
}

/// One JetStream stream of iotpipe's partitions, as a producer and a source
/// of shard readers.
#[derive(Clone)]
pub struct NatsStream {
    js: jetstream::Context,
    name: String,
    partitions: u32,
    /// Where readers keep each consumer's checkpoint per shard, beside the
    /// shard's lease.
    leases: NatsLeaseTable,
    /// Taken while a put hands its records to the connection, in the order
    /// puts began (tokio's mutex is first come, first served): the server
    /// stores one connection's publishes in the order they arrive, so puts
    /// that overlap still store each key's records in call order.
    publish_turn: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for NatsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsStream")
            .field("name", &self.name)
            .field("partitions", &self.partitions)
            .finish()
    }
}

/// Connects to the NATS server at `url`, or to the first of a cluster's
/// servers that answers when `url` lists several, comma-separated
/// (`nats://a:4222,nats://b:4222`), for [`NatsStream::open`]. The client
/// reconnects by itself after the connection drops, to any server of the
/// list or that the cluster told it of.
pub async fn connect(url: &str) -> Result<async_nats::Client, ReadError> {
    let servers: Vec<&str> = url.split(',').map(str::trim).collect();
    async_nats::connect(servers)
        .await
        .map_err(|e| ReadError::Io(format!("connecting to NATS at {url}: {e}")))
}

/// A name that NATS takes in a subject or a key: non-empty, of letters,
/// digits, '-' and '_' only.
fn check_name(what: &str, name: &str) -> Result<(), ReadError> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(ReadError::InvalidArgument(format!(
            "{what} name {name:?} must be letters, digits, '-' and '_'"
        )));
    }
    Ok(())
}

impl NatsStream {
    /// Opens stream `name` on `client`, creating it with `cfg.partitions`
    /// partitions unless it exists, and its checkpoint bucket likewise.
    pub async fn open(
        client: async_nats::Client,
        name: &str,
        cfg: &NatsConfig,
    ) -> Result<NatsStream, ReadError> {
        // The name is also a subject token and part of a bucket name.
        check_name("stream", name)?;
        let js = jetstream::ContextBuilder::new()
            .timeout(cfg.timeout)
            .build(client);
        let stream = js
            .get_or_create_stream(stream_config(name, cfg))
            .await
            .map_err(|e| ReadError::Io(format!("opening stream {name}: {e}")))?;
        let partitions = partitions_of(name, &stream.cached_info().config.subjects)?;
        if partitions != cfg.partitions.max(1) {
            tracing::info!(
                stream = name,
                partitions,
                configured = cfg.partitions,
                "The stream exists with another partition count; it keeps its own."
            );
        }
        let checkpoints = checkpoint_bucket(&js, name, cfg).await?;
        Ok(NatsStream {
            js,
            name: name.to_string(),
            partitions,
            leases: NatsLeaseTable::new(checkpoints),
            publish_turn: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The shard ids, `shard-0000` upwards, one per partition.
    pub fn shard_ids(&self) -> Vec<String> {
        (0..self.partitions).map(shard_id).collect()
    }

    /// The shard a partition key's records go to.
    pub fn shard_of(&self, partition_key: &str) -> String {
        shard_id(crate::partition::shard_for(partition_key, self.partitions))
    }

    /// The table of this stream's leases and checkpoints.
    pub fn leases(&self) -> &NatsLeaseTable {
        &self.leases
    }

    /// A reader of `shard` for `consumer`, resuming after its checkpoint or,
    /// without one, at the oldest record kept. Unleased: nothing stops
    /// another process reading the same shard; see
    /// [`LeasedStream::leased_shard_reader`].
    pub async fn reader(&self, shard: &str, consumer: &str) -> Result<NatsShardReader, ReadError> {
        self.open_reader(shard, consumer, None).await
    }

    async fn open_reader(
        &self,
        shard: &str,
        consumer: &str,
        owner: Option<String>,
    ) -> Result<NatsShardReader, ReadError> {
        let index = (0..self.partitions)
            .find(|i| shard_id(*i) == shard)
            .ok_or_else(|| ReadError::NoSuchShard(shard.to_string()))?;
        // It becomes a KV key: no dots, wildcards or spaces.
        check_name("consumer", consumer)?;
        NatsShardReader::open(
            self.js.clone(),
            self.name.clone(),
            (shard.to_string(), subject(&self.name, index)),
            consumer.to_string(),
            self.leases.clone(),
            owner,
        )
        .await
    }
}

#[async_trait]
impl LeasedStream for NatsStream {
    async fn lease_shards(&self) -> Result<Vec<String>, ReadError> {
        Ok(self.shard_ids())
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
impl StreamProducer for NatsStream {
    async fn put(&self, records: Vec<PutRecord>) -> Result<Vec<PutOutcome>, ProduceError> {
        producer::put(self, records).await
    }

    /// Any number: a put hands all its records to the one connection under
    /// [`NatsStream::publish_turn`] before it first waits for an ack, so
    /// puts reach the server, and are stored, in the order they began.
    /// A failed record can still be overtaken by a later one of its key.
    fn max_puts_in_order(&self) -> usize {
        usize::MAX
    }
}

fn shard_id(index: u32) -> String {
    format!("shard-{index:04}")
}

fn subject(stream: &str, partition: u32) -> String {
    format!("{stream}.{partition}")
}

fn stream_config(name: &str, cfg: &NatsConfig) -> stream::Config {
    stream::Config {
        name: name.to_string(),
        subjects: (0..cfg.partitions.max(1))
            .map(|i| subject(name, i))
            .collect(),
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        max_age: cfg.retention,
        num_replicas: cfg.replicas.max(1),
        duplicate_window: cfg.duplicate_window,
        ..stream::Config::default()
    }
}

/// The partition count of a stream whose subjects are exactly
/// `name.0` … `name.{N-1}`; any other stream is not one of ours.
fn partitions_of(name: &str, subjects: &[String]) -> Result<u32, ReadError> {
    let n = u32::try_from(subjects.len()).unwrap_or(0);
    let ours = n > 0 && (0..n).all(|i| subjects.contains(&subject(name, i)));
    if ours {
        Ok(n)
    } else {
        Err(ReadError::InvalidArgument(format!(
            "stream {name} captures {subjects:?}, not iotpipe's partitions {name}.0 to {name}.N"
        )))
    }
}

async fn checkpoint_bucket(
    js: &jetstream::Context,
    stream: &str,
    cfg: &NatsConfig,
) -> Result<kv::Store, ReadError> {
    let bucket = format!("{stream}-checkpoints");
    if let Ok(store) = js.get_key_value(&bucket).await {
        return Ok(store);
    }
    js.create_key_value(kv::Config {
        bucket: bucket.clone(),
        description: format!("iotpipe consumer checkpoints and leases of stream {stream}"),
        history: 1,
        storage: stream::StorageType::File,
        num_replicas: cfg.replicas.max(1),
        ..kv::Config::default()
    })
    .await
    .map_err(|e| ReadError::Io(format!("opening checkpoint bucket {bucket}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_is_ours_only_with_exactly_its_partition_subjects() {
        let subjects = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(partitions_of("s", &subjects(&["s.0"])).unwrap(), 1);
        assert_eq!(
            partitions_of("s", &subjects(&["s.1", "s.0", "s.2"])).unwrap(),
            3
        );
        assert!(partitions_of("s", &subjects(&["s.*"])).is_err());
        assert!(partitions_of("s", &subjects(&["s.0", "s.2"])).is_err());
        assert!(partitions_of("s", &[]).is_err());
    }

    #[test]
    fn shards_are_named_as_the_embedded_log_names_them() {
        assert_eq!(shard_id(0), "shard-0000");
        assert_eq!(shard_id(12), "shard-0012");
        assert_eq!(subject("iotpipe", 3), "iotpipe.3");
    }
}
