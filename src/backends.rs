//! Which stream and which store `iotpipe up` runs on: the embedded log and
//! SQLite by default, or Kinesis and DynamoDB (real AWS, or a wire-compatible
//! server with `--endpoint-url`), or a NATS JetStream stream and a
//! PostgreSQL store.

use std::sync::Arc;

use anyhow::Context;
use processors::store::cached::{CacheConfig, CachedStore};
use processors::store::dynamodb::DynamoStore;
use processors::store::postgres::PostgresStore;
use processors::store::sqlite::SqliteStore;
use processors::store::{RollupQuery, RollupStore};
use rollup::{Commit, Write};
use schemas::RejectReason;
use schemas::state::DeadLetter;
use stream::embedded::{DroppedRange, EmbeddedConfig, EmbeddedLog};
use stream::kinesis::{AwsConfig, KinesisStream};
use stream::lease::LeasedStream;
use stream::nats::{NatsConfig, NatsStream};
use stream::{ShardReader, StreamProducer};

use crate::config::{BackendConfig, Config, StoreKind, StreamKind};

/// An opened stream: where the endpoint appends and processors read.
pub enum Stream {
    Embedded(Arc<EmbeddedLog>),
    Kinesis(Arc<KinesisStream>),
    Nats(Arc<NatsStream>),
}

impl Stream {
    pub async fn open(config: &Config) -> anyhow::Result<Stream> {
        match config.backend.stream {
            StreamKind::Embedded => {
                let log = EmbeddedLog::open(
                    &config.data_dir.join("stream"),
                    EmbeddedConfig {
                        shards: config.stream.shards,
                        retention_ms: i64::try_from(config.stream.retention.as_millis())
                            .unwrap_or(i64::MAX),
                        max_bytes: config.stream.max_bytes,
                        sync: config.stream.sync,
                        ..EmbeddedConfig::default()
                    },
                )
                .context("cannot open the stream")?;
                Ok(Stream::Embedded(log))
            }
            StreamKind::Kinesis => {
                let b = &config.backend;
                let stream = KinesisStream::connect(&aws(b), &b.stream_name, &b.lease_table).await;
                stream
                    .create(Some(config.stream.shards))
                    .await
                    .with_context(|| format!("cannot open Kinesis stream {}", b.stream_name))?;
                Ok(Stream::Kinesis(Arc::new(stream)))
            }
            StreamKind::Nats => {
                let b = &config.backend;
                let nats = NatsConfig {
                    partitions: config.stream.shards,
                    retention: config.stream.retention,
                    replicas: b.nats_replicas,
                    ..NatsConfig::default()
                };
                let stream = open_nats(&b.nats_url, &b.stream_name, &nats).await?;
                Ok(Stream::Nats(Arc::new(stream)))
            }
        }
    }

    pub fn producer(&self) -> Arc<dyn StreamProducer> {
        match self {
            Stream::Embedded(log) => log.clone(),
            Stream::Kinesis(k) => k.clone(),
            Stream::Nats(n) => n.clone(),
        }
    }

    /// One reader per shard, for the consumer `consumer`.
    pub async fn readers(&self, consumer: &str) -> anyhow::Result<Vec<Box<dyn ShardReader>>> {
        let mut readers: Vec<Box<dyn ShardReader>> = Vec::new();
        match self {
            Stream::Embedded(log) => {
                for shard in log.shard_ids() {
                    let reader = log
                        .reader(&shard, consumer)
                        .with_context(|| format!("cannot read shard {shard}"))?;
                    readers.push(Box::new(reader));
                }
            }
            Stream::Kinesis(k) => {
                for shard in k.shard_ids().await.context("cannot list Kinesis shards")? {
                    let reader = k
                        .reader(&shard, consumer)
                        .await
                        .with_context(|| format!("cannot read shard {shard}"))?;
                    readers.push(Box::new(reader));
                }
            }
            Stream::Nats(n) => {
                for shard in n.shard_ids() {
                    let reader = n
                        .reader(&shard, consumer)
                        .await
                        .with_context(|| format!("cannot read shard {shard}"))?;
                    readers.push(Box::new(reader));
                }
            }
        }
        Ok(readers)
    }

    /// The stream as one that processes share by leases: all but the
    /// embedded log, which belongs to one process.
    pub fn leased(&self) -> Option<Arc<dyn LeasedStream>> {
        match self {
            Stream::Embedded(_) => None,
            Stream::Kinesis(k) => Some(k.clone()),
            Stream::Nats(n) => Some(n.clone()),
        }
    }

    /// Applies retention (the embedded log only; Kinesis keeps its own), and
    /// returns the unread records the disk budget forced out, if any.
    pub async fn maintain(&self, now_ms: i64) -> Vec<DroppedRange> {
        let Stream::Embedded(log) = self else {
            return Vec::new();
        };
        match log.enforce_retention(now_ms).await {
            Ok(report) => report.dropped,
            Err(e) => {
                tracing::warn!(error = %e, "Stream retention failed; will retry.");
                Vec::new()
            }
        }
    }

    /// Why the stream is degraded, if it is: it deleted records the
    /// processors had not read.
    pub fn degraded(&self) -> Option<String> {
        let Stream::Embedded(log) = self else {
            return None;
        };
        let last = log.last_dropped()?;
        let total: u64 = log.records_dropped().iter().map(|(_, n)| n).sum();
        Some(format!(
            "the stream's disk budget (stream.max_bytes) deleted {total} records before the \
             processors read them, last {}..={} of {}; see /v1/dead-letters?reason=retention",
            last.first_seq, last.last_seq, last.shard
        ))
    }

    /// Appends the stream's own metrics to `/metrics`; Kinesis has none
    /// of its own here (CloudWatch keeps them).
    pub fn render_metrics(&self, out: &mut String) {
        if let Stream::Embedded(log) = self {
            log.render_metrics(out);
        }
    }

    pub async fn close(&self) -> anyhow::Result<()> {
        if let Stream::Embedded(log) = self {
            log.close().await.context("closing the stream")?;
        }
        Ok(())
    }
}

/// An opened rollup store. SQLite sits behind a write-behind cache: the
/// processors' flusher writes it out by the flush policy rather than write
/// every change.
///
/// PostgreSQL, like DynamoDB, is written through: it is the store that
/// several processes share (processors, and query APIs elsewhere), and the
/// cache may only run as its store's single writer, while a shard may move
/// from one process to another. Each batch is one transaction of a few
/// batched statements, so writing through costs round trips, not a write per
/// item.
pub enum Store {
    Sqlite {
        cache: Arc<CachedStore<SqliteStore>>,
        db: Arc<SqliteStore>,
    },
    Dynamo(Arc<DynamoStore>),
    Postgres(Arc<PostgresStore>),
}

impl Store {
    /// Opens the store `config` names and checks that its items were
    /// written with the span and resolutions `config` has (or records them
    /// in a new store): a store cut into other spans is refused, not read.
    pub async fn open(config: &Config) -> anyhow::Result<Store> {
        let store = Self::open_unchecked(config).await?;
        // SQLite's own, not the cache's, so that the layout of a new store
        // is on disk from the start rather than from the first flush; the
        // cache holds nothing yet, and loads it from there.
        let (writer, query): (Arc<dyn RollupStore>, Arc<dyn RollupQuery>) = match &store {
            Store::Sqlite { db, .. } => (db.clone(), db.clone()),
            _ => (store.writer(), store.query()),
        };
        processors::store::layout::ensure(writer.as_ref(), query.as_ref(), &config.aggregate()?)
            .await
            .context("cannot open the rollup store")?;
        Ok(store)
    }

    async fn open_unchecked(config: &Config) -> anyhow::Result<Store> {
        match config.backend.store {
            StoreKind::Sqlite => {
                let db = Arc::new(
                    SqliteStore::open(&config.data_dir.join("rollups.db"))
                        .context("cannot open the rollup store")?,
                );
                let cache = Arc::new(CachedStore::new(db.clone(), CacheConfig::default()));
                Ok(Store::Sqlite { cache, db })
            }
            StoreKind::Dynamodb => {
                let b = &config.backend;
                let store = DynamoStore::connect(&aws(b), &b.table_name).await;
                store
                    .create_table()
                    .await
                    .with_context(|| format!("cannot open DynamoDB table {}", b.table_name))?;
                Ok(Store::Dynamo(Arc::new(store)))
            }
            StoreKind::Postgres => {
                let Some(url) = &config.backend.postgres_url else {
                    anyhow::bail!(
                        "the postgres store needs a database: --postgres-url or backend.postgres_url"
                    );
                };
                let pg = processors::store::postgres::parse_url(url)
                    .map_err(anyhow::Error::msg)
                    .context("backend.postgres_url")?;
                let server = processors::store::postgres::describe(&pg);
                let store = PostgresStore::open(pg).await.with_context(|| {
                    format!("cannot open the PostgreSQL rollup store ({server})")
                })?;
                let store = store.with_finest(config.aggregate()?.finest());
                Ok(Store::Postgres(Arc::new(store)))
            }
        }
    }

    pub fn writer(&self) -> Arc<dyn RollupStore> {
        match self {
            Store::Sqlite { cache, .. } => cache.clone(),
            Store::Dynamo(s) => s.clone(),
            Store::Postgres(s) => s.clone(),
        }
    }

    /// Queries read through the cache, so applied readings are visible
    /// before they are flushed.
    pub fn query(&self) -> Arc<dyn RollupQuery> {
        match self {
            Store::Sqlite { cache, .. } => cache.clone(),
            Store::Dynamo(s) => s.clone(),
            Store::Postgres(s) => s.clone(),
        }
    }

    /// Keeps one dead letter per range of stream records lost to the disk
    /// budget, so that a person can see what went.
    pub async fn dead_letter_dropped(&self, dropped: &[DroppedRange], retention_ms: i64) {
        let writes = dropped
            .iter()
            .map(|range| Write::dead_letter(retention_letter(range), 0, retention_ms))
            .collect::<Vec<_>>();
        if writes.is_empty() {
            return;
        }
        let commit = Commit {
            writes,
            then: Vec::new(),
        };
        if let Err(e) = self.writer().commit(commit).await {
            tracing::error!(error = %e, ranges = ?dropped, "Recording stream records lost to the disk budget failed.");
        }
    }

    /// Retention and dead-letter trimming. DynamoDB expires items by its TTL
    /// attribute on its own.
    pub async fn maintain(&self, now_ms: i64, dead_letters_per_reason: usize) {
        let (purged, trimmed) = match self {
            Store::Sqlite { db, .. } => (
                db.purge_expired(now_ms).await,
                db.trim_dead_letters(dead_letters_per_reason).await,
            ),
            Store::Postgres(db) => (
                db.purge_expired(now_ms).await,
                db.trim_dead_letters(dead_letters_per_reason).await,
            ),
            Store::Dynamo(_) => return,
        };
        match purged {
            Ok(n) if n > 0 => tracing::info!(items = n, "Expired rollups purged."),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "Rollup purge failed; will retry."),
        }
        if let Err(e) = trimmed {
            tracing::warn!(error = %e, "Dead-letter trim failed; will retry.");
        }
    }
}

fn retention_letter(range: &DroppedRange) -> DeadLetter {
    DeadLetter::new(
        range.last_arrival_ms,
        RejectReason::Retention,
        format!(
            "stream records {}..={} of {} ({} records) were deleted by the disk budget \
             (stream.max_bytes) before consumer(s) {} read them",
            range.first_seq,
            range.last_seq,
            range.shard,
            range.records,
            range.consumers.join(", ")
        ),
        range.shard.clone(),
        range.first_seq,
    )
}

/// The AWS SDK's configuration: the default credential chain against AWS,
/// or, with an endpoint URL and no credentials in the environment, fixed
/// dummy ones, which a wire-compatible server accepts.
fn aws(b: &BackendConfig) -> AwsConfig {
    let env_credentials = std::env::var_os("AWS_ACCESS_KEY_ID").is_some();
    AwsConfig {
        endpoint_url: b.endpoint_url.clone(),
        // A stand-in needs some region; AWS itself takes it from the
        // environment or profile.
        region: b
            .region
            .clone()
            .or_else(|| b.endpoint_url.as_ref().map(|_| "us-east-1".to_string())),
        dummy_credentials: b.endpoint_url.is_some() && !env_credentials,
    }
}

/// How long a process waits at start for JetStream to take the stream: a
/// cluster that has just started, or lost a node, answers "temporarily
/// unavailable" until it has elected its leaders.
const NATS_OPEN_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

/// Opens (or creates) the stream, trying again while the cluster is not
/// ready, so that processes started beside a fresh cluster need no
/// supervisor to restart them.
async fn open_nats(url: &str, name: &str, config: &NatsConfig) -> anyhow::Result<NatsStream> {
    let deadline = tokio::time::Instant::now() + NATS_OPEN_PATIENCE;
    loop {
        let client = stream::nats::connect(url).await?;
        match NatsStream::open(client, name, config).await {
            Ok(stream) => return Ok(stream),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, stream = name, "JetStream did not take the stream yet; trying again.");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(e) => {
                return Err(anyhow::Error::new(e))
                    .with_context(|| format!("cannot open JetStream stream {name}"));
            }
        }
    }
}
