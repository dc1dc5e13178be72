//! The stream on a three-node JetStream cluster, each partition replicated
//! on every node (`testkit::nats::NatsCluster`): the stream contract holds,
//! and a node killed with SIGKILL while records are being appended loses no
//! acknowledged record and stores none twice.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use stream::nats::{self, NatsConfig, NatsStream};
use stream::{PutOutcome, ReadError, SeqNo, StreamProducer};
use testkit::moto::unique_name;
use testkit::nats::NatsCluster;
use testkit::stream_conformance::record;

mod support;
use support::{NatsHarness, read_exactly};

const NODES: usize = 3;

/// Opens stream `name` with a replica on every node. A new cluster elects
/// its JetStream leader after the servers start, and creating a stream
/// fails until it has one, so the open is tried again until it succeeds.
async fn open_replicated(cluster: &NatsCluster, name: &str) -> NatsStream {
    let config = NatsConfig {
        partitions: 2,
        replicas: NODES,
        ..NatsConfig::default()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let client = nats::connect(&cluster.url()).await.unwrap();
        match NatsStream::open(client, name, &config).await {
            Ok(stream) => return stream,
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("the cluster is not ready yet: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the cluster never took the stream: {e}"),
        }
    }
}

/// The conformance suite's stream, on a cluster of its own.
async fn harness() -> NatsHarness<NatsCluster> {
    let cluster = NatsCluster::start(NODES).unwrap();
    let stream = open_replicated(&cluster, &unique_name("conformance")).await;
    NatsHarness {
        stream: Arc::new(stream),
        _servers: cluster,
    }
}

testkit::stream_conformance_tests!(harness().await);

/// Puts records `range` (ten keys) in batches of 50, putting again what
/// failed as retryable, as the endpoint does, until each is stored; adds
/// where each went to `stored`, and each record that failed at least once
/// to `retried`.
async fn put_until_stored(
    stream: &NatsStream,
    range: std::ops::Range<usize>,
    stored: &mut BTreeMap<usize, (String, SeqNo)>,
    retried: &mut BTreeSet<usize>,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut todo: Vec<usize> = range.collect();
    while !todo.is_empty() {
        let batch: Vec<usize> = todo.iter().copied().take(50).collect();
        let records = batch
            .iter()
            .map(|&i| record(&format!("dev-{}", i % 10), i))
            .collect();
        let outcomes = stream.put(records).await.unwrap();
        for (i, outcome) in batch.iter().zip(outcomes) {
            match outcome {
                PutOutcome::Stored { shard, seq } => {
                    stored.insert(*i, (shard, seq));
                    todo.retain(|t| t != i);
                }
                PutOutcome::Failed { retryable, message } => {
                    retried.insert(*i);
                    assert!(retryable, "record {i}: {message}");
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "record {i} still not stored: {message}"
                    );
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_append_loses_no_acknowledged_record_and_stores_none_twice() {
    let mut cluster = NatsCluster::start(NODES).unwrap();
    let stream = open_replicated(&cluster, &unique_name("node-crash")).await;
    let (mut stored, mut retried) = (BTreeMap::new(), BTreeSet::new());
    put_until_stored(&stream, 0..200, &mut stored, &mut retried).await;
    cluster.kill(0).unwrap();
    put_until_stored(&stream, 200..400, &mut stored, &mut retried).await;
    cluster.start_again(0).unwrap();
    put_until_stored(&stream, 400..500, &mut stored, &mut retried).await;

    // A new process reads every partition from the start.
    let reader_stream = open_replicated(&cluster, stream.name()).await;
    let mut seen: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for shard in reader_stream.shard_ids() {
        let expected = stored.values().filter(|(s, _)| *s == shard).count();
        // Just after a node's restart the cluster may still be settling, and
        // creating a consumer can time out; a process would try again.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut reader = loop {
            match reader_stream.reader(&shard, "check").await {
                Ok(reader) => break reader,
                Err(ReadError::Io(e)) if tokio::time::Instant::now() < deadline => {
                    eprintln!("the consumer is not created yet: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("{shard}: {e}"),
            }
        };
        // Nothing after the expected records: none was stored twice.
        for r in read_exactly(&mut reader, expected).await {
            let text = String::from_utf8(r.data.to_vec()).unwrap();
            let (key, n) = text.split_once('/').unwrap();
            assert_eq!(key, r.partition_key);
            seen.entry(key.to_string())
                .or_default()
                .push(n.parse().unwrap());
        }
    }
    let mut all: Vec<usize> = seen.values().flatten().copied().collect();
    all.sort_unstable();
    assert_eq!(
        all,
        (0..500).collect::<Vec<_>>(),
        "each record exactly once"
    );
    // A key's records keep their put order, except one put again after a
    // failure: the stream may have stored later records of its key by then
    // (the reordering the producer contract allows, and the processors
    // tolerate). Every record put once is in order.
    for (key, ns) in &seen {
        let once: Vec<usize> = ns
            .iter()
            .copied()
            .filter(|n| !retried.contains(n))
            .collect();
        assert!(
            once.windows(2).all(|w| w[0] < w[1]),
            "{key} out of order: {ns:?} (retried: {retried:?})"
        );
    }
}
