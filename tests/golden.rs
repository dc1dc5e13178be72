//! Golden data: each folder in `tests/data/` is a case, turned into a test by
//! one helper.
//!
//! `input.jsonl` lists messages in arrival order: `{"topic", "payload",
//! "received_at"}` (`payload` is JSON, or a string sent as raw bytes;
//! `received_at` is RFC 3339 or ms). `expected.json` gives the time the API
//! answers at (`now`: every shard has applied everything that arrived by
//! then, so it is also the processed watermark) and requests with the status
//! and the part of the body that must match (objects match by subset, arrays element by element,
//! numbers within 1e-9 relative, an RFC 3339 string matches its ms).
//!
//! Every case runs on every store backend (memory, SQLite, DynamoDB on moto,
//! and PostgreSQL on `testkit::postgres`'s server) and in three batchings (one batch;
//! one record per batch; half, then everything again as a replay), which must
//! all give the same answers.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use bytes::Bytes;
use http_body_util::BodyExt;
use processors::api::{ApiState, app, parse_time};
use processors::metrics::ProcessorMetrics;
use processors::run::process_batch;
use processors::store::memory::MemoryStore;
use processors::store::{RollupQuery, RollupStore};
use rollup::AggregateConfig;
use schemas::shard::Record;
use serde_json::Value;
use testkit::store_conformance::sqlite_in_temp_dir;
use tower::ServiceExt;

const SHARDS: u32 = 2;

struct Case {
    name: String,
    /// Per shard, its records in order.
    shards: Vec<(String, Vec<Record>)>,
    expected: Value,
    cfg: AggregateConfig,
}

fn time(v: &Value) -> i64 {
    match v {
        Value::Number(n) => n.as_i64().unwrap(),
        Value::String(s) => parse_time("time", s).unwrap(),
        other => panic!("not a time: {other}"),
    }
}

fn load(dir: &Path) -> Case {
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let mut cfg = AggregateConfig::default();
    if let Some(l) = expected.get("allowed_lateness") {
        cfg.allowed_lateness_ms = humantime::parse_duration(l.as_str().unwrap())
            .unwrap()
            .as_millis() as i64;
    }
    let mut shards: Vec<(String, Vec<Record>)> = (0..SHARDS)
        .map(|i| (format!("shard-{i:04}"), Vec::new()))
        .collect();
    // Which readings the processors may refuse by time, as `iotpipe up`
    // tells the endpoint, so that records carry what the endpoint's do.
    let lateness = ingest::LatenessConfig {
        allowed_lateness_ms: cfg.allowed_lateness_ms,
        future_tolerance_ms: cfg.future_tolerance_ms,
    };
    let input = std::fs::read_to_string(dir.join("input.jsonl")).unwrap();
    for (n, line) in input
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let msg: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("line {}: {e}", n + 1));
        let topic = msg["topic"].as_str().unwrap();
        let payload = match &msg["payload"] {
            Value::String(s) => s.clone().into_bytes(),
            other => serde_json::to_vec(other).unwrap(),
        };
        let received_at = time(&msg["received_at"]);
        // What the endpoint makes of the message, from a client allowed to
        // publish anywhere.
        let built = ingest::record::build(
            topic.to_string(),
            Bytes::from(payload),
            "golden-client",
            |_| true,
            received_at,
            &lateness,
        );
        let key = built.partition_key;
        let shard = stream::partition::shard_for(&key, SHARDS) as usize;
        let records = &mut shards[shard].1;
        let seq = records.len() as u128 + 1;
        records.push(Record {
            seq: seq.into(),
            partition_key: key,
            data: Bytes::from(built.data),
            arrival_ms: received_at,
        });
    }
    Case {
        name: dir.file_name().unwrap().to_string_lossy().into(),
        shards,
        expected,
        cfg,
    }
}

#[derive(Clone, Copy, Debug)]
enum Batching {
    One,
    EachRecord,
    HalfThenReplayAll,
}

async fn feed(case: &Case, store: &dyn RollupStore, batching: Batching) {
    let metrics = ProcessorMetrics::default();
    for (shard, records) in &case.shards {
        let batches: Vec<&[Record]> = match batching {
            Batching::One => vec![records.as_slice()],
            Batching::EachRecord => records.chunks(1).collect(),
            Batching::HalfThenReplayAll => vec![&records[..records.len() / 2], records.as_slice()],
        };
        for batch in batches.into_iter().filter(|b| !b.is_empty()) {
            process_batch(shard, batch, store, &case.cfg, &metrics)
                .await
                .unwrap();
        }
        // Then the shard has nothing more to read until `now`: its
        // watermark says everything that arrived by then is applied.
        let now = time(&case.expected["now"]);
        let idle = now + case.cfg.watermark_slack_ms;
        processors::run::advance_idle_watermark(shard, store, &case.cfg, idle)
            .await
            .unwrap();
    }
    store.flush().await.unwrap();
}

fn matches(path: &str, expected: &Value, actual: &Value) -> Result<(), String> {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            for (k, ev) in e {
                let av = a.get(k).ok_or_else(|| format!("{path}.{k}: missing"))?;
                matches(&format!("{path}.{k}"), ev, av)?;
            }
            Ok(())
        }
        (Value::Array(e), Value::Array(a)) => {
            if e.len() != a.len() {
                return Err(format!(
                    "{path}: expected {} elements, got {}: {actual}",
                    e.len(),
                    a.len()
                ));
            }
            for (i, (ev, av)) in e.iter().zip(a).enumerate() {
                matches(&format!("{path}[{i}]"), ev, av)?;
            }
            Ok(())
        }
        (Value::Number(e), Value::Number(a)) if testkit::numbers_close(e, a) => Ok(()),
        (Value::String(e), Value::Number(_)) => {
            let ms = parse_time("expected", e)
                .map_err(|_| format!("{path}: expected {e}, got {actual}"))?;
            matches(path, &Value::from(ms), actual)
        }
        (e, a) if e == a => Ok(()),
        (e, a) => Err(format!("{path}: expected {e}, got {a}")),
    }
}

async fn check(case: &Case, query: Arc<dyn RollupQuery>, label: &str) -> Vec<String> {
    let mut state = ApiState::new(query, Arc::new(case.cfg.clone()));
    let now = time(&case.expected["now"]);
    state.clock = Arc::new(move || now);
    let mut failures = Vec::new();
    for (i, req) in case.expected["requests"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let uri = req["get"].as_str().unwrap();
        let resp = app(state.clone())
            .oneshot(Request::get(uri).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let want_status = req.get("status").and_then(Value::as_u64).unwrap_or(200) as u16;
        if status != want_status {
            failures.push(format!(
                "{}/{label} request {i} {uri}: status {status}, expected {want_status}: {body}",
                case.name
            ));
            continue;
        }
        if let Some(want) = req.get("body")
            && let Err(e) = matches("body", want, &body)
        {
            failures.push(format!("{}/{label} request {i} {uri}: {e}", case.name));
        }
    }
    failures
}

fn cases() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("input.jsonl").exists())
        .collect();
    dirs.sort();
    assert!(!dirs.is_empty(), "no golden cases in {}", root.display());
    dirs
}

/// A store's writer and reader, and what keeps it alive (a temp dir, a
/// test database) until the case is checked.
type Opened = (
    Arc<dyn RollupStore>,
    Arc<dyn RollupQuery>,
    Option<Box<dyn std::any::Any>>,
);

/// One store as both writer and reader, keeping `alive` (`()` for
/// nothing) as long as it.
fn opened<S: RollupStore + RollupQuery + 'static>(s: Arc<S>, alive: impl std::any::Any) -> Opened {
    (s.clone(), s, Some(Box::new(alive)))
}

async fn run_all<F, Fut>(backend: &str, open: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Opened>,
{
    run_all_with(backend, |_| {}, open).await
}

/// [`run_all`] with each case's config changed by `tweak`.
async fn run_all_with<F, Fut>(backend: &str, tweak: fn(&mut AggregateConfig), open: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Opened>,
{
    let mut failures = Vec::new();
    for dir in cases() {
        let mut case = load(&dir);
        tweak(&mut case.cfg);
        for batching in [
            Batching::One,
            Batching::EachRecord,
            Batching::HalfThenReplayAll,
        ] {
            let (store, query, _guard) = open().await;
            feed(&case, store.as_ref(), batching).await;
            failures.extend(check(&case, query, &format!("{backend}/{batching:?}")).await);
        }
    }
    assert!(
        failures.is_empty(),
        "{} golden mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[tokio::test]
async fn golden_cases_on_the_memory_store() {
    run_all("memory", || async {
        let s = Arc::new(MemoryStore::new());
        opened(s, ())
    })
    .await;
}

/// Spans are how the store lays readings out, not what the API answers:
/// every case gives the same windows with one-minute spans as with the
/// default ten-minute ones.
#[tokio::test]
async fn golden_cases_with_one_minute_spans() {
    let minute = |cfg: &mut AggregateConfig| cfg.span = Some(60_000);
    run_all_with("memory/span=1m", minute, || async {
        opened(Arc::new(MemoryStore::new()), ())
    })
    .await;
    run_all_with("cached-sqlite/span=1m", minute, || async {
        use processors::store::cached::{CacheConfig, CachedStore};
        let (db, dir) = sqlite_in_temp_dir();
        let s = Arc::new(CachedStore::new(Arc::new(db), CacheConfig::default()));
        opened(s, dir)
    })
    .await;
}

#[tokio::test]
async fn golden_cases_on_the_sqlite_store() {
    run_all("sqlite", || async {
        let (s, dir) = sqlite_in_temp_dir();
        opened(Arc::new(s), dir)
    })
    .await;
}

#[tokio::test]
async fn golden_cases_on_the_cached_sqlite_store() {
    use processors::store::cached::{CacheConfig, CachedStore};
    run_all("cached-sqlite", || async {
        let (db, dir) = sqlite_in_temp_dir();
        let s = Arc::new(CachedStore::new(Arc::new(db), CacheConfig::default()));
        opened(s, dir)
    })
    .await;
}

#[tokio::test]
async fn golden_cases_on_the_dynamodb_store() {
    use processors::store::dynamodb::DynamoStore;
    use testkit::moto::{moto_config, unique_name};
    run_all("dynamodb", || async {
        let s = DynamoStore::connect(&moto_config().unwrap(), &unique_name("golden")).await;
        s.create_table().await.unwrap();
        let s = Arc::new(s);
        opened(s, ())
    })
    .await;
}

#[tokio::test]
async fn golden_cases_on_the_postgres_store() {
    use processors::store::postgres::PostgresStore;
    run_all("postgres", || async {
        let db = testkit::postgres::database().await.unwrap();
        let s = Arc::new(PostgresStore::open(db.config()).await.unwrap());
        opened(s, db)
    })
    .await;
}
