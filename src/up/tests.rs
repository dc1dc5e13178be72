use std::sync::atomic::{AtomicBool, Ordering};

use processors::api::{ApiState, app};

use super::stages::ops_router;
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
    let health = ops_router(&Some(stream.clone()), Arc::new(|_: &mut String| {}));
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

/// The whole pipeline's default configuration in `dir`, listening on ports
/// the system picks.
fn on_any_port(dir: &std::path::Path) -> Config {
    let mut config = Config {
        data_dir: dir.join("data"),
        ..Config::default()
    };
    config.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    config
}

/// A data dir written with one span is refused by a pipeline configured
/// for another, before anything starts, saying what to change; as it was
/// first configured, it starts again.
#[tokio::test]
async fn a_data_dir_written_with_other_spans_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = on_any_port(dir.path());
    let first = start_with(&config, Hooks::default()).await.unwrap();
    first.shutdown().await.unwrap();
    let mut minute = config.clone();
    minute.aggregate.span = "1m".into();
    let Err(err) = start_with(&minute, Hooks::default()).await else {
        panic!("a store of ten-minute spans was opened with one-minute ones");
    };
    let err = format!("{err:#}");
    assert!(err.contains("written with spans of 10m"), "{err}");
    assert!(err.contains("configured for spans of 1m"), "{err}");
    assert!(err.contains("aggregate.span"), "{err}");
    let again = start_with(&config, Hooks::default()).await.unwrap();
    again.shutdown().await.unwrap();
}

/// The HTTP server runs on threads of its own: a query is answered while
/// every worker of the runtime the pipeline started on is busy, as when
/// the endpoint is saturated. On the shared runtime this request waited
/// for the busy workers, which wait for its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_while_every_pipeline_worker_is_busy() {
    use std::io::{Read, Write};
    use std::sync::atomic::AtomicUsize;
    let dir = tempfile::tempdir().unwrap();
    let config = on_any_port(dir.path());
    let pipeline = start_with(&config, Hooks::default()).await.unwrap();
    let (release, spinning) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let busy: Vec<_> = (0..2)
        .map(|_| {
            let (release, spinning) = (release.clone(), spinning.clone());
            tokio::spawn(async move {
                spinning.fetch_add(1, Ordering::SeqCst);
                while !release.load(Ordering::SeqCst) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    while spinning.load(Ordering::SeqCst) < 2 {
        std::hint::spin_loop();
    }
    // A plain socket on a thread of its own: the test's runtime has no
    // worker free to drive a client.
    let addr = pipeline.http_addr;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let answer = (|| -> std::io::Result<String> {
            let mut socket = std::net::TcpStream::connect(addr)?;
            socket.write_all(
                b"GET /healthz HTTP/1.1\r\nHost: iotpipe\r\nConnection: close\r\n\r\n",
            )?;
            let mut reply = String::new();
            socket.read_to_string(&mut reply)?;
            Ok(reply)
        })();
        let _ = tx.send(answer);
    });
    // Generous: a server that cannot answer does not answer at all.
    let answer = rx.recv_timeout(std::time::Duration::from_secs(30));
    release.store(true, Ordering::SeqCst);
    for task in busy {
        task.await.unwrap();
    }
    let reply = answer
        .expect("no answer while the pipeline's workers were busy")
        .unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    pipeline.shutdown().await.unwrap();
}

/// A runtime waits for its blocking tasks when dropped, and the HTTP
/// server's is one: a pipeline dropped without its shutdown (a failed
/// test, an error path) stops it, and so still lets its runtime go.
#[test]
fn a_pipeline_dropped_without_its_shutdown_lets_the_runtime_go() {
    let dir = tempfile::tempdir().unwrap();
    let config = on_any_port(dir.path());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let pipeline = runtime
            .block_on(start_with(&config, Hooks::default()))
            .unwrap();
        drop(pipeline);
        drop(runtime);
        let _ = tx.send(());
    });
    rx.recv_timeout(std::time::Duration::from_secs(30))
        .expect("the runtime's drop waited for the HTTP server");
}
