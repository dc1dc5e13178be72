//! `iotpipe up`: every stage in one process, on durable local storage; and
//! the same stages split by role (`iotpipe ingest`, `process`, `api`) into
//! processes that share a stream and a store.
//!
//! ```text
//! MQTT ──▶ ingest::serve_on ─┐
//! broker ──▶ ingest::bridge ──┴▶ stream ──▶ run_shard × shards ──▶ store ──▶ api::app
//! └──────────── ingest ──────────┘          └────── process ──────┘        └── api ──┘
//! ```
//!
//! - `check`: the configuration and the files it names, read before
//!   anything starts.
//! - `roles`: which stages a process runs, and the backends a role refuses.
//! - `stages`: one function per stage started; `alerts`, the alert loop's
//!   wiring (its lease, where its alerts go).
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

mod alerts;
mod check;
mod roles;
mod stages;
#[cfg(test)]
mod tests;

use check::{CheckedConfig, check};
pub use roles::Roles;
use stages::{Failures, Wiring};

/// The consumer name under which the local processors checkpoint.
const CONSUMER: &str = "processors";

/// A running pipeline: every stage, as `iotpipe up` runs them.
pub struct Pipeline {
    /// The plain MQTT listener's address (the TLS one's if plain is off).
    pub mqtt_addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    pub http_addr: SocketAddr,
    pub ingest_metrics: Arc<ingest::IngestMetrics>,
    pub processor_metrics: Arc<ProcessorMetrics>,
    running: Running,
}

/// The stages of some roles, running in this process.
pub struct Running {
    pub roles: Roles,
    /// The plain MQTT listener's address (the TLS one's if plain is off),
    /// with the ingest role.
    pub mqtt_addr: Option<SocketAddr>,
    pub tls_addr: Option<SocketAddr>,
    /// The query API with the api role; else `/metrics` and `/healthz`.
    pub http_addr: SocketAddr,
    pub ingest_metrics: Arc<ingest::IngestMetrics>,
    pub processor_metrics: Arc<ProcessorMetrics>,
    stops: Stops,
    /// The external-broker bridge, when one runs.
    bridge: Option<JoinHandle<()>>,
    ingest: Option<JoinHandle<std::io::Result<()>>>,
    /// Every shard processor (or the lease loop that runs them) and the
    /// store's flusher.
    processors: Vec<JoinHandle<Result<(), stream::ReadError>>>,
    maintenance: Option<JoinHandle<()>>,
    http: JoinHandle<std::io::Result<()>>,
    stream: Option<Arc<Stream>>,
    /// Fires when a stage stops on its own, which is always a failure.
    failed: watch::Receiver<Option<String>>,
    /// Keeps `failed` open while the process runs, also when no stage that
    /// can fail on its own holds it (the api role alone).
    _failures: Failures,
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
    let running = start_roles_with(config, Roles::ALL, hooks).await?;
    let mqtt_addr = running
        .mqtt_addr
        .context("the pipeline started without an MQTT endpoint")?;
    Ok(Pipeline {
        mqtt_addr,
        tls_addr: running.tls_addr,
        http_addr: running.http_addr,
        ingest_metrics: running.ingest_metrics.clone(),
        processor_metrics: running.processor_metrics.clone(),
        running,
    })
}

/// Starts the stages of `roles` only, opening only the backends they use.
/// Returns once their listeners accept connections.
pub async fn start_roles(config: &Config, roles: Roles) -> anyhow::Result<Running> {
    start_roles_with(config, roles, Hooks::default()).await
}

async fn start_roles_with(config: &Config, roles: Roles, hooks: Hooks) -> anyhow::Result<Running> {
    roles::refuse_unshared(config, roles)?;
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
    let stream = match roles.needs_stream() {
        true => Some(Arc::new(Stream::open(config).await?)),
        false => None,
    };
    let store = match roles.needs_store() || roles.relays_alerts(config) {
        true => Some(Arc::new(Store::open(config).await?)),
        false => None,
    };
    let mqtt = match roles.ingest {
        true => Some(stages::bind_mqtt(config, tls).await?),
        false => None,
    };
    let http = TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("cannot listen for HTTP on {}", config.http.listen))?;
    let http_addr = http.local_addr()?;
    let (failures, failed) = Failures::new();
    let stops = Stops::new();
    let ingest_metrics = Arc::new(ingest::IngestMetrics::new());
    let wiring = Wiring {
        config,
        aggregate,
        failures,
        alerts: alerts.map(Arc::new),
        alert_metrics: Arc::default(),
        tap: alerts::live_tap(roles, &ingest_metrics),
    };

    // Back to front, so that each stage's consumer runs before it does.
    let processor_metrics = Arc::new(ProcessorMetrics::default());
    let mut processors = Vec::new();
    let mut maintenance = wiring.start_alert_relay(roles, store.as_deref(), &stops.maintenance);
    if let (true, Some(stream), Some(store)) = (roles.process, &stream, &store) {
        let wrap = (hooks.wrap_store.as_ref(), hooks.wrap_reader);
        processors = wiring
            .start_processors(stream, store, wrap, &processor_metrics, &stops.processors)
            .await?;
        maintenance = Some(wiring.start_maintenance(stream, store, &stops.maintenance));
    }
    let (mut ingest, mut bridge_task, mut mqtt_addr, mut tls_addr) = (None, None, None, None);
    if let (Some(mqtt), Some(stream)) = (mqtt, &stream) {
        let producer: Arc<dyn StreamProducer> = match &hooks.wrap_producer {
            Some(wrap) => wrap(stream.producer()),
            None => stream.producer(),
        };
        let endpoint = wiring.start_endpoint(
            mqtt.listeners,
            authorizer,
            &producer,
            &ingest_metrics,
            &stops.intake,
        );
        ingest = Some(endpoint);
        bridge_task =
            bridge.map(|bc| wiring.start_bridge(bc, &producer, &ingest_metrics, &stops.intake));
        (mqtt_addr, tls_addr) = (Some(mqtt.addr), mqtt.tls_addr);
    }
    let metrics = stages::metrics(
        roles,
        &ingest_metrics,
        &processor_metrics,
        &stream,
        &wiring.alert_metrics,
    );
    let http = match &store {
        Some(store) if roles.api => {
            wiring.start_api(http, store, &stream, tokens, metrics, &stops.http)
        }
        _ => wiring.start_ops(http, &stream, metrics, &stops.http),
    };

    Ok(Running {
        roles,
        mqtt_addr,
        tls_addr,
        http_addr,
        ingest_metrics,
        processor_metrics,
        stops,
        bridge: bridge_task,
        ingest,
        processors,
        maintenance,
        http,
        stream,
        failed,
        _failures: wiring.failures.clone(),
    })
}

impl Pipeline {
    /// Resolves when a stage stops without being asked to, with the reason.
    pub async fn failure(&mut self) -> String {
        self.running.failure().await
    }

    /// Stops every stage, front to back, draining what is in flight.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.running.shutdown().await
    }
}

impl Running {
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
        if let Some(task) = self.ingest.take() {
            note(&mut errors, "MQTT endpoint", task.await);
        }
        // Then the processors drain what the intake appended.
        self.stops.processors.cancel();
        for task in self.processors.drain(..) {
            note(&mut errors, "processor", task.await);
        }
        self.stops.maintenance.cancel();
        if let Some(task) = self.maintenance.take()
            && let Err(e) = task.await
        {
            errors.push(format!("maintenance task: {e}"));
        }
        self.stops.http.cancel();
        note(&mut errors, "HTTP API", (&mut self.http).await);
        if let Some(stream) = &self.stream
            && let Err(e) = stream.close().await
        {
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
