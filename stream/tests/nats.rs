//! The stream contract, deduplication and a server crash, run against NATS
//! JetStream (`nats-server -js`, started per test by `testkit::nats`, or the
//! server `IOTPIPE_TEST_NATS_URL` names).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use stream::lease::LeasedStream;
use stream::nats::{self, NatsConfig, NatsStream};
use stream::{PutOutcome, PutRecord, ReadError, SeqNo, ShardReader, StreamProducer};
use testkit::lease_conformance::{self, LeaseHarness};
use testkit::moto::unique_name;
use testkit::nats::NatsServer;
use testkit::stream_conformance::{put_stored, record};

mod support;
use support::{NatsHarness, read_exactly};

fn config(partitions: u32) -> NatsConfig {
    NatsConfig {
        partitions,
        ..NatsConfig::default()
    }
}

async fn open(server: &NatsServer, name: &str, partitions: u32) -> NatsStream {
    let client = nats::connect(server.url()).await.unwrap();
    NatsStream::open(client, name, &config(partitions))
        .await
        .unwrap()
}

/// The conformance suite's stream, on a server of its own.
async fn harness() -> NatsHarness<NatsServer> {
    let server = NatsServer::start().unwrap();
    let stream = open(&server, &unique_name("conformance"), 2).await;
    NatsHarness {
        stream: Arc::new(stream),
        _servers: server,
    }
}

testkit::stream_conformance_tests!(harness().await);

async fn put(stream: &NatsStream, records: Vec<PutRecord>) -> Vec<(String, SeqNo)> {
    put_stored("put", stream, records).await.unwrap()
}

#[tokio::test]
async fn a_retried_put_of_the_same_record_is_stored_once() {
    let server = NatsServer::start().unwrap();
    let stream = open(&server, &unique_name("dedup"), 2).await;
    let first = put(&stream, vec![record("dev-1", 0), record("dev-1", 1)]).await;
    // The caller retries both (say their acks were lost), and a new one.
    let again = put(
        &stream,
        vec![record("dev-1", 0), record("dev-1", 1), record("dev-1", 2)],
    )
    .await;
    assert_eq!(
        again[..2],
        first[..],
        "a retry names the first sequence numbers"
    );
    assert!(again[2].1 > first[1].1);

    let mut reader = stream.reader(&first[0].0, "app").await.unwrap();
    let read = read_exactly(&mut reader, 3).await;
    let data: Vec<&[u8]> = read.iter().map(|r| r.data.as_ref()).collect();
    assert_eq!(data, [&b"dev-1/0"[..], b"dev-1/1", b"dev-1/2"]);
    assert!(read.iter().all(|r| r.partition_key == "dev-1"));
}

#[tokio::test]
async fn a_put_larger_than_the_clients_ack_pool_is_stored_whole_and_in_order() {
    let server = NatsServer::start().unwrap();
    let stream = open(&server, &unique_name("large"), 2).await;
    // More records than the client lends ack permits for (5,000).
    let records: Vec<PutRecord> = (0..6_000)
        .map(|i| record(&format!("dev-{}", i % 10), i))
        .collect();
    let stored = put(&stream, records).await;
    for key in 0..10 {
        let seqs: Vec<&(String, SeqNo)> = stored.iter().skip(key).step_by(10).collect();
        assert!(
            seqs.windows(2).all(|w| w[0].0 == w[1].0 && w[0].1 < w[1].1),
            "dev-{key} was stored out of order"
        );
    }
    let mut total = 0;
    for shard in stream.shard_ids() {
        let n = stored.iter().filter(|(s, _)| *s == shard).count();
        let mut reader = stream.reader(&shard, "app").await.unwrap();
        read_exactly(&mut reader, n).await;
        total += n;
    }
    assert_eq!(total, 6_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_survive_a_server_crash_and_a_reader_resumes_after_its_checkpoint() {
    let Some(mut server) = NatsServer::start_killable().unwrap() else {
        return;
    };
    let name = unique_name("crash");
    let stream = open(&server, &name, 2).await;
    let stored = put(&stream, (0..10).map(|i| record("crash", i)).collect()).await;
    let shard = stored[0].0.clone();
    let mut reader = stream.reader(&shard, "app").await.unwrap();
    let read = read_exactly(&mut reader, 10).await;
    reader.checkpoint(read[5].seq).await.unwrap();
    drop(reader);

    server.kill().unwrap();
    server.start_again().unwrap();

    // A restarted process: a new connection, the same stream.
    let reopened = open(&server, &name, 2).await;
    let mut resumed = reopened.reader(&shard, "app").await.unwrap();
    let rest = read_exactly(&mut resumed, 4).await;
    let seqs: Vec<SeqNo> = rest.iter().map(|r| r.seq).collect();
    let expected: Vec<SeqNo> = stored[6..].iter().map(|(_, s)| *s).collect();
    assert_eq!(seqs, expected);
    let mut other = reopened.reader(&shard, "other").await.unwrap();
    assert_eq!(read_exactly(&mut other, 10).await.len(), 10);

    // The first connection reconnects by itself; a put during that may time
    // out, and its retry is stored once.
    let mut attempts = 0;
    let late = loop {
        attempts += 1;
        match stream
            .put(vec![record("crash", 10)])
            .await
            .unwrap()
            .remove(0)
        {
            PutOutcome::Stored { seq, .. } => break seq,
            PutOutcome::Failed { retryable, message } => {
                assert!(retryable && attempts < 10, "{message}");
            }
        }
    };
    let tail = read_exactly(&mut resumed, 1).await;
    assert_eq!(tail[0].seq, late);
    assert_eq!(tail[0].data, "crash/10");
}

#[tokio::test]
async fn an_existing_stream_keeps_its_partitions() {
    let server = NatsServer::start().unwrap();
    let name = unique_name("reopen");
    let first = open(&server, &name, 3).await;
    let again = open(&server, &name, 8).await;
    assert_eq!(again.shard_ids(), first.shard_ids());
    assert_eq!(again.shard_ids().len(), 3);
    assert_eq!(again.shard_of("dev-7"), first.shard_of("dev-7"));
}

#[tokio::test]
async fn bad_shards_consumers_and_checkpoints_are_refused() {
    let server = NatsServer::start().unwrap();
    let stream = open(&server, &unique_name("refuse"), 2).await;
    let err = stream.reader("shard-0002", "app").await;
    assert!(matches!(err, Err(ReadError::NoSuchShard(_))), "{err:?}");
    let err = stream.reader("shard-0000", "a.b").await;
    assert!(matches!(err, Err(ReadError::InvalidArgument(_))), "{err:?}");

    let stored = put(&stream, vec![record("k", 0), record("k", 1)]).await;
    let mut reader = stream.reader(&stored[0].0, "app").await.unwrap();
    let unread = reader.checkpoint(stored[0].1).await;
    assert!(
        matches!(unread, Err(ReadError::InvalidArgument(_))),
        "{unread:?}"
    );
    let first = reader.next_batch(1, Duration::from_secs(10)).await.unwrap();
    assert_eq!(first.len(), 1);
    let ahead = reader.checkpoint(stored[1].1).await;
    assert!(
        matches!(ahead, Err(ReadError::InvalidArgument(_))),
        "{ahead:?}"
    );
    reader.checkpoint(first[0].seq).await.unwrap();
    assert_eq!(reader.lag().records_behind, 1);
}

/// A stream of four partitions for the lease checks, which each process
/// opens with a client of its own.
struct LeasedNats {
    server: NatsServer,
    stream: NatsStream,
}

impl LeasedNats {
    async fn new() -> Self {
        let server = NatsServer::start().unwrap();
        let stream = open(&server, &unique_name("leased"), 4).await;
        LeasedNats { server, stream }
    }
}

#[async_trait::async_trait]
impl LeaseHarness for LeasedNats {
    async fn connect(&self) -> anyhow::Result<Arc<dyn LeasedStream>> {
        Ok(Arc::new(open(&self.server, self.stream.name(), 4).await))
    }

    async fn put(&self, records: Vec<PutRecord>) -> anyhow::Result<()> {
        put(&self.stream, records).await;
        Ok(())
    }
}

#[tokio::test]
async fn two_processes_split_the_partitions_and_a_dead_ones_move_after_the_expiry() {
    let h = LeasedNats::new().await;
    lease_conformance::two_processes_split_the_shards_and_a_dead_ones_move_after_the_expiry(&h)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_racing_takes_of_a_lease_one_wins() {
    let h = LeasedNats::new().await;
    lease_conformance::of_racing_takes_one_wins(&h)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_checkpoint_written_before_leases_is_where_the_first_owner_resumes() {
    let server = NatsServer::start().unwrap();
    let stream = open(&server, &unique_name("upgrade"), 1).await;
    let stored = put(&stream, (0..3).map(|i| record("k", i)).collect()).await;
    // An unleased reader (or a release without leases) checkpoints the first.
    let mut unleased = stream.reader(&stored[0].0, "processors").await.unwrap();
    let first = unleased
        .next_batch(1, Duration::from_secs(10))
        .await
        .unwrap();
    unleased.checkpoint(first[0].seq).await.unwrap();
    drop(unleased);
    let leases = stream.lease_store();
    let snapshot = leases.snapshot("processors").await.unwrap();
    assert_eq!(snapshot.leases.len(), 1);
    assert_eq!(snapshot.leases[0].owner, None);
    let lease = &snapshot.leases[0];
    assert!(
        leases
            .take("processors", &lease.shard, "owner-1", Some(lease.counter))
            .await
            .unwrap()
    );
    let mut leased = stream
        .leased_shard_reader(&stored[0].0, "processors", "owner-1")
        .await
        .unwrap();
    let rest = read_exactly(leased.as_mut(), 2).await;
    assert_eq!(rest[0].seq, stored[1].1);
    leased.checkpoint(rest[1].seq).await.unwrap();
}
