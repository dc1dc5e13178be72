//! What the NATS tests share: the stream conformance harness over a
//! `NatsStream`, holding the server or cluster it runs on for its life, and
//! a read of exactly the records a shard should hold.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use stream::nats::NatsStream;
use stream::{ReadError, Record, ShardReader, StreamProducer};
use testkit::stream_conformance::Harness;

pub struct NatsHarness<S> {
    pub stream: Arc<NatsStream>,
    /// Kept for the stream's life: dropping it kills the servers.
    pub _servers: S,
}

#[async_trait]
impl<S: Send + Sync + 'static> Harness for NatsHarness<S> {
    fn producer(&self) -> Arc<dyn StreamProducer> {
        self.stream.clone()
    }

    fn shard_ids(&self) -> Vec<String> {
        self.stream.shard_ids()
    }

    async fn reader(&self, shard: &str, consumer: &str) -> Result<Box<dyn ShardReader>, ReadError> {
        Ok(Box::new(self.stream.reader(shard, consumer).await?))
    }
}

/// Reads exactly `n` records, then checks that nothing more comes.
pub async fn read_exactly(reader: &mut dyn ShardReader, n: usize) -> Vec<Record> {
    let mut out = Vec::new();
    while out.len() < n {
        let batch = reader
            .next_batch(100, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(!batch.is_empty(), "{} of {n} records came", out.len());
        out.extend(batch);
    }
    let more = reader
        .next_batch(100, Duration::from_millis(300))
        .await
        .unwrap();
    assert!(more.is_empty(), "{} records more than were put", more.len());
    assert_eq!(out.len(), n);
    out
}
