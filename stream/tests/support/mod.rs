//! What the NATS tests share: the stream conformance harness over a
//! `NatsStream`, holding the server or cluster it runs on for its life.

use std::sync::Arc;

use async_trait::async_trait;
use stream::nats::NatsStream;
use stream::{ReadError, ShardReader, StreamProducer};
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
