//! The stream contract, run against the embedded log.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use async_trait::async_trait;
use stream::embedded::{EmbeddedConfig, EmbeddedLog};
use stream::{ReadError, ShardReader, StreamProducer};
use tempfile::TempDir;
use testkit::stream_conformance::{self as conformance, Harness};

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

testkit::stream_conformance_tests!(Embedded::new());

#[tokio::test]
async fn run_all_passes_with_a_fresh_log_per_check() {
    conformance::run_all(|| async { Embedded::new() })
        .await
        .unwrap();
}
