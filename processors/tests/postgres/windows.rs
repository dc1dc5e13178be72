//! Windows readable by SQL: the queries docs/SCALE-OUT.md documents, run
//! as written against a store the aggregation core filled, answer what the
//! query API answers for the same series; a rewritten window shows its new
//! figures; migration 2 reaches a database a build at version 1 wrote.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use processors::api::{ApiState, app};
use processors::metrics::ProcessorMetrics;
use processors::run::{advance_idle_watermark, process_batch};
use processors::store::memory::MemoryStore;
use processors::store::postgres::{self, PostgresStore};
use processors::store::{RollupQuery, RollupStore, Scan};
use rollup::AggregateConfig;
use schemas::shard::Record;
use testkit::batches::{T0, one_reading, one_reading_received};
use tokio_postgres::Client;
use tower::ServiceExt;

use super::{client, migrations};

const MIN: i64 = 60_000;
const HOUR: i64 = 60 * MIN;
const DOC: &str = include_str!("../../../docs/SCALE-OUT.md");
/// What the documented queries select, compared with the API's fields.
const FIGURES: [&str; 5] = ["count", "sum", "min", "max", "avg"];

/// The SQL block that follows `<!-- sql: NAME -->` in docs/SCALE-OUT.md.
fn documented(name: &str) -> &'static str {
    let marker = format!("<!-- sql: {name} -->");
    let (_, after) = DOC
        .split_once(&marker)
        .unwrap_or_else(|| panic!("no {marker} in docs/SCALE-OUT.md"));
    let (_, block) = after.split_once("```sql\n").unwrap();
    let (sql, _) = block.split_once("```").unwrap();
    sql.trim_end().trim_end_matches(';')
}

/// A value as a SQL string, as psql's `:'name'` and Grafana's
/// `${name:sqlstring}` write it.
fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// `sql` with psql's variables bound, as `psql -v name=value` does.
fn psql(sql: &str, vars: &[(&str, &str)]) -> String {
    let mut out = sql.to_string();
    for (name, value) in vars {
        out = out.replace(&format!(":'{name}'"), &literal(value));
    }
    assert!(!out.contains(":'"), "a variable left unbound: {out}");
    out
}

/// `sql` as Grafana sends it for a panel over `[from, to]`: its macros
/// expanded, its variables quoted.
fn grafana(sql: &str, vars: &[(&str, &str)], from: i64, to: i64) -> String {
    let filter = format!("time BETWEEN '{}' AND '{}'", rfc3339(from), rfc3339(to));
    let mut out = sql
        .replace("$__timeFilter(time)", &filter)
        .replace("$__unixEpochFrom()", &(from / 1000).to_string())
        .replace("$__unixEpochTo()", &(to / 1000).to_string());
    for (name, value) in vars {
        out = out.replace(&format!("${{{name}:sqlstring}}"), &literal(value));
    }
    assert!(!out.contains('$'), "a macro or variable left: {out}");
    out
}

/// One window's start and the figures asked for, all as f64.
type Figures = Vec<(i64, Vec<f64>)>;

/// The rows of `sql`: each window's start (its `time`) and `columns`, in
/// time order.
async fn sql_windows(client: &Client, sql: &str, columns: &[&str]) -> Figures {
    let figures: Vec<String> = columns.iter().map(|c| format!("q.{c}::float8")).collect();
    let wrapped = format!(
        "SELECT (extract(epoch FROM q.time) * 1000)::int8, {} FROM ({sql}) q ORDER BY 1",
        figures.join(", ")
    );
    let rows = client
        .query(&wrapped, &[])
        .await
        .unwrap_or_else(|e| panic!("{wrapped}\n{e:?}"));
    rows.iter()
        .map(|row| {
            let figures = (1..=columns.len()).map(|i| row.get(i)).collect();
            (row.get(0), figures)
        })
        .collect()
}

/// The query API's windows at `path` (`/v1/devices/d1/metrics/t`) over
/// `[from, to)`, with `columns` of each.
async fn api_windows(
    state: &ApiState,
    path: &str,
    res: &str,
    (from, to): (i64, i64),
    columns: &[&str],
) -> Figures {
    let uri = format!("{path}?res={res}&from={from}&to={to}");
    let resp = app(state.clone())
        .oneshot(Request::get(&uri).body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{uri}");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    body["windows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            let figures = columns.iter().map(|c| w[*c].as_f64().unwrap()).collect();
            (w["start"].as_i64().unwrap(), figures)
        })
        .collect()
}

/// The same windows with the same figures: counts and extremes equal, sums
/// and averages within 1e-9 relative (a fleet's parts and an hour's
/// minutes are added in another order than the API adds them).
fn assert_same(what: &str, columns: &[&str], sql: &Figures, api: &Figures) {
    assert!(!api.is_empty(), "{what}: the API has no windows");
    let starts = |f: &Figures| f.iter().map(|(s, _)| *s).collect::<Vec<_>>();
    assert_eq!(starts(sql), starts(api), "{what}: window starts");
    for ((start, got), (_, want)) in sql.iter().zip(api) {
        for ((column, g), w) in columns.iter().zip(got).zip(want) {
            let close = (g - w).abs() <= 1e-9 * g.abs().max(w.abs());
            let same = match *column {
                "sum" | "avg" => close,
                _ => g == w,
            };
            assert!(same, "{what}: window {start} {column}: SQL {g}, API {w}");
        }
    }
}

/// `device`'s readings of `t` over minutes `[first, last)` from `T0`: one
/// to three a minute (one is a span's compact form), on time.
fn minutes(device: &str, fleet: &str, first: i64, last: i64, base: f64) -> Vec<Record> {
    (first..last)
        .flat_map(|m| {
            (0..m % 3 + 1).map(move |k| {
                let ts = T0 + m * MIN + 1_000 * k + 7;
                let value = base + m as f64 * 0.37 + k as f64 * 1.1;
                one_reading((m * 10 + k + 1) as u64, device, fleet, ts, value)
            })
        })
        .collect()
}

/// A store on its own database, and an API over it answering at `now`.
async fn store_and_api(db: &testkit::postgres::TestDb, now: i64) -> (Arc<PostgresStore>, ApiState) {
    let store = Arc::new(PostgresStore::open(db.config()).await.unwrap());
    let mut state = ApiState::new(store.clone(), Arc::new(AggregateConfig::default()));
    state.clock = Arc::new(move || now);
    (store, state)
}

async fn apply(store: &dyn RollupStore, shard: &str, records: &[Record]) {
    let metrics = ProcessorMetrics::default();
    process_batch(shard, records, store, &AggregateConfig::default(), &metrics)
        .await
        .unwrap();
}

#[tokio::test]
async fn the_documented_queries_answer_what_the_api_answers() {
    let db = testkit::postgres::database().await.unwrap();
    let now = T0 + 13 * MIN;
    let (store, api) = store_and_api(&db, now).await;
    // Two devices of one fleet on two shards, each in two batches: the
    // second rewrites the first's span and starts the next.
    for (shard, device, base) in [("s0", "d1", 20.0), ("s1", "d2", 5.5)] {
        apply(store.as_ref(), shard, &minutes(device, "f", 0, 6, base)).await;
        apply(store.as_ref(), shard, &minutes(device, "f", 6, 12, base)).await;
    }
    let sql = client(&db).await;
    let range = (T0, T0 + 15 * MIN);
    let vars = [
        ("device", "d1"),
        ("fleet", "f"),
        ("metric", "t"),
        ("from", &rfc3339(range.0)),
        ("to", &rfc3339(range.1)),
    ];
    let minute_api = api_windows(&api, "/v1/devices/d1/metrics/t", "1m", range, &FIGURES).await;
    assert_eq!(minute_api.len(), 12);

    let query = psql(documented("device-minute-windows"), &vars);
    let got = sql_windows(&sql, &query, &FIGURES).await;
    assert_same("a device's minutes", &FIGURES, &got, &minute_api);

    let query = grafana(
        documented("grafana-device-minute-averages"),
        &vars,
        range.0,
        range.1 - 1,
    );
    let got = sql_windows(&sql, &query, &["avg"]).await;
    let avgs: Figures = minute_api.iter().map(|(s, f)| (*s, vec![f[4]])).collect();
    assert_same("Grafana's minutes", &["avg"], &got, &avgs);

    let fleet_api = api_windows(&api, "/v1/fleets/f/metrics/t", "1m", range, &FIGURES).await;
    let query = psql(documented("fleet-minute-windows"), &vars);
    let got = sql_windows(&sql, &query, &FIGURES).await;
    assert_same("a fleet's minutes", &FIGURES, &got, &fleet_api);

    // The hour still open, merged from minutes as the API merges it.
    let hour_api = api_windows(&api, "/v1/devices/d1/metrics/t", "1h", range, &FIGURES).await;
    let query = psql(documented("device-hours-from-minutes"), &vars);
    let got = sql_windows(&sql, &query, &FIGURES).await;
    assert_same("a device's hours from minutes", &FIGURES, &got, &hour_api);
}

#[tokio::test]
async fn a_window_rewritten_by_a_later_batch_shows_its_new_figures() {
    let db = testkit::postgres::database().await.unwrap();
    let (store, api) = store_and_api(&db, T0 + 5 * MIN).await;
    let sql = client(&db).await;
    let range = (T0, T0 + 5 * MIN);
    let columns = [
        "count",
        "sum",
        "min",
        "max",
        "avg",
        "late_count",
        "revision",
    ];
    let query = psql(
        "SELECT time, count, sum, min, max, avg, late_count, revision FROM device_windows
         WHERE pk = 's|' || :'device' AND metric = 't'",
        &[("device", "d1")],
    );

    apply(
        store.as_ref(),
        "s0",
        &[
            one_reading(1, "d1", "f", T0 + 5_000, 1.0),
            one_reading(2, "d1", "f", T0 + MIN + 5_000, 2.0),
        ],
    )
    .await;
    let before = sql_windows(&sql, &query, &columns).await;
    let one = |v: f64| vec![1.0, v, v, v, v, 0.0, 0.0];
    assert_eq!(before, [(T0, one(1.0)), (T0 + MIN, one(2.0))]);

    // A reading late for the first minute, and two more in the second.
    apply(
        store.as_ref(),
        "s0",
        &[
            one_reading(3, "d1", "f", T0 + MIN + 10_000, 3.0),
            one_reading(4, "d1", "f", T0 + MIN + 20_000, 7.0),
            one_reading_received(5, "d1", "f", T0 + 30_000, 4.0, T0 + 3 * MIN),
        ],
    )
    .await;
    let after = sql_windows(&sql, &query, &columns).await;
    assert_eq!(
        after,
        [
            (T0, vec![2.0, 5.0, 1.0, 4.0, 2.5, 1.0, 1.0]),
            (T0 + MIN, vec![3.0, 12.0, 2.0, 7.0, 4.0, 0.0, 0.0]),
        ]
    );
    let api = api_windows(&api, "/v1/devices/d1/metrics/t", "1m", range, &columns).await;
    assert_same("rewritten minutes", &columns, &after, &api);
}

#[tokio::test]
async fn a_compacted_hour_reads_as_the_api_answers_it() {
    let db = testkit::postgres::database().await.unwrap();
    let cfg = AggregateConfig::default();
    let now = T0 + 2 * HOUR + 30 * MIN;
    let (store, api) = store_and_api(&db, now).await;
    apply(store.as_ref(), "s0", &minutes("d1", "f", 0, 12, 20.0)).await;
    // Everything up to two hours on is applied, so the first hour can no
    // longer change; the device's next span compacts it.
    advance_idle_watermark("s0", store.as_ref(), &cfg, T0 + 2 * HOUR + MIN)
        .await
        .unwrap();
    let next = T0 + 2 * HOUR + 20 * MIN;
    apply(
        store.as_ref(),
        "s0",
        &[one_reading(1_000, "d1", "f", next, 9.0)],
    )
    .await;

    let sql = client(&db).await;
    let vars = [("device", "d1"), ("metric", "t")];
    let query = psql(documented("device-hourly-windows"), &vars);
    let got = sql_windows(&sql, &query, &FIGURES).await;
    assert_eq!(got.len(), 1, "the first hour, compacted: {got:?}");
    let range = (T0, T0 + HOUR);
    let hour_api = api_windows(&api, "/v1/devices/d1/metrics/t", "1h", range, &FIGURES).await;
    assert_same("a compacted hour", &FIGURES, &got, &hour_api);
}

#[tokio::test]
async fn a_database_at_version_1_migrates_to_2_and_at_2_is_left_alone() {
    let db = testkit::postgres::database().await.unwrap();
    postgres::migrate_to(&db.config(), 1).await.unwrap();
    let sql = client(&db).await;
    let versions = |m: Vec<(i32, String)>| m.into_iter().map(|(v, _)| v).collect::<Vec<_>>();
    assert_eq!(versions(migrations(&sql).await), [1]);

    // Items as a build at version 1 wrote them: the core's, state only.
    let memory = MemoryStore::new();
    apply(&memory, "s0", &minutes("d1", "f", 0, 2, 20.0)).await;
    let items = memory
        .scan_prefix(Scan::new("", None, 1_000))
        .await
        .unwrap();
    for (pk, sk, item) in &items {
        sql.execute(
            "INSERT INTO items (pk, sk, version, state) VALUES ($1, $2, 1, $3)",
            &[pk, sk, &item.encode()],
        )
        .await
        .unwrap();
    }

    let (store, api) = store_and_api(&db, T0 + 5 * MIN).await;
    let applied = migrations(&sql).await;
    assert_eq!(versions(applied.clone()), [1, 2]);
    let vars = [
        ("device", "d1"),
        ("metric", "t"),
        ("from", &rfc3339(T0)),
        ("to", &rfc3339(T0 + 5 * MIN)),
    ];
    let query = psql(documented("device-minute-windows"), &vars);
    // The old spans read as before, but SQL cannot see them until rewritten.
    let range = (T0, T0 + 5 * MIN);
    let api_before = api_windows(&api, "/v1/devices/d1/metrics/t", "1m", range, &FIGURES).await;
    assert_eq!(api_before.len(), 2);
    assert!(sql_windows(&sql, &query, &FIGURES).await.is_empty());

    apply(store.as_ref(), "s0", &minutes("d1", "f", 2, 3, 20.0)).await;
    let got = sql_windows(&sql, &query, &FIGURES).await;
    let api_after = api_windows(&api, "/v1/devices/d1/metrics/t", "1m", range, &FIGURES).await;
    assert_eq!(api_after.len(), 3);
    assert_same("minutes after the rewrite", &FIGURES, &got, &api_after);

    // At version 2 already: opening changes nothing.
    drop(PostgresStore::open(db.config()).await.unwrap());
    assert_eq!(migrations(&sql).await, applied);
    assert_eq!(sql_windows(&sql, &query, &FIGURES).await, got);
}

#[tokio::test]
async fn the_documented_role_reads_the_views_and_not_the_items() {
    let db = testkit::postgres::database().await.unwrap();
    let (store, _) = store_and_api(&db, T0 + 5 * MIN).await;
    apply(store.as_ref(), "s0", &minutes("d1", "f", 0, 3, 20.0)).await;
    let admin = client(&db).await;
    // A name of its own: roles belong to the whole server.
    let role = testkit::unique_name("grafana").replace('-', "_");
    let create = documented("read-only-role")
        .replace("grafana", &role)
        .replace("DATABASE iotpipe", &format!("DATABASE {}", db.name()));
    admin.batch_execute(&create).await.unwrap();

    let mut config = db.config();
    config.user(&role).password("change-me");
    let (reader, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    let connection = tokio::spawn(connection);
    let query = grafana(
        documented("grafana-device-minute-averages"),
        &[("device", "d1"), ("metric", "t")],
        T0,
        T0 + 5 * MIN,
    );
    assert_eq!(sql_windows(&reader, &query, &["avg"]).await.len(), 3);
    let err = reader
        .query("SELECT state FROM items LIMIT 1", &[])
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "{err:?}"
    );

    drop(reader);
    let _ = connection.await;
    admin
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await
        .unwrap();
}
