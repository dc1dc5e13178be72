//! One function per stage `iotpipe up` starts. Each stage stops on its token
//! of the pipeline's cancellation tree, and reports a stop it was not asked
//! for to [`Failures`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use processors::api::guard::{ApiLimits, Guard, Tokens};
use processors::api::{ApiState, MetricsRenderer, app};
use processors::metrics::ProcessorMetrics;
use processors::run::{Durability, FlushPolicy, ProcessorConfig, run_flusher, run_shard};
use processors::store::RollupStore;
use stream::{ReadError, ShardReader, StreamProducer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{CONSUMER, Roles, WrapReader, WrapStore, now_ms};
use crate::backends::{Store, Stream};
use crate::config::Config;
use crate::leased::SpawnShard;

/// How often retention and dead-letter trimming run.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(60);

/// Where stages report that they stopped on their own, which is always a
/// failure; [`super::Pipeline::failure`] watches it.
#[derive(Clone)]
pub(super) struct Failures(Arc<watch::Sender<Option<String>>>);

impl Failures {
    pub(super) fn new() -> (Failures, watch::Receiver<Option<String>>) {
        let (tx, rx) = watch::channel(None);
        (Failures(Arc::new(tx)), rx)
    }

    /// Records `why`, in place of any earlier reason.
    fn report(&self, why: String) {
        self.0.send_replace(Some(why));
    }

    /// Records `why` unless a reason is recorded already: a stage that
    /// stops because another failed must not hide the first reason.
    fn report_unless_reported(&self, why: &str) {
        self.0.send_if_modified(|f| {
            if f.is_none() {
                *f = Some(why.into());
            }
            true
        });
    }
}

/// The MQTT listeners, bound.
pub(super) struct MqttListeners {
    pub(super) listeners: Vec<ingest::Listener>,
    /// The plain listener's address (the TLS one's if plain is off).
    pub(super) addr: SocketAddr,
    pub(super) tls_addr: Option<SocketAddr>,
}

/// Binds the plain MQTT listener (unless it is off) and the TLS one (if
/// configured).
pub(super) async fn bind_mqtt(
    config: &Config,
    tls: Option<(SocketAddr, ingest::tls::TlsAcceptor)>,
) -> anyhow::Result<MqttListeners> {
    let mut listeners = Vec::new();
    let mut plain_addr = None;
    if config.mqtt.plain {
        let socket = TcpListener::bind(config.mqtt.listen)
            .await
            .with_context(|| format!("cannot listen for MQTT on {}", config.mqtt.listen))?;
        plain_addr = Some(socket.local_addr()?);
        listeners.push(ingest::Listener::tcp(socket));
    }
    let mut tls_addr = None;
    if let Some((addr, acceptor)) = tls {
        let socket = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for MQTT over TLS on {addr}"))?;
        tls_addr = Some(socket.local_addr()?);
        listeners.push(ingest::Listener::tls(socket, acceptor));
    }
    let Some(addr) = plain_addr.or(tls_addr) else {
        anyhow::bail!("no MQTT listener: mqtt.plain is off and mqtt.tls_listen is not set");
    };
    Ok(MqttListeners {
        listeners,
        addr,
        tls_addr,
    })
}

/// What the stages share, checked by `start_roles_with`. The stream and
/// the store are passed to the stages that use them: a role opens only
/// those it needs.
pub(super) struct Wiring<'a> {
    pub(super) config: &'a Config,
    pub(super) aggregate: Arc<rollup::AggregateConfig>,
    pub(super) failures: Failures,
    /// The alert rules and where they notify, if any rule is configured.
    pub(super) alerts: Option<Arc<processors::alerts::AlertsSetup>>,
    pub(super) alert_metrics: Arc<processors::alerts::AlertMetrics>,
    /// The endpoint's live tap and its counters, with the ingest role.
    pub(super) tap: Option<(ingest::LiveTap, Arc<ingest::IngestMetrics>)>,
}

/// The test seams of the processors: the store they write through, and
/// each shard reader.
pub(super) type ProcessorWraps<'a> = (Option<&'a WrapStore>, Option<WrapReader>);

impl Wiring<'_> {
    /// Which messages the processors may refuse by time, so that the intake
    /// keeps their client id and raw payload for the dead letter.
    fn lateness(&self) -> ingest::LatenessConfig {
        ingest::LatenessConfig {
            allowed_lateness_ms: self.aggregate.allowed_lateness_ms,
            future_tolerance_ms: self.aggregate.future_tolerance_ms,
        }
    }

    /// A processor per shard (on Kinesis and NATS, per lease this process
    /// holds) and
    /// the store's flusher, all stopping on children of `stop`.
    pub(super) async fn start_processors(
        &self,
        stream: &Arc<Stream>,
        store: &Arc<Store>,
        (wrap_store, wrap_reader): ProcessorWraps<'_>,
        metrics: &Arc<ProcessorMetrics>,
        stop: &CancellationToken,
    ) -> anyhow::Result<Vec<JoinHandle<Result<(), ReadError>>>> {
        let processor = &self.config.processor;
        let processor_config = ProcessorConfig {
            batch_max_records: processor.batch_max_records,
            flush: FlushPolicy {
                interval: processor.flush_interval,
                max_dirty_items: processor.flush_max_dirty_items,
            },
            ..ProcessorConfig::default()
        };
        let durability = Arc::new(Durability::default());
        let store: Arc<dyn RollupStore> = match wrap_store {
            Some(wrap) => wrap(store.writer()),
            None => store.writer(),
        };
        let spawn_shard = shard_spawner(
            ShardStages {
                store: store.clone(),
                aggregate: self.aggregate.clone(),
                processor_config: processor_config.clone(),
                metrics: metrics.clone(),
                durability: durability.clone(),
            },
            wrap_reader,
            self.failures.clone(),
        );
        let mut tasks = Vec::new();
        match stream.leased() {
            Some(shared) => {
                // Shared with any other process on the same stream, by leases.
                let failures = self.failures.clone();
                tasks.push(crate::leased::spawn(
                    shared,
                    CONSUMER,
                    self.config.backend.lease_duration,
                    spawn_shard,
                    stop.clone(),
                    move |why| failures.report(why),
                    now_ms,
                ));
            }
            // The embedded log is one process's: it reads every shard.
            None => {
                for reader in stream.readers(CONSUMER).await? {
                    tasks.push(spawn_shard(reader, stop.child_token()));
                }
            }
        }
        // Flushes happen in one place, so that shards share them.
        let flusher = run_flusher(
            store,
            durability,
            processor_config,
            metrics.clone(),
            watch_of(stop),
        );
        let failures = self.failures.clone();
        tasks.push(tokio::spawn(async move {
            let result = flusher.await;
            if let Err(e) = &result {
                failures.report(format!("the store flusher failed: {e}"));
            }
            result
        }));
        Ok(tasks)
    }

    /// The MQTT endpoint on `listeners`, appending to `producer`.
    pub(super) fn start_endpoint(
        &self,
        listeners: Vec<ingest::Listener>,
        authorizer: Arc<dyn ingest::Authorizer>,
        producer: &Arc<dyn StreamProducer>,
        metrics: &Arc<ingest::IngestMetrics>,
        stop: &CancellationToken,
    ) -> JoinHandle<std::io::Result<()>> {
        let mqtt = &self.config.mqtt;
        let endpoint = ingest::EndpointConfig {
            max_connections: mqtt.max_connections,
            max_inflight: mqtt.max_inflight,
            group_commit: ingest::GroupCommit {
                commit_interval: mqtt.commit_interval,
                commit_interval_min_connections: mqtt.commit_interval_min_connections,
                ..ingest::GroupCommit::default()
            },
            authorizer,
            lateness: self.lateness(),
            presence: mqtt.presence,
            tap: self.tap.clone().map(|(tap, _)| tap).unwrap_or_default(),
            ..ingest::EndpointConfig::default()
        };
        let serve = ingest::serve_on(
            listeners,
            producer.clone(),
            endpoint,
            metrics.clone(),
            stop.clone().cancelled_owned(),
        );
        let failures = self.failures.clone();
        tokio::spawn(async move {
            let result = serve.await;
            failures.report_unless_reported("the MQTT endpoint stopped");
            result
        })
    }

    /// The bridge from an external broker, appending to `producer`.
    pub(super) fn start_bridge(
        &self,
        mut bridge: ingest::bridge::BridgeConfig,
        producer: &Arc<dyn StreamProducer>,
        metrics: &Arc<ingest::IngestMetrics>,
        stop: &CancellationToken,
    ) -> JoinHandle<()> {
        bridge.lateness = self.lateness();
        tokio::spawn(ingest::bridge::run(
            bridge,
            producer.clone(),
            metrics.clone(),
            stop.clone().cancelled_owned(),
        ))
    }

    /// The query API, the dashboard and `/metrics` on `listener`.
    pub(super) fn start_api(
        &self,
        listener: TcpListener,
        store: &Arc<Store>,
        stream: &Option<Arc<Stream>>,
        tokens: Option<Tokens>,
        metrics: MetricsRenderer,
        stop: &CancellationToken,
    ) -> JoinHandle<std::io::Result<()>> {
        let mut state = ApiState::new(store.query(), self.aggregate.clone());
        state.guard = Arc::new(Guard::new(
            tokens,
            ApiLimits {
                max_concurrent: self.config.http.max_concurrent,
                timeout: self.config.http.timeout,
            },
        ));
        let http = &self.config.http;
        state.stale_after = Arc::new(processors::api::StaleAfter {
            default_ms: millis(http.stale_after),
            fleets: http
                .stale_after_fleets
                .iter()
                .map(|(fleet, d)| (fleet.clone(), millis(**d)))
                .collect(),
        });
        if let Some(alerts) = &self.alerts {
            state.alert_rules = alerts.rules.iter().map(|r| r.name.clone()).collect();
        }
        // On DynamoDB the counts would Scan the whole table per scrape.
        state.device_counts = !matches!(
            self.config.backend.store,
            crate::config::StoreKind::Dynamodb
        );
        state.metrics = metrics;
        let router = app(state).layer(axum::middleware::from_fn_with_state(
            stream.clone(),
            stream_health,
        ));
        serve(listener, router, stop)
    }

    /// Without the api role: only `/metrics` and `/healthz`, so that every
    /// process can be scraped and watched.
    pub(super) fn start_ops(
        &self,
        listener: TcpListener,
        stream: &Option<Arc<Stream>>,
        metrics: MetricsRenderer,
        stop: &CancellationToken,
    ) -> JoinHandle<std::io::Result<()>> {
        serve(listener, ops_router(stream, metrics), stop)
    }

    /// Retention, dead-letter trimming and the sweep of quiet devices, once
    /// a minute; beside them, the alert loop when rules are configured.
    pub(super) fn start_maintenance(
        &self,
        stream: &Arc<Stream>,
        store: &Arc<Store>,
        stop: &CancellationToken,
    ) -> JoinHandle<()> {
        let (stream, store) = (stream.clone(), store.clone());
        let aggregate = self.aggregate.clone();
        let keep = self.config.aggregate.dead_letters_per_reason;
        let stop = stop.clone();
        let alerts = self.alert_loop(&stream, &store, &stop);
        let passes = async move {
            let mut tick = tokio::time::interval(MAINTENANCE_EVERY);
            loop {
                // Shutdown abandons a pass where it stands: the next process
                // runs it again, and nothing in it waits to be drained.
                let pass = async {
                    tick.tick().await;
                    maintain(&stream, &store, &aggregate, keep).await;
                };
                if stop.run_until_cancelled(pass).await.is_none() {
                    return;
                }
            }
        };
        tokio::spawn(async move {
            match alerts {
                Some(alerts) => {
                    tokio::join!(passes, alerts);
                }
                None => passes.await,
            }
        })
    }
}

/// One maintenance pass.
async fn maintain(
    stream: &Stream,
    store: &Store,
    aggregate: &rollup::AggregateConfig,
    dead_letters_per_reason: usize,
) {
    let now = now_ms();
    let dropped = stream.maintain(now).await;
    store
        .dead_letter_dropped(&dropped, aggregate.dead_letter_retention_ms)
        .await;
    store.maintain(now, dead_letters_per_reason).await;
    // Devices that stopped publishing keep their last windows pending until
    // this compacts them.
    let (writer, query) = (store.writer(), store.query());
    match processors::run::sweep_quiet_devices(writer.as_ref(), query.as_ref(), aggregate).await {
        Ok(0) => {}
        Ok(n) => tracing::debug!(devices = n, "Compacted the final windows of quiet devices."),
        Err(e) => {
            tracing::warn!(error = %e, "Sweeping quiet devices failed; will retry.")
        }
    }
}

/// `/metrics` and `/healthz` (degraded as [`stream_health`] says) of a
/// process without the query API.
pub(super) fn ops_router(stream: &Option<Arc<Stream>>, metrics: MetricsRenderer) -> axum::Router {
    let render = move || {
        let metrics = metrics.clone();
        async move {
            let mut out = String::new();
            metrics(&mut out);
            let content_type = (
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            );
            ([content_type], out)
        }
    };
    axum::Router::new()
        .route("/metrics", axum::routing::get(render))
        .route(
            "/healthz",
            axum::routing::get(|| async {
                let json = (axum::http::header::CONTENT_TYPE, "application/json");
                ([json], r#"{"status":"ok"}"#)
            }),
        )
        .layer(axum::middleware::from_fn_with_state(
            stream.clone(),
            stream_health,
        ))
}

/// Worker threads of the HTTP server's own runtime.
const HTTP_WORKERS: usize = 2;

/// Serves `router` on `listener` until `stop`, on a runtime of its own.
/// When the endpoint is saturated, the main runtime's workers hold
/// thousands of ready connection tasks, and a query queued behind them
/// answered in up to a few hundred milliseconds (docs/BENCHMARKS.md, "The
/// query API on threads of its own"): a dashboard, and the freshness it
/// shows, waited for the ingest backlog. On threads of its own the kernel
/// schedules a query beside the connections instead of after them.
fn serve(
    listener: TcpListener,
    router: axum::Router,
    stop: &CancellationToken,
) -> JoinHandle<std::io::Result<()>> {
    // Dropping a runtime waits for its blocking tasks, and this one ends
    // only when `stop` is cancelled: the pipeline's stop tokens are, when it
    // is dropped without its shutdown.
    let stop = stop.clone();
    // Taken off this runtime's reactor here; registered with the server's
    // own below.
    let listener = listener.into_std();
    tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(HTTP_WORKERS)
            .thread_name("iotpipe-http")
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let listener = TcpListener::from_std(listener?)?;
            axum::serve(listener, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        })
    })
}

/// `/metrics`: each part the process runs renders its own figures; this
/// only puts them together.
pub(super) fn metrics(
    roles: Roles,
    ingest: &Arc<ingest::IngestMetrics>,
    processors: &Arc<ProcessorMetrics>,
    stream: &Option<Arc<Stream>>,
    alerts: &Arc<processors::alerts::AlertMetrics>,
) -> MetricsRenderer {
    let (ingest, processors, stream) = (ingest.clone(), processors.clone(), stream.clone());
    let alerts = alerts.clone();
    Arc::new(move |out: &mut String| {
        if roles.ingest {
            ingest::metrics::render(&ingest.snapshot(), out);
        }
        if roles.process {
            processors.render(now_ms(), out);
            alerts.render(out);
        }
        if let Some(stream) = &stream {
            stream.render_metrics(out);
        }
    })
}

/// The processors' loops (`run_shard`, `run_flusher`) stop on a watch that
/// turns true: this one turns true when `stop` is cancelled.
fn watch_of(stop: &CancellationToken) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(stop.is_cancelled());
    let stop = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = stop.cancelled() => {
                tx.send_replace(true);
            }
            // Every receiver is gone: nothing to tell.
            () = tx.closed() => {}
        }
    });
    rx
}

/// What every shard processor shares.
struct ShardStages {
    store: Arc<dyn RollupStore>,
    aggregate: Arc<rollup::AggregateConfig>,
    processor_config: ProcessorConfig,
    metrics: Arc<ProcessorMetrics>,
    durability: Arc<Durability>,
}

/// Starts a shard's processor on a reader (passed through `wrap` first);
/// a processor that stops without being asked is a pipeline failure, except
/// one whose lease another process took.
fn shard_spawner(stages: ShardStages, wrap: Option<WrapReader>, failures: Failures) -> SpawnShard {
    Arc::new(
        move |mut reader: Box<dyn ShardReader>, stop: CancellationToken| {
            let shard = reader.shard_id().to_string();
            if let Some(wrap) = &wrap {
                reader = wrap(reader);
            }
            let task = run_shard(
                reader,
                stages.store.clone(),
                stages.aggregate.clone(),
                stages.processor_config.clone(),
                stages.metrics.clone(),
                stages.durability.clone(),
                watch_of(&stop),
            );
            let failures = failures.clone();
            tokio::spawn(async move {
                let result = task.await;
                let lost = matches!(result, Err(ReadError::LeaseLost(_)));
                if !stop.is_cancelled() && !lost {
                    let why = match &result {
                        Ok(()) => format!("processor for {shard} stopped"),
                        Err(e) => format!("processor for {shard} failed: {e}"),
                    };
                    failures.report(why);
                }
                result
            })
        },
    )
}

/// `/healthz` says `degraded`, with the reason, once the stream lost
/// records the processors had not read; the router's own answer otherwise.
/// Still 200: restarting the process would not bring the records back.
pub(super) async fn stream_health(
    axum::extract::State(stream): axum::extract::State<Option<Arc<Stream>>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if request.uri().path() == "/healthz"
        && let Some(reason) = stream.as_ref().and_then(|s| s.degraded())
    {
        #[derive(serde::Serialize)]
        struct Degraded {
            status: &'static str,
            reasons: Vec<String>,
        }
        return axum::Json(Degraded {
            status: "degraded",
            reasons: vec![reason],
        })
        .into_response();
    }
    next.run(request).await
}

/// A duration in ms, as the API keeps times.
fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
