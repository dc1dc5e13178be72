//! `iotpipe up`: every stage in one process, on durable local storage.
//!
//! ```text
//! MQTT ──▶ ingest::serve_on ─┐
//! broker ──▶ ingest::bridge ──┴▶ stream ──▶ run_shard × shards ──▶ store ──▶ api::app
//! ```
//!
//! - `check`: the configuration and the files it names, read before
//!   anything starts.
//! - `stages`: one function per stage started.
//!
//! Every stage stops on its own token of one cancellation tree ([`Stops`]).
//! Shutdown cancels them front to back so that nothing acknowledged is left
//! behind: the endpoint stops reading and finishes its appends and acks, then
//! every shard processor drains its shard into the store, then the API and the
//! log close. A restart continues from the checkpoints.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use processors::metrics::ProcessorMetrics;
use processors::store::RollupStore;
use stream::{ShardReader, StreamProducer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::backends::{Store, Stream};
use crate::config::Config;

mod check;
mod stages;
#[cfg(test)]
mod tests;

use check::{CheckedConfig, check};
use stages::{Failures, Wiring};

/// The consumer name under which the local processors checkpoint.
const CONSUMER: &str = "processors";

/// A running pipeline.
pub struct Pipeline {
    /// The plain MQTT listener's address (the TLS one's if plain is off).
    pub mqtt_addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    pub http_addr: SocketAddr,
    pub ingest_metrics: Arc<ingest::IngestMetrics>,
    pub processor_metrics: Arc<ProcessorMetrics>,
    stops: Stops,
    /// The external-broker bridge, when one runs.
    bridge: Option<JoinHandle<()>>,
    ingest: JoinHandle<std::io::Result<()>>,
    /// Every shard processor (or the lease loop that runs them) and the
    /// store's flusher.
    processors: Vec<JoinHandle<Result<(), stream::ReadError>>>,
    maintenance: JoinHandle<()>,
    http: JoinHandle<std::io::Result<()>>,
    stream: Arc<Stream>,
    /// Fires when a stage stops on its own, which is always a failure.
    failed: watch::Receiver<Option<String>>,
}

/// The pipeline's one shutdown mechanism: a token per stage, each a child of
/// one root. [`Pipeline::shutdown`] cancels them in pipeline order; dropping
/// the pipeline cancels the root, and so every stage at once.
struct Stops {
    /// The endpoint and the bridge: whatever acknowledges devices.
    intake: CancellationToken,
    /// The shard processors (each with a child token of its own where leases
    /// come and go) and the flusher.
    processors: CancellationToken,
    maintenance: CancellationToken,
    http: CancellationToken,
    _root: DropGuard,
}

impl Stops {
    fn new() -> Stops {
        let root = CancellationToken::new();
        Stops {
            intake: root.child_token(),
            processors: root.child_token(),
            maintenance: root.child_token(),
            http: root.child_token(),
            _root: root.drop_guard(),
        }
    }
}

/// Wall-clock ms since the epoch, for the shells that need the time.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Wraps a stream producer.
pub type WrapProducer =
    Box<dyn Fn(Arc<dyn StreamProducer>) -> Arc<dyn StreamProducer> + Send + Sync>;
/// Wraps the rollup store the processors write through.
pub type WrapStore = Box<dyn Fn(Arc<dyn RollupStore>) -> Arc<dyn RollupStore> + Send + Sync>;
/// Wraps a shard reader.
pub type WrapReader = Box<dyn Fn(Box<dyn ShardReader>) -> Box<dyn ShardReader> + Send + Sync>;

/// Seams for tests: each stage's backend can be wrapped, to inject faults
/// where they happen in production, without a test-only build.
#[derive(Default)]
pub struct Hooks {
    pub wrap_producer: Option<WrapProducer>,
    pub wrap_store: Option<WrapStore>,
    pub wrap_reader: Option<WrapReader>,
}

/// Opens the data directory, binds both listeners and starts every stage.
/// Returns once the endpoint and the API accept connections.
pub async fn start(config: &Config) -> anyhow::Result<Pipeline> {
    start_with(config, Hooks::default()).await
}

/// [`start`], with each stage's backend passed through `hooks`.
pub async fn start_with(config: &Config, hooks: Hooks) -> anyhow::Result<Pipeline> {
    let CheckedConfig {
        aggregate,
        tls,
        authorizer,
        bridge,
        tokens,
        alerts,
    } = check(config)?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let stream = Arc::new(Stream::open(config).await?);
    let store = Arc::new(Store::open(config).await?);
    let mqtt = stages::bind_mqtt(config, tls).await?;
    let http = TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("cannot listen for HTTP on {}", config.http.listen))?;
    let http_addr = http.local_addr()?;
    let (failures, failed) = Failures::new();
    let stops = Stops::new();
    let wiring = Wiring {
        config,
        aggregate,
        stream: stream.clone(),
        store,
        failures,
        alerts: alerts.map(Arc::new),
        alert_metrics: Arc::default(),
    };

    // Back to front, so that each stage's consumer runs before it does.
    let processor_metrics = Arc::new(ProcessorMetrics::default());
    let processors = wiring
        .start_processors(
            hooks.wrap_store.as_ref(),
            hooks.wrap_reader,
            &processor_metrics,
            &stops.processors,
        )
        .await?;
    let ingest_metrics = Arc::new(ingest::IngestMetrics::new());
    let producer: Arc<dyn StreamProducer> = match &hooks.wrap_producer {
        Some(wrap) => wrap(stream.producer()),
        None => stream.producer(),
    };
    let ingest = wiring.start_endpoint(
        mqtt.listeners,
        authorizer,
        &producer,
        &ingest_metrics,
        &stops.intake,
    );
    let bridge =
        bridge.map(|bc| wiring.start_bridge(bc, &producer, &ingest_metrics, &stops.intake));
    let http = wiring.start_api(
        http,
        tokens,
        &ingest_metrics,
        &processor_metrics,
        &stops.http,
    );
    let maintenance = wiring.start_maintenance(&stops.maintenance);

    Ok(Pipeline {
        mqtt_addr: mqtt.addr,
        tls_addr: mqtt.tls_addr,
        http_addr,
        ingest_metrics,
        processor_metrics,
        stops,
        bridge,
        ingest,
        processors,
        maintenance,
        http,
        stream,
        failed,
    })
}

impl Pipeline {
    /// Resolves when a stage stops without being asked to, with the reason.
    pub async fn failure(&mut self) -> String {
        loop {
            if let Some(why) = self.failed.borrow_and_update().clone() {
                return why;
            }
            if self.failed.changed().await.is_err() {
                return "every stage is gone".into();
            }
        }
    }

    /// Stops every stage, front to back, draining what is in flight.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let mut errors: Vec<String> = Vec::new();
        // Intake first: the endpoint and the bridge stop taking messages and
        // finish the appends and acks they have in flight.
        self.stops.intake.cancel();
        if let Some(task) = self.bridge.take()
            && let Err(e) = task.await
        {
            errors.push(format!("broker bridge task: {e}"));
        }
        note(&mut errors, "MQTT endpoint", (&mut self.ingest).await);
        // Then the processors drain what the intake appended.
        self.stops.processors.cancel();
        for task in self.processors.drain(..) {
            note(&mut errors, "processor", task.await);
        }
        self.stops.maintenance.cancel();
        if let Err(e) = (&mut self.maintenance).await {
            errors.push(format!("maintenance task: {e}"));
        }
        self.stops.http.cancel();
        note(&mut errors, "HTTP API", (&mut self.http).await);
        if let Err(e) = self.stream.close().await {
            errors.push(format!("{e:#}"));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("shutdown was not clean: {}", errors.join("; "))
        }
    }
}

/// Adds how a stage's task ended to `errors`, unless it ended well.
fn note<E: std::fmt::Display>(
    errors: &mut Vec<String>,
    stage: &str,
    ended: Result<Result<(), E>, tokio::task::JoinError>,
) {
    match ended {
        Ok(Ok(())) => {}
        Ok(Err(e)) => errors.push(format!("{stage}: {e}")),
        Err(e) => errors.push(format!("{stage} task: {e}")),
    }
}
