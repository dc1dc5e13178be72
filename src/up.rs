//! `iotpipe up`: every stage in one process, on durable local storage.
//!
//! ```text
//! MQTT ──▶ ingest::serve_on ─┐
//! broker ──▶ ingest::bridge ──┴▶ stream ──▶ run_shard × shards ──▶ store ──▶ api::app
//! ```
//!
//! Shutdown runs front to back so that nothing acknowledged is left behind:
//! the endpoint stops reading and finishes its appends and acks, then every
//! shard processor drains its shard into the store, then the API and the log
//! close. A restart continues from the checkpoints.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use processors::api::guard::{ApiLimits, Guard, Tokens};
use processors::api::{ApiState, app};
use processors::metrics::ProcessorMetrics;
use processors::run::{Durability, FlushPolicy, ProcessorConfig, run_flusher, run_shard};
use processors::store::RollupStore;
use stream::{ShardReader, StreamProducer};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::backends::{Store, Stream};
use crate::config::Config;
use crate::leased::SpawnShard;

/// The consumer name under which the local processors checkpoint.
const CONSUMER: &str = "processors";
/// How often retention and dead-letter trimming run.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(60);

/// A running pipeline.
pub struct Pipeline {
    /// The plain MQTT listener's address (the TLS one's if plain is off).
    pub mqtt_addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    pub http_addr: SocketAddr,
    /// The external-broker bridge, when one runs.
    bridge: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
    pub ingest_metrics: Arc<ingest::IngestMetrics>,
    pub processor_metrics: Arc<ProcessorMetrics>,
    stop_ingest: Option<oneshot::Sender<()>>,
    ingest: JoinHandle<std::io::Result<()>>,
    stop_processors: watch::Sender<bool>,
    processors: Vec<JoinHandle<Result<(), stream::ReadError>>>,
    stop_http: Option<oneshot::Sender<()>>,
    http: JoinHandle<std::io::Result<()>>,
    maintenance: JoinHandle<()>,
    stream: Arc<Stream>,
    /// Fires when a stage stops on its own, which is always a failure.
    failed: watch::Receiver<Option<String>>,
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

/// What `start_with` reads from the configuration and the files it names,
/// checked before anything starts: a bad file is reported before a listener
/// binds or a task runs, not on the way out of a half-started pipeline.
struct CheckedConfig {
    aggregate: Arc<rollup::AggregateConfig>,
    tls: Option<(SocketAddr, ingest::tls::TlsAcceptor)>,
    authorizer: Arc<dyn ingest::Authorizer>,
    bridge: Option<ingest::bridge::BridgeConfig>,
    tokens: Option<Tokens>,
}

fn check(config: &Config) -> anyhow::Result<CheckedConfig> {
    let aggregate = Arc::new(config.aggregate()?);
    if config.backend.lease_duration < Duration::from_secs(1) {
        // Renewed three times per duration: shorter would renew in a loop.
        anyhow::bail!("backend.lease_duration must be at least 1s");
    }
    if !config.mqtt.plain && config.mqtt.tls_listen.is_none() {
        anyhow::bail!("no MQTT listener: mqtt.plain is off and mqtt.tls_listen is not set");
    }
    let mut tls = None;
    if let Some(addr) = config.mqtt.tls_listen {
        let (Some(cert), Some(key)) = (&config.mqtt.tls_cert, &config.mqtt.tls_key) else {
            anyhow::bail!("mqtt.tls_listen needs mqtt.tls_cert and mqtt.tls_key");
        };
        let acceptor = ingest::tls::acceptor(&ingest::tls::TlsConfig {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: config.mqtt.tls_client_ca.clone(),
            require_client_cert: config.mqtt.tls_require_client_cert,
        })
        .context("MQTT TLS listener")?;
        tls = Some((addr, acceptor));
    }
    let authorizer: Arc<dyn ingest::Authorizer> = match &config.mqtt.users_file {
        Some(path) => Arc::new(
            ingest::UsersFile::load(path)
                .with_context(|| format!("MQTT users file {}", path.display()))?,
        ),
        None if config.mqtt.tls_require_client_cert => Arc::new(ingest::ClientCertificates),
        None => Arc::new(ingest::AllowAll),
    };
    let bridge = match &config.broker.url {
        None => None,
        Some(url) => {
            let mut bc = ingest::bridge::BridgeConfig::new(url)
                .with_context(|| format!("broker URL {url}"))?;
            bc.client_id.clone_from(&config.broker.client_id);
            bc.username.clone_from(&config.broker.username);
            if let Some(path) = &config.broker.password_file {
                let password = std::fs::read_to_string(path).with_context(|| {
                    format!("cannot read broker password file {}", path.display())
                })?;
                bc.password = Some(password.trim_end().to_string());
            }
            Some(bc)
        }
    };
    let tokens = match &config.http.token_file {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read API token file {}", path.display()))?;
            Some(
                Tokens::parse(&text)
                    .map_err(anyhow::Error::msg)
                    .with_context(|| format!("API token file {}", path.display()))?,
            )
        }
    };
    Ok(CheckedConfig {
        aggregate,
        tls,
        authorizer,
        bridge,
        tokens,
    })
}

/// [`start`], with each stage's backend passed through `hooks`.
pub async fn start_with(config: &Config, hooks: Hooks) -> anyhow::Result<Pipeline> {
    let CheckedConfig {
        aggregate,
        tls,
        authorizer,
        bridge,
        tokens,
    } = check(config)?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let stream = Arc::new(Stream::open(config).await?);
    let store = Arc::new(Store::open(config).await?);
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
    let Some(mqtt_addr) = plain_addr.or(tls_addr) else {
        anyhow::bail!("no MQTT listener: mqtt.plain is off and mqtt.tls_listen is not set");
    };
    // Which messages the processors may refuse by time, so that the endpoint
    // keeps their client id and raw payload for the dead letter.
    let lateness = ingest::LatenessConfig {
        allowed_lateness_ms: aggregate.allowed_lateness_ms,
        future_tolerance_ms: aggregate.future_tolerance_ms,
    };
    let http = TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("cannot listen for HTTP on {}", config.http.listen))?;
    let http_addr = http.local_addr()?;
    let (failed_tx, failed) = watch::channel(None);
    let failed_tx = Arc::new(failed_tx);

    let processor_metrics = Arc::new(ProcessorMetrics::default());
    let (stop_processors, stop_rx) = watch::channel(false);
    let pcfg = ProcessorConfig {
        batch_max_records: config.processor.batch_max_records,
        flush: FlushPolicy {
            interval: config.processor.flush_interval,
            max_dirty_items: config.processor.flush_max_dirty_items,
        },
        ..ProcessorConfig::default()
    };
    let durability = Arc::new(Durability::default());
    let mut processors = Vec::new();
    let processor_store: Arc<dyn RollupStore> = match &hooks.wrap_store {
        Some(wrap) => wrap(store.writer()),
        None => store.writer(),
    };
    let spawn_shard = shard_spawner(
        ShardStages {
            store: processor_store.clone(),
            aggregate: aggregate.clone(),
            pcfg: pcfg.clone(),
            metrics: processor_metrics.clone(),
            durability: durability.clone(),
        },
        hooks.wrap_reader,
        failed_tx.clone(),
    );
    match stream.as_ref() {
        Stream::Kinesis(kinesis) => {
            // Shared with any other process on the same stream, by leases.
            processors.push(crate::leased::spawn(
                kinesis.clone(),
                CONSUMER,
                config.backend.lease_duration,
                spawn_shard,
                stop_rx.clone(),
                failed_tx.clone(),
                now_ms,
            ));
        }
        Stream::Embedded(_) => {
            for reader in stream.readers(CONSUMER).await? {
                processors.push(spawn_shard(reader, stop_rx.clone()));
            }
        }
    }
    {
        // Flushes happen in one place, so that shards share them.
        let flusher = run_flusher(
            processor_store.clone(),
            durability.clone(),
            pcfg.clone(),
            processor_metrics.clone(),
            stop_rx.clone(),
        );
        let failed_tx = failed_tx.clone();
        processors.push(tokio::spawn(async move {
            let result = flusher.await;
            if let Err(e) = &result {
                failed_tx.send_replace(Some(format!("the store flusher failed: {e}")));
            }
            result
        }));
    }

    let ingest_metrics = Arc::new(ingest::IngestMetrics::new());
    let endpoint = ingest::EndpointConfig {
        max_connections: config.mqtt.max_connections,
        max_inflight: config.mqtt.max_inflight,
        commit_interval: config.mqtt.commit_interval,
        authorizer,
        lateness,
        ..ingest::EndpointConfig::default()
    };
    let producer: Arc<dyn StreamProducer> = match &hooks.wrap_producer {
        Some(wrap) => wrap(stream.producer()),
        None => stream.producer(),
    };
    let (stop_ingest, ingest_rx) = oneshot::channel::<()>();
    let ingest = {
        let serve = ingest::serve_on(
            listeners,
            producer.clone(),
            endpoint,
            ingest_metrics.clone(),
            async move {
                let _ = ingest_rx.await;
            },
        );
        let failed_tx = failed_tx.clone();
        tokio::spawn(async move {
            let result = serve.await;
            failed_tx.send_if_modified(|f| {
                if f.is_none() {
                    *f = Some("the MQTT endpoint stopped".into());
                }
                true
            });
            result
        })
    };

    let bridge = match bridge {
        None => None,
        Some(mut bc) => {
            bc.lateness = lateness;
            let (stop, rx) = oneshot::channel::<()>();
            let task = tokio::spawn(ingest::bridge::run(
                bc,
                producer.clone(),
                ingest_metrics.clone(),
                async move {
                    let _ = rx.await;
                },
            ));
            Some((stop, task))
        }
    };

    let mut state = ApiState::new(store.query(), aggregate.clone());
    state.guard = Arc::new(Guard::new(
        tokens,
        ApiLimits {
            max_concurrent: config.http.max_concurrent,
            timeout: config.http.timeout,
        },
    ));
    {
        let (im, pm, st) = (
            ingest_metrics.clone(),
            processor_metrics.clone(),
            stream.clone(),
        );
        state.metrics = Arc::new(move |out: &mut String| {
            ingest::metrics::render(&im.snapshot(), out);
            pm.render(now_ms(), out);
            st.render_metrics(out);
        });
    }
    let (stop_http, http_rx) = oneshot::channel::<()>();
    let health_stream = stream.clone();
    let http = tokio::spawn(async move {
        let router = app(state).layer(axum::middleware::from_fn_with_state(
            health_stream,
            stream_health,
        ));
        axum::serve(http, router)
            .with_graceful_shutdown(async move {
                let _ = http_rx.await;
            })
            .await
    });

    let maintenance = {
        let (stream, store) = (stream.clone(), store.clone());
        let keep = config.aggregate.dead_letters_per_reason;
        let dead_letter_ms = aggregate.dead_letter_retention_ms;
        let aggregate = aggregate.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(MAINTENANCE_EVERY);
            loop {
                tick.tick().await;
                let now = now_ms();
                let dropped = stream.maintain(now).await;
                store.dead_letter_dropped(&dropped, dead_letter_ms).await;
                store.maintain(now, keep).await;
                // Devices that stopped publishing keep their last windows
                // pending until this compacts them.
                let (writer, query) = (store.writer(), store.query());
                match processors::run::sweep_quiet_devices(
                    writer.as_ref(),
                    query.as_ref(),
                    &aggregate,
                )
                .await
                {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(
                        devices = n,
                        "Compacted the final windows of quiet devices."
                    ),
                    Err(e) => {
                        tracing::warn!(error = %e, "Sweeping quiet devices failed; will retry.")
                    }
                }
            }
        })
    };

    Ok(Pipeline {
        mqtt_addr,
        tls_addr,
        http_addr,
        ingest_metrics,
        bridge,
        processor_metrics,
        stop_ingest: Some(stop_ingest),
        ingest,
        stop_processors,
        processors,
        stop_http: Some(stop_http),
        http,
        maintenance,
        stream,
        failed,
    })
}

/// What every shard processor shares.
struct ShardStages {
    store: Arc<dyn RollupStore>,
    aggregate: Arc<rollup::AggregateConfig>,
    pcfg: ProcessorConfig,
    metrics: Arc<ProcessorMetrics>,
    durability: Arc<Durability>,
}

/// Starts a shard's processor on a reader (passed through `wrap` first);
/// a processor that stops without being asked is a pipeline failure, except
/// one whose lease another process took.
fn shard_spawner(
    stages: ShardStages,
    wrap: Option<WrapReader>,
    failed_tx: Arc<watch::Sender<Option<String>>>,
) -> SpawnShard {
    Arc::new(
        move |mut reader: Box<dyn ShardReader>, stop: watch::Receiver<bool>| {
            let shard = reader.shard_id().to_string();
            if let Some(wrap) = &wrap {
                reader = wrap(reader);
            }
            let task = run_shard(
                reader,
                stages.store.clone(),
                stages.aggregate.clone(),
                stages.pcfg.clone(),
                stages.metrics.clone(),
                stages.durability.clone(),
                stop.clone(),
            );
            let failed_tx = failed_tx.clone();
            tokio::spawn(async move {
                let result = task.await;
                let lost = matches!(result, Err(stream::ReadError::LeaseLost(_)));
                if !*stop.borrow() && !lost {
                    let why = match &result {
                        Ok(()) => format!("processor for {shard} stopped"),
                        Err(e) => format!("processor for {shard} failed: {e}"),
                    };
                    failed_tx.send_replace(Some(why));
                }
                result
            })
        },
    )
}

/// `/healthz` says `degraded`, with the reason, once the stream lost
/// records the processors had not read; the router's own answer otherwise.
/// Still 200: restarting the process would not bring the records back.
async fn stream_health(
    axum::extract::State(stream): axum::extract::State<Arc<Stream>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if request.uri().path() == "/healthz"
        && let Some(reason) = stream.degraded()
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
        // Intake first: the endpoint and the bridge stop taking messages and
        // finish the appends and acks they have in flight.
        if let Some(stop) = self.stop_ingest.take() {
            let _ = stop.send(());
        }
        let bridge = match self.bridge.take() {
            Some((stop, task)) => {
                let _ = stop.send(());
                task.await.err().map(|e| format!("broker bridge task: {e}"))
            }
            None => None,
        };
        let ingest = (&mut self.ingest).await;
        self.stop_processors.send_replace(true);
        let mut errors: Vec<String> = bridge.into_iter().collect();
        match ingest {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(format!("MQTT endpoint: {e}")),
            Err(e) => errors.push(format!("MQTT endpoint task: {e}")),
        }
        for task in self.processors.drain(..) {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.push(format!("processor: {e}")),
                Err(e) => errors.push(format!("processor task: {e}")),
            }
        }
        self.maintenance.abort();
        if let Some(stop) = self.stop_http.take() {
            let _ = stop.send(());
        }
        match (&mut self.http).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(format!("HTTP API: {e}")),
            Err(e) => errors.push(format!("HTTP API task: {e}")),
        }
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    #[tokio::test]
    async fn config_errors_are_reported_before_any_listener_starts() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::write(&tokens, "too-short admin\n").unwrap();
        // The MQTT port is taken: had the listener been bound before the
        // token file was read, binding would have been the error.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut config = Config {
            data_dir: dir.path().join("data"),
            ..Config::default()
        };
        config.mqtt.listen = taken.local_addr().unwrap();
        config.http.listen = "127.0.0.1:0".parse().unwrap();
        config.http.token_file = Some(tokens);
        let started = Arc::new(AtomicBool::new(false));
        let hooks = Hooks {
            wrap_producer: Some(Box::new({
                let started = started.clone();
                move |p| {
                    started.store(true, Ordering::SeqCst);
                    p
                }
            })),
            wrap_reader: Some(Box::new({
                let started = started.clone();
                move |r| {
                    started.store(true, Ordering::SeqCst);
                    r
                }
            })),
            ..Hooks::default()
        };
        let Err(err) = start_with(&config, hooks).await else {
            panic!("a bad token file must stop the start");
        };
        let err = format!("{err:#}");
        assert!(err.contains("API token file"), "{err}");
        assert!(
            !started.load(Ordering::SeqCst),
            "a stage started before the check"
        );
        assert!(
            !config.data_dir.exists(),
            "the data dir was opened before the check"
        );
    }

    async fn get(router: axum::Router, uri: &str) -> serde_json::Value {
        use http_body_util::BodyExt;
        use tower::ServiceExt;
        let request = axum::http::Request::get(uri)
            .body(axum::body::Body::empty())
            .unwrap();
        let response = router.oneshot(request).await.unwrap();
        assert_eq!(response.status(), 200, "{uri}");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&body).unwrap()
    }

    #[tokio::test]
    async fn unread_records_the_budget_deletes_are_counted_reported_and_dead_lettered() {
        use stream::embedded::{EmbeddedConfig, EmbeddedLog};
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().to_owned(),
            ..Config::default()
        };
        let small = EmbeddedConfig {
            shards: 1,
            segment_bytes: 1024,
            ..EmbeddedConfig::default()
        };
        let path = dir.path().join("stream");
        let log = EmbeddedLog::open(&path, small.clone()).unwrap();
        let records = (0..50)
            .map(|i| stream::PutRecord {
                partition_key: "d".into(),
                data: bytes::Bytes::from(format!("{i:0>100}")),
            })
            .collect();
        log.put(records).await.unwrap();
        // The processors register, and read nothing.
        drop(log.reader("shard-0000", CONSUMER).unwrap());
        log.close().await.unwrap();
        drop(log);
        let budget = EmbeddedConfig {
            max_bytes: Some(1),
            ..small
        };
        let stream = Arc::new(Stream::Embedded(EmbeddedLog::open(&path, budget).unwrap()));
        let health = axum::Router::new()
            .route(
                "/healthz",
                axum::routing::get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
            )
            .layer(axum::middleware::from_fn_with_state(
                stream.clone(),
                stream_health,
            ));
        assert_eq!(get(health.clone(), "/healthz").await["status"], "ok");

        // No record is old, but none fits the budget: every closed segment
        // goes, unread.
        let dropped = stream.maintain(0).await;
        assert!(dropped.len() > 1, "{dropped:?}");
        let lost: u64 = dropped.iter().map(|r| r.records).sum();
        assert!(lost > 0 && lost < 50, "{lost}");

        let health = get(health, "/healthz").await;
        assert_eq!(health["status"], "degraded", "{health}");
        assert!(
            health["reasons"][0]
                .as_str()
                .unwrap()
                .contains(&format!("deleted {lost} records"))
        );
        let mut metrics = String::new();
        stream.render_metrics(&mut metrics);
        let line = format!("iotpipe_stream_records_dropped_total{{shard=\"shard-0000\"}} {lost}");
        assert!(metrics.lines().any(|l| l == line), "{metrics}");

        let store = Store::open(&config).await.unwrap();
        store.dead_letter_dropped(&dropped, 7 * 86_400_000).await;
        let api = app(ApiState::new(
            store.query(),
            Arc::new(config.aggregate().unwrap()),
        ));
        let letters = get(api, "/v1/dead-letters?reason=retention").await;
        let letters = letters["dead_letters"].as_array().unwrap().clone();
        assert_eq!(letters.len(), dropped.len(), "{letters:?}");
        let first = letters.iter().find(|l| l["seq"] == "1").unwrap();
        assert_eq!(first["reason"], "retention");
        assert_eq!(first["shard"], "shard-0000");
        let range = &dropped[0];
        let detail = format!(
            "stream records 1..={} of shard-0000 ({} records)",
            range.last_seq, range.records
        );
        assert!(
            first["detail"].as_str().unwrap().contains(&detail),
            "{first}"
        );
    }
}
