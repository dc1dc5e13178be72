//! The stream contract and resharding, run against Kinesis on moto.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use stream::kinesis::{
    Checkpoint, KinesisConfig, KinesisShardReader, KinesisStream, LeaseConfig, LeaseKeeper,
    ReaderConfig,
};
use stream::{PutOutcome, PutRecord, ReadError, ShardReader, StreamProducer};
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
    let read = drain_reader(&mut parent_reader, 100, Duration::from_millis(200)).await;
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

/// The consumer name the lease tests share.
const LEASED: &str = "processors";
const LEASE_MS: i64 = 10_000;

/// One consumer process: its own clients, its leases, and a reader per
/// shard it holds.
struct Process {
    stream: KinesisStream,
    keeper: LeaseKeeper,
    readers: BTreeMap<String, KinesisShardReader>,
    consumed: Vec<Bytes>,
}

impl Process {
    async fn new(of: &KinesisStream, owner: &str) -> Self {
        let aws = moto_config().unwrap();
        let stream = KinesisStream::connect(&aws, of.stream_name(), of.leases().table_name())
            .await
            .with_config(fast_readers());
        let config = LeaseConfig {
            lease_duration: Duration::from_millis(LEASE_MS as u64),
            ..LeaseConfig::default()
        };
        let keeper = stream.lease_keeper(LEASED, owner, &config);
        Process {
            stream,
            keeper,
            readers: BTreeMap::new(),
            consumed: Vec::new(),
        }
    }

    /// Renews and takes leases at `now_ms`; starts and stops readers to
    /// match. Returns the shards gained.
    async fn tick(&mut self, now_ms: i64) -> Vec<String> {
        let shards = self.stream.shard_ids().await.unwrap();
        let changes = self.keeper.tick(&shards, now_ms).await.unwrap();
        for shard in &changes.lost {
            self.readers.remove(shard);
        }
        for shard in &changes.gained {
            let reader = self
                .stream
                .leased_reader(shard, LEASED, self.keeper.owner())
                .await
                .unwrap();
            self.readers.insert(shard.clone(), reader);
        }
        changes.gained
    }

    fn held(&self) -> Vec<String> {
        self.keeper.held().map(str::to_owned).collect()
    }

    /// Reads every shard it holds to its current end, checkpointing each
    /// batch.
    async fn drain(&mut self) {
        for reader in self.readers.values_mut() {
            let read = drain_reader(reader, 500, Duration::from_millis(500)).await;
            self.consumed.extend(read);
        }
    }
}

/// Reads `reader` to its current end in batches of up to `max`, waiting up
/// to `wait` for each, and checkpoints every batch: the records' data.
async fn drain_reader(
    reader: &mut (impl ShardReader + ?Sized),
    max: usize,
    wait: Duration,
) -> Vec<Bytes> {
    let mut read = Vec::new();
    loop {
        let batch = reader.next_batch(max, wait).await.unwrap();
        let Some(last) = batch.last().map(|r| r.seq) else {
            return read;
        };
        read.extend(batch.into_iter().map(|r| r.data));
        reader.checkpoint(last).await.unwrap();
    }
}

/// Puts `n` records numbered from `from`, over 40 keys, one call at a time
/// (moto can number two concurrent calls alike).
async fn put_numbered(stream: &KinesisStream, from: usize, n: usize) -> Vec<Bytes> {
    let records: Vec<PutRecord> = (from..from + n)
        .map(|i| record(&format!("dev-{}", i % 40), i))
        .collect();
    let expected = records.iter().map(|r| r.data.clone()).collect();
    put(stream, records).await;
    expected
}

fn sorted(mut v: Vec<Bytes>) -> Vec<Bytes> {
    v.sort();
    v
}

#[tokio::test]
async fn two_processes_split_the_shards_and_a_dead_ones_move_after_the_expiry() {
    let stream = kinesis(4).await;
    let mut a = Process::new(&stream, "process-a").await;
    let mut b = Process::new(&stream, "process-b").await;

    // a starts alone and takes all four; b sees them alive and takes none;
    // a, seeing b, gives up its excess; b takes what a gave up.
    assert_eq!(a.tick(0).await.len(), 4);
    assert!(b.tick(0).await.is_empty());
    a.tick(0).await;
    assert_eq!(b.tick(0).await.len(), 2);
    a.tick(0).await;
    let (held_a, held_b) = (a.held(), b.held());
    assert_eq!(
        (held_a.len(), held_b.len()),
        (2, 2),
        "{held_a:?} {held_b:?}"
    );
    assert!(held_a.iter().all(|s| !held_b.contains(s)));

    // Every record is consumed once, by whichever process holds its shard.
    let mut expected = put_numbered(&stream, 0, 200).await;
    a.drain().await;
    b.drain().await;
    assert!(!a.consumed.is_empty() && !b.consumed.is_empty());
    let both = [a.consumed.clone(), b.consumed.clone()].concat();
    assert_eq!(sorted(both), sorted(expected.clone()));

    // a stops renewing. Its leases expire a lease duration after b first
    // saw their last counters, on b's clock; until then b takes nothing, and
    // then it takes a's shards and resumes after a's checkpoints.
    expected.extend(put_numbered(&stream, 200, 100).await);
    let seen = 1_000;
    assert!(b.tick(seen).await.is_empty());
    assert!(b.tick(seen + LEASE_MS - 1).await.is_empty());
    let mut moved = b.tick(seen + LEASE_MS).await;
    moved.sort();
    assert_eq!(moved, held_a);
    assert_eq!(b.held().len(), 4);
    b.drain().await;
    let both = [a.consumed.clone(), b.consumed.clone()].concat();
    assert_eq!(sorted(both), sorted(expected));

    // a, waking up, may still read its old shards but cannot checkpoint them.
    let shard = held_a[0].clone();
    let reader = a.readers.get_mut(&shard).unwrap();
    let stale = reader
        .next_batch(500, Duration::from_secs(2))
        .await
        .unwrap();
    let last = stale.last().expect("new records in a's old shard").seq;
    let lost = reader.checkpoint(last).await;
    assert!(matches!(lost, Err(ReadError::LeaseLost(_))), "{lost:?}");
    let lease = stream.leases().snapshot(LEASED).await.unwrap();
    let owners: Vec<_> = lease.leases.iter().map(|l| l.owner.as_deref()).collect();
    assert_eq!(owners, [Some("process-b"); 4]);
}
