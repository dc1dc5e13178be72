//! The stream contract and resharding, run against Kinesis on moto.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use stream::kinesis::{Checkpoint, KinesisConfig, KinesisStream, ReaderConfig};
use stream::lease::{LeaseStore, LeasedStream};
use stream::{PutOutcome, PutRecord, ReadError, ShardReader, StreamProducer};
use testkit::lease_conformance::{self, LeaseHarness, drain_reader};
use testkit::moto::{moto_config, unique_name};
use testkit::stream_conformance::{Harness, put_stored, record};

struct Moto {
    stream: Arc<KinesisStream>,
    producer: Arc<OneCallAtATime>,
    shard_ids: Vec<String>,
}

fn fast_readers() -> KinesisConfig {
    KinesisConfig {
        reader: ReaderConfig {
            poll_interval: Duration::from_millis(50),
            ..ReaderConfig::default()
        },
        ..KinesisConfig::default()
    }
}

/// A fresh stream of `shards` shards with its own lease table.
async fn kinesis(shards: u32) -> KinesisStream {
    let aws = moto_config().unwrap();
    let stream = KinesisStream::connect(&aws, &unique_name("stream"), &unique_name("leases"))
        .await
        .with_config(fast_readers());
    stream.create(Some(shards)).await.unwrap();
    stream
}

impl Moto {
    async fn new() -> Self {
        let stream = kinesis(2).await;
        let shard_ids = stream.shard_ids().await.unwrap();
        assert_eq!(shard_ids.len(), 2);
        let stream = Arc::new(stream);
        Moto {
            producer: Arc::new(OneCallAtATime {
                inner: stream.clone(),
                turn: tokio::sync::Mutex::new(()),
            }),
            stream,
            shard_ids,
        }
    }
}

/// moto numbers a shard's records as "highest so far + 1" without a lock,
/// so two PutRecords calls at once can be handed the same sequence number
/// (real Kinesis never does). The harness puts one call at a time, which
/// still tests our producer with many concurrent callers.
struct OneCallAtATime {
    inner: Arc<KinesisStream>,
    turn: tokio::sync::Mutex<()>,
}

#[async_trait]
impl StreamProducer for OneCallAtATime {
    async fn put(&self, records: Vec<PutRecord>) -> Result<Vec<PutOutcome>, stream::ProduceError> {
        let _turn = self.turn.lock().await;
        self.inner.put(records).await
    }
}

#[async_trait]
impl Harness for Moto {
    fn producer(&self) -> Arc<dyn StreamProducer> {
        self.producer.clone()
    }

    fn shard_ids(&self) -> Vec<String> {
        self.shard_ids.clone()
    }

    async fn reader(&self, shard: &str, consumer: &str) -> Result<Box<dyn ShardReader>, ReadError> {
        Ok(Box::new(self.stream.reader(shard, consumer).await?))
    }
}

testkit::stream_conformance_tests!(Moto::new().await);

async fn put(stream: &KinesisStream, records: Vec<PutRecord>) -> Vec<(String, stream::SeqNo)> {
    put_stored("put", stream, records).await.unwrap()
}

#[tokio::test]
async fn children_wait_until_their_parent_is_read_to_its_end() {
    let stream = kinesis(1).await;
    let parent = stream.shard_ids().await.unwrap().remove(0);
    put(&stream, (0..4).map(|i| record("before", i)).collect()).await;

    // Split the only shard in the middle of the hash-key space.
    let aws = moto_config().unwrap().load().await;
    aws_sdk_kinesis::Client::new(&aws)
        .split_shard()
        .stream_name(stream.stream_name())
        .shard_to_split(&parent)
        .new_starting_hash_key((1u128 << 127).to_string())
        .send()
        .await
        .unwrap();

    let shards = stream.shards().await.unwrap();
    assert_eq!(shards.len(), 3, "{shards:?}");
    assert!(shards.iter().find(|s| s.id == parent).unwrap().closed);
    let children: Vec<String> = shards
        .iter()
        .filter(|s| s.id != parent)
        .map(|s| s.id.clone())
        .collect();
    assert!(
        shards
            .iter()
            .filter(|s| s.id != parent)
            .all(|c| c.parents == [parent.clone()] && !c.closed)
    );

    // Every child holds back while its parent is unfinished.
    let mut child_readers = Vec::new();
    for child in &children {
        let mut reader = stream.reader(child, "app").await.unwrap();
        let early = reader
            .next_batch(100, Duration::from_millis(150))
            .await
            .unwrap();
        assert!(early.is_empty());
        assert_eq!(reader.waiting_for_parents(), std::slice::from_ref(&parent));
        child_readers.push(reader);
    }

    // The parent's reader reads what it holds, checkpoints, and so ends it.
    // (moto keeps the parent's records in the parent, as Kinesis does.)
    let mut parent_reader = stream.reader(&parent, "app").await.unwrap();
    let read = drain_reader(&mut parent_reader, 100, Duration::from_millis(200))
        .await
        .unwrap();
    let expected: Vec<Bytes> = (0..4).map(|i| Bytes::from(format!("before/{i}"))).collect();
    assert_eq!(read, expected);
    assert_eq!(
        stream.leases().get("app", &parent).await.unwrap(),
        Some(Checkpoint::ShardEnd)
    );

    // Now the children read; another consumer still waits on its own view.
    for reader in &mut child_readers {
        reader
            .next_batch(100, Duration::from_millis(100))
            .await
            .unwrap();
        assert!(reader.waiting_for_parents().is_empty());
    }
    let mut other = stream.reader(&children[0], "other-app").await.unwrap();
    other
        .next_batch(10, Duration::from_millis(100))
        .await
        .unwrap();
    assert_eq!(other.waiting_for_parents(), std::slice::from_ref(&parent));
}

#[tokio::test]
async fn a_second_reader_of_the_same_consumer_loses_its_checkpoint() {
    let stream = kinesis(1).await;
    let stored = put(&stream, (0..3).map(|i| record("k", i)).collect()).await;
    let shard = stored[0].0.clone();
    let mut first = stream.reader(&shard, "app").await.unwrap();
    let mut second = stream.reader(&shard, "app").await.unwrap();
    let a = first.next_batch(10, Duration::from_secs(5)).await.unwrap();
    let b = second.next_batch(10, Duration::from_secs(5)).await.unwrap();
    assert_eq!(a.len(), 3);
    assert_eq!(b.len(), 3);
    first.checkpoint(a[2].seq).await.unwrap();
    let lost = second.checkpoint(b[1].seq).await;
    assert!(matches!(lost, Err(ReadError::Io(_))), "{lost:?}");
    assert_eq!(
        stream.leases().get("app", &shard).await.unwrap(),
        Some(Checkpoint::At(a[2].seq.to_string())),
        "the losing reader must not rewind the checkpoint"
    );
}

#[tokio::test]
async fn checkpoints_past_what_was_read_are_refused() {
    let stream = kinesis(1).await;
    let stored = put(&stream, vec![record("k", 0)]).await;
    let mut reader = stream.reader(&stored[0].0, "app").await.unwrap();
    assert!(matches!(
        reader.checkpoint(stored[0].1).await,
        Err(ReadError::InvalidArgument(_))
    ));
    let batch = reader.next_batch(10, Duration::from_secs(5)).await.unwrap();
    assert!(matches!(
        reader
            .checkpoint(format!("{}0", batch[0].seq).parse().unwrap())
            .await,
        Err(ReadError::InvalidArgument(_))
    ));
    reader.checkpoint(batch[0].seq).await.unwrap();
}

#[tokio::test]
async fn unknown_shards_are_reported() {
    let stream = kinesis(1).await;
    let err = stream.reader("shardId-999999999999", "app").await;
    assert!(matches!(err, Err(ReadError::NoSuchShard(_))), "{err:?}");
}

/// Kinesis on moto for the lease checks: a stream of four shards that each
/// process connects to with clients of its own.
struct LeasedMoto {
    stream: KinesisStream,
}

#[async_trait]
impl LeaseHarness for LeasedMoto {
    async fn connect(&self) -> anyhow::Result<Arc<dyn LeasedStream>> {
        let aws = moto_config().map_err(anyhow::Error::msg)?;
        let of = &self.stream;
        let stream = KinesisStream::connect(&aws, of.stream_name(), of.leases().table_name())
            .await
            .with_config(fast_readers());
        Ok(Arc::new(stream))
    }

    async fn put(&self, records: Vec<PutRecord>) -> anyhow::Result<()> {
        put(&self.stream, records).await;
        Ok(())
    }
}

#[tokio::test]
async fn two_processes_split_the_shards_and_a_dead_ones_move_after_the_expiry() {
    let h = LeasedMoto {
        stream: kinesis(4).await,
    };
    lease_conformance::two_processes_split_the_shards_and_a_dead_ones_move_after_the_expiry(&h)
        .await
        .unwrap();
}
