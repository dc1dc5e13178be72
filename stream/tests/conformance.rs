//! The stream contract, run against the embedded log.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use async_trait::async_trait;
use stream::conformance::{self, Harness};
use stream::embedded::{EmbeddedConfig, EmbeddedLog};
use stream::{ReadError, ShardReader, StreamProducer};
use tempfile::TempDir;

struct Embedded {
    log: Arc<EmbeddedLog>,
    _dir: TempDir,
}

impl Embedded {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(dir.path(), EmbeddedConfig::default()).unwrap();
        Embedded { log, _dir: dir }
    }
}

#[async_trait]
impl Harness for Embedded {
    fn producer(&self) -> Arc<dyn StreamProducer> {
        self.log.clone()
    }

    fn shard_ids(&self) -> Vec<String> {
        self.log.shard_ids()
    }

    async fn reader(&self, shard: &str, consumer: &str) -> Result<Box<dyn ShardReader>, ReadError> {
        Ok(Box::new(self.log.reader(shard, consumer)?))
    }
}

#[tokio::test]
async fn round_trip() {
    conformance::round_trip(&Embedded::new()).await.unwrap();
}

#[tokio::test]
async fn order_per_partition_key() {
    conformance::order_per_partition_key(&Embedded::new())
        .await
        .unwrap();
}

#[tokio::test]
async fn sequence_increases_per_shard() {
    conformance::sequence_increases_per_shard(&Embedded::new())
        .await
        .unwrap();
}

#[tokio::test]
async fn checkpoint_resume() {
    conformance::checkpoint_resume(&Embedded::new())
        .await
        .unwrap();
}

#[tokio::test]
async fn batch_limits() {
    conformance::batch_limits(&Embedded::new()).await.unwrap();
}

#[tokio::test]
async fn wait_returns_empty_on_timeout() {
    conformance::wait_returns_empty_on_timeout(&Embedded::new())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_reader_wakes_on_put() {
    conformance::waiting_reader_wakes_on_put(&Embedded::new())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_putters() {
    conformance::concurrent_putters(&Embedded::new())
        .await
        .unwrap();
}

#[tokio::test]
async fn run_all_passes_with_a_fresh_log_per_check() {
    conformance::run_all(|| async { Embedded::new() })
        .await
        .unwrap();
}
