//! The query API over a store filled by the real core, driven in-process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use bytes::Bytes;
use http_body_util::BodyExt;
use processors::api::guard::{ApiLimits, Guard, Tokens};
use processors::api::{ApiState, app};
use processors::metrics::ProcessorMetrics;
use processors::run::process_batch;
use processors::store::RollupQuery;
use processors::store::memory::MemoryStore;
use rollup::AggregateConfig;
use schemas::shard::Record;
use schemas::{Metric, PackedRecord, Reading};
use serde_json::Value;
use tower::ServiceExt;

const T0: i64 = 1_764_240_000_000; // a minute boundary
const MIN: i64 = 60_000;

fn record(seq: u128, device: &str, fleet: &str, ts: i64, value: f64) -> Record {
    testkit::batches::one_reading(seq as u64, device, fleet, ts, value)
}

/// Two devices on two shards, one reading a minute for 10 minutes each.
async fn filled() -> (Arc<MemoryStore>, ApiState) {
    let store = Arc::new(MemoryStore::new());
    let cfg = Arc::new(AggregateConfig::default());
    let metrics = ProcessorMetrics::default();
    for (shard, device, base) in [("s0", "d1", 0.0), ("s1", "d2", 100.0)] {
        let batch: Vec<Record> = (0..10)
            .map(|i| {
                record(
                    i as u128 + 1,
                    device,
                    "f",
                    T0 + i * MIN + 5,
                    base + i as f64,
                )
            })
            .collect();
        process_batch(shard, &batch, store.as_ref(), &cfg, &metrics)
            .await
            .unwrap();
    }
    // Both shards idle until 69 min after T0: everything that arrived up to
    // then is applied, so the first minute (ended 68 min before, 1 h
    // lateness) is final and the last (ended 59 min before) is not.
    let now = T0 + 69 * MIN;
    for shard in ["s0", "s1"] {
        idle_until(store.as_ref(), shard, now + cfg.watermark_slack_ms, &cfg).await;
    }
    let mut state = ApiState::new(store.clone(), cfg);
    state.clock = Arc::new(move || now);
    (store, state)
}

async fn idle_until(store: &MemoryStore, shard: &str, now: i64, cfg: &AggregateConfig) {
    processors::run::advance_idle_watermark(shard, store, cfg, now)
        .await
        .unwrap();
}

/// GETs `uri`: the status, the content type and the body as text.
async fn get_text(state: &ApiState, uri: &str) -> (StatusCode, String, String) {
    get_as(state, uri, None).await
}

/// GETs `uri` with `token` as its bearer token, if any: the status, the
/// content type and the body as text.
async fn get_as(state: &ApiState, uri: &str, token: Option<&str>) -> (StatusCode, String, String) {
    let mut req = Request::get(uri);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = app(state.clone())
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let ctype = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, ctype, String::from_utf8(body.to_vec()).unwrap())
}

/// GETs `uri`: the status, the content type and the body as JSON (`null`
/// if it is not JSON).
async fn get(state: &ApiState, uri: &str) -> (StatusCode, String, Value) {
    let (status, ctype, body) = get_text(state, uri).await;
    let json = serde_json::from_str(&body).unwrap_or(Value::Null);
    (status, ctype, json)
}

/// A CSV answer's text, which must be 200 and say it is CSV.
async fn get_csv(state: &ApiState, uri: &str) -> String {
    let (status, ctype, text) = get_text(state, uri).await;
    assert_eq!(status, StatusCode::OK, "{uri}: {text}");
    assert_eq!(ctype, "text/csv; charset=utf-8");
    text
}

/// GETs `uri`, which must answer 200, and returns the JSON body.
async fn get_ok(state: &ApiState, uri: &str) -> Value {
    let (status, _, body) = get(state, uri).await;
    assert_eq!(status, StatusCode::OK, "{uri}: {body}");
    body
}

/// The windows `uri` answers with, which must be 200.
async fn windows(state: &ApiState, uri: &str) -> Vec<Value> {
    let body = get_ok(state, uri).await;
    body["windows"].as_array().unwrap().clone()
}

/// `/v1/{scope}/metrics/t` over the first ten minutes, with `query` (its
/// resolution and anything else).
fn ten_minutes(scope: &str, query: &str) -> String {
    format!(
        "/v1/{scope}/metrics/t?{query}&from={T0}&to={}",
        T0 + 10 * MIN
    )
}

#[tokio::test]
async fn device_windows_and_downsampling() {
    let (_, s) = filled().await;
    let w = windows(&s, &ten_minutes("devices/d1", "res=1m")).await;
    assert_eq!(w.len(), 10);
    assert_eq!(w[3]["start"], T0 + 3 * MIN);
    assert_eq!(w[3]["end"], T0 + 4 * MIN);
    assert_eq!(w[3]["count"], 1);
    assert_eq!(w[3]["sum"], 3.0);
    assert_eq!(w[0]["final"], true);
    assert_eq!(w[9]["final"], false);
    // 5m windows are merged from the stored minutes.
    let w = windows(&s, &ten_minutes("devices/d1", "res=5m")).await;
    assert_eq!(w.len(), 2);
    assert_eq!(
        (w[0]["count"].as_u64(), w[0]["sum"].as_f64()),
        (Some(5), Some(10.0))
    );
    assert_eq!(
        (w[1]["min"].as_f64(), w[1]["max"].as_f64()),
        (Some(5.0), Some(9.0))
    );
    assert_eq!(w[1]["first"]["value"], 5.0);
    assert_eq!(w[1]["last"]["value"], 9.0);
    // RFC 3339 times work too.
    let body = get_ok(
        &s,
        "/v1/devices/d1/metrics/t?res=1h&from=2025-11-27T10:00:00Z&to=2025-11-27T12:00:00Z",
    )
    .await;
    assert_eq!(body["windows"][0]["count"], 10);
}

#[tokio::test]
async fn fleet_windows_merge_every_shard() {
    let (_, s) = filled().await;
    let w = windows(&s, &ten_minutes("fleets/f", "res=1m")).await;
    assert_eq!(w.len(), 10);
    assert_eq!(w[2]["count"], 2);
    assert_eq!(w[2]["sum"], 2.0 + 102.0);
    assert_eq!(w[2]["min"], 2.0);
    assert_eq!(w[2]["max"], 102.0);
    let uri = format!(
        "/v1/fleets/f/metrics/t?res=1d&from={}&to={}",
        T0 - 86_400_000,
        T0 + 86_400_000
    );
    let (_, _, body) = get(&s, &uri).await;
    assert_eq!(body["windows"][0]["count"], 20);
}

#[tokio::test]
async fn pages_follow_the_cursor() {
    let (_, s) = filled().await;
    let mut uri = ten_minutes("devices/d2", "res=1m&limit=4");
    let mut starts = Vec::new();
    for _ in 0..5 {
        let body = get_ok(&s, &uri).await;
        for w in body["windows"].as_array().unwrap() {
            starts.push(w["start"].as_i64().unwrap());
        }
        match body["next_cursor"].as_str() {
            Some(c) => uri = ten_minutes("devices/d2", &format!("res=1m&limit=4&cursor={c}")),
            None => break,
        }
    }
    let expected: Vec<i64> = (0..10).map(|i| T0 + i * MIN).collect();
    assert_eq!(starts, expected);
}

#[tokio::test]
async fn devices_latest_and_listing() {
    let (_, s) = filled().await;
    let body = get_ok(&s, "/v1/devices/d1").await;
    assert_eq!(body["fleet"], "f");
    assert_eq!(body["metrics"]["t"]["value"], 9.0);
    assert_eq!(body["metrics"]["t"]["ts"], T0 + 9 * MIN + 5);
    let (_, _, body) = get(&s, "/v1/devices?fleet=f").await;
    let ids: Vec<&str> = body["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["d1", "d2"]);
    let (_, _, body) = get(&s, "/v1/devices?fleet=f&limit=1").await;
    assert_eq!(body["devices"].as_array().unwrap().len(), 1);
    let cursor = body["next_cursor"].as_str().unwrap().to_string();
    let (_, _, body) = get(&s, &format!("/v1/devices?fleet=f&limit=1&cursor={cursor}")).await;
    assert_eq!(body["devices"][0]["device_id"], "d2");
    let (_, _, body) = get(&s, "/v1/stats").await;
    assert_eq!(body["accepted_readings"], 20);
    assert_eq!(body["rejected"]["too_late"], 0);
}

#[tokio::test]
async fn errors_are_problems() {
    let (_, s) = filled().await;
    for (uri, status) in [
        ("/v1/devices/nobody", StatusCode::NOT_FOUND),
        ("/v1/devices/nobody/metrics/t", StatusCode::NOT_FOUND),
        ("/v1/devices/d1/metrics/t?res=7s", StatusCode::BAD_REQUEST),
        ("/v1/devices/d1/metrics/t?res=2x", StatusCode::BAD_REQUEST),
        (
            "/v1/devices/d1/metrics/t?from=soon",
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/devices/d1/metrics/t?from=200&to=100",
            StatusCode::BAD_REQUEST,
        ),
        ("/v1/devices/d1/metrics/t?limit=0", StatusCode::BAD_REQUEST),
        ("/v1/devices/d1/metrics/t?frm=1", StatusCode::BAD_REQUEST),
        ("/v1/devices/d1/metrics/bad%20name", StatusCode::BAD_REQUEST),
        ("/v1/dead-letters?reason=boredom", StatusCode::BAD_REQUEST),
        ("/v1/nothing", StatusCode::NOT_FOUND),
    ] {
        let (got, ctype, body) = get(&s, uri).await;
        assert_eq!(got, status, "{uri}: {body}");
        assert_eq!(ctype, "application/problem+json", "{uri}");
        assert_eq!(body["status"], status.as_u16(), "{uri}");
        assert!(!body["detail"].as_str().unwrap().is_empty(), "{uri}");
    }
}

#[tokio::test]
async fn openapi_and_health() {
    let (_, s) = filled().await;
    let body = get_ok(&s, "/openapi.json").await;
    assert_eq!(body["openapi"], "3.0.3");
    assert!(body["paths"]["/v1/fleets/{fleet}/metrics/{metric}"].is_object());
    let (status, _, body) = get(&s, "/healthz").await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
}

#[tokio::test]
async fn the_dashboard_and_its_files_are_served_without_a_token() {
    let mut state = ApiState::new(
        Arc::new(MemoryStore::new()),
        Arc::new(AggregateConfig::default()),
    );
    let tokens = Tokens::parse("dashboard-test-token-0001 read").unwrap();
    state.guard = Arc::new(Guard::new(Some(tokens), ApiLimits::default()));
    let (status, ct, body) = get_text(&state, "/").await;
    assert_eq!(status, StatusCode::OK);
    assert!(ct.starts_with("text/html"), "{ct}");
    assert!(body.contains("/dashboard/app.js"), "{body}");
    let (status, ct, body) = get_text(&state, "/dashboard/app.js").await;
    assert_eq!(status, StatusCode::OK);
    assert!(ct.starts_with("text/javascript"), "{ct}");
    assert!(body.contains("Authorization"));
    let (status, ct, _) = get_text(&state, "/dashboard/style.css").await;
    assert_eq!(status, StatusCode::OK);
    assert!(ct.starts_with("text/css"), "{ct}");
    // The data behind it still needs the token.
    let (status, _, _) = get_text(&state, "/v1/stats").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn fields_can_be_selected_and_served_as_csv() {
    let (_, s) = filled().await;
    let uri = ten_minutes("devices/d1", "res=5m&agg=count,max,last");
    let body = get_ok(&s, &uri).await;
    let w = body["windows"][0].as_object().unwrap();
    let keys: Vec<&str> = w.keys().map(String::as_str).collect();
    assert_eq!(keys, ["count", "end", "last", "max", "start"]);
    let text = get_csv(&s, &format!("{uri}&format=csv")).await;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "start,end,count,max,last_ts,last_value");
    assert_eq!(
        lines[1],
        format!("{T0},{},5,4.0,{},4.0", T0 + 5 * MIN, T0 + 4 * MIN + 5)
    );
    assert_eq!(lines.len(), 3);
    let (status, _, _) = get(&s, &format!("{uri}&agg=count,median")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, _) = get(&s, &format!("{uri}&format=xml")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn tokens_guard_everything_but_health() {
    let (_, mut s) = filled().await;
    let tokens = Tokens::parse("reader-token-0123456789\nadmin-token-0123456789 admin\n").unwrap();
    s.guard = Arc::new(Guard::new(Some(tokens), ApiLimits::default()));
    let call = |uri: &'static str, token: Option<&'static str>| {
        let s = s.clone();
        async move {
            let (status, ctype, _) = get_as(&s, uri, token).await;
            (status, ctype)
        }
    };
    let problem = "application/problem+json".to_string();
    assert_eq!(
        call("/v1/stats", None).await,
        (StatusCode::UNAUTHORIZED, problem.clone())
    );
    assert_eq!(
        call("/v1/stats", Some("wrong-token-0123456789")).await,
        (StatusCode::UNAUTHORIZED, problem.clone())
    );
    assert_eq!(
        call("/v1/stats", Some("reader-token-0123456789")).await.0,
        StatusCode::OK
    );
    assert_eq!(call("/metrics", None).await.0, StatusCode::UNAUTHORIZED);
    // Filled and CSV answers read the same windows, under the same guard.
    const FILLED: &str = "/v1/devices/d1/metrics/t?fill=linear&max_gap=5m&format=csv";
    assert_eq!(call(FILLED, None).await.0, StatusCode::UNAUTHORIZED);
    // Alerts name fleets, devices and values: no token, no list.
    assert_eq!(call("/v1/alerts", None).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(
        call(FILLED, Some("reader-token-0123456789")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        call("/v1/dead-letters", Some("reader-token-0123456789")).await,
        (StatusCode::FORBIDDEN, problem)
    );
    assert_eq!(
        call("/v1/dead-letters", Some("admin-token-0123456789"))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(call("/healthz", None).await.0, StatusCode::OK);
    assert_eq!(call("/openapi.json", None).await.0, StatusCode::OK);
    let (_, _, text) = get_as(&s, "/metrics", Some("admin-token-0123456789")).await;
    assert!(text.contains("iotpipe_api_unauthorized_total 5"), "{text}");
    assert!(text.contains("iotpipe_api_forbidden_total 1"), "{text}");
}

/// A query store that stops in `range` until told to go on: fault injection
/// for the limits.
struct Stall {
    inner: Arc<MemoryStore>,
    entered: Arc<tokio::sync::Notify>,
    go: Arc<tokio::sync::Notify>,
    stalled: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl processors::store::RollupQuery for Stall {
    async fn get(
        &self,
        pk: &str,
        sk: &str,
    ) -> Result<Option<schemas::state::Item>, processors::store::StoreError> {
        self.inner.get(pk, sk).await
    }
    async fn range(
        &self,
        r: processors::store::Range,
    ) -> Result<Vec<(String, schemas::state::Item)>, processors::store::StoreError> {
        if !self.stalled.swap(true, std::sync::atomic::Ordering::SeqCst) {
            self.entered.notify_one();
            self.go.notified().await;
        }
        self.inner.range(r).await
    }
    async fn scan_prefix(
        &self,
        scan: processors::store::Scan,
    ) -> Result<Vec<processors::store::KeyedItem>, processors::store::StoreError> {
        self.inner.scan_prefix(scan).await
    }
}

#[tokio::test]
async fn requests_beyond_the_limit_are_shed_and_slow_ones_time_out() {
    let (store, mut s) = filled().await;
    let (entered, go) = (
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(tokio::sync::Notify::new()),
    );
    s.query = Arc::new(Stall {
        inner: store.clone(),
        entered: entered.clone(),
        go: go.clone(),
        stalled: false.into(),
    });
    s.guard = Arc::new(Guard::new(
        None,
        ApiLimits {
            max_concurrent: 1,
            timeout: std::time::Duration::from_secs(30),
        },
    ));
    let slow = tokio::spawn(
        app(s.clone()).oneshot(Request::get("/v1/stats").body(Body::empty()).unwrap()),
    );
    entered.notified().await;
    let (status, ctype, body) = get(&s, "/healthz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(ctype, "application/problem+json");
    go.notify_one();
    assert_eq!(slow.await.unwrap().unwrap().status(), StatusCode::OK);
    assert_eq!(
        s.guard
            .metrics
            .shed
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    s.query = Arc::new(Stall {
        inner: store,
        entered,
        go,
        stalled: false.into(),
    });
    s.guard = Arc::new(Guard::new(
        None,
        ApiLimits {
            max_concurrent: 8,
            timeout: std::time::Duration::from_millis(50),
        },
    ));
    let (status, _, body) = get(&s, "/v1/stats").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("longer than"));
    assert_eq!(
        s.guard
            .metrics
            .timeouts
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

/// A reading accepted just before its window's bound but still in the
/// stream keeps the window from being final until it is applied; the window
/// is final once the watermark passes its bound, and a record that reaches
/// the processors later than the slack is refused rather than change it.
#[tokio::test]
async fn final_waits_for_what_is_still_in_the_stream() {
    let store = Arc::new(MemoryStore::new());
    let cfg = Arc::new(AggregateConfig::default());
    let metrics = ProcessorMetrics::default();
    let bound = T0 + MIN + cfg.allowed_lateness_ms;
    let at = |seq: u128, received_at: i64, value: f64| {
        let mut r = record(seq, "d1", "f", T0 + 5, value);
        r.data = Bytes::from(
            PackedRecord {
                device_id: "d1".into(),
                fleet: "f".into(),
                received_at,
                readings: vec![Reading {
                    seq: Some(seq as u64),
                    ts: T0 + seq as i64,
                    metrics: vec![Metric {
                        name: "t".into(),
                        value,
                    }],
                }],
            }
            .encode(),
        );
        r.arrival_ms = received_at;
        r
    };
    process_batch("s0", &[at(1, T0 + 10, 1.0)], store.as_ref(), &cfg, &metrics)
        .await
        .unwrap();
    let mut state = ApiState::new(store.clone(), cfg.clone());
    state.clock = Arc::new(move || bound + 60_000);
    let uri = format!("/v1/devices/d1/metrics/t?res=1m&from={T0}&to={}", T0 + MIN);
    let window = |body: &Value| body["windows"][0].clone();

    // A reading stamped 1 ms before the bound is on its way: the shard has
    // nothing to read yet, and its idle watermark stays the slack behind.
    let stamped = bound - 1;
    idle_until(
        store.as_ref(),
        "s0",
        stamped + cfg.watermark_slack_ms / 2,
        &cfg,
    )
    .await;
    let (_, _, body) = get(&state, &uri).await;
    assert_eq!(window(&body)["final"], false, "{body}");
    assert_eq!(window(&body)["count"], 1);

    // It is applied: the window changes and is still not final.
    process_batch("s0", &[at(2, stamped, 2.0)], store.as_ref(), &cfg, &metrics)
        .await
        .unwrap();
    let (_, _, body) = get(&state, &uri).await;
    assert_eq!(window(&body)["count"], 2);
    assert_eq!(window(&body)["final"], false);

    // Everything that arrived up to the bound has been applied: final.
    idle_until(store.as_ref(), "s0", bound + cfg.watermark_slack_ms, &cfg).await;
    let (_, _, final_body) = get(&state, &uri).await;
    assert_eq!(window(&final_body)["final"], true);
    assert_eq!(window(&final_body)["count"], 2);

    // A record stamped before the bound that reaches the processors only
    // now, later than the slack allows, is refused: the window never
    // changes after it was final.
    let stats = process_batch(
        "s0",
        &[at(3, bound - 2, 3.0)],
        store.as_ref(),
        &cfg,
        &metrics,
    )
    .await
    .unwrap();
    assert_eq!(stats.accepted_readings, 0);
    assert_eq!(stats.rejected, vec![(schemas::RejectReason::TooLate, 1)]);
    let (_, _, after) = get(&state, &uri).await;
    assert_eq!(window(&after), window(&final_body));
}

/// A device that stops publishing keeps its last hour pending until a sweep
/// compacts it; the API answers the same before and after, and a second
/// sweep finds nothing to do.
#[tokio::test]
async fn a_quiet_devices_last_windows_are_compacted_by_the_sweep() {
    let store = Arc::new(MemoryStore::new());
    let cfg = Arc::new(AggregateConfig::default());
    let metrics = ProcessorMetrics::default();
    let batch: Vec<Record> = (0..3)
        .map(|i| record(i + 1, "d1", "f", T0 + i as i64 * MIN, i as f64))
        .collect();
    process_batch("s0", &batch, store.as_ref(), &cfg, &metrics)
        .await
        .unwrap();
    let hour = schemas::Resolution::HOUR;
    let h0 = T0.div_euclid(hour) * hour;
    // The shard goes idle past the hour's end plus the lateness.
    idle_until(
        store.as_ref(),
        "s0",
        h0 + 2 * hour + cfg.watermark_slack_ms + 1,
        &cfg,
    )
    .await;
    let mut state = ApiState::new(store.clone(), cfg.clone());
    state.clock = Arc::new(move || h0 + 3 * hour);
    let uri = format!("/v1/devices/d1/metrics/t?res=1h&from={h0}&to={}", h0 + hour);
    let (_, _, before) = get(&state, &uri).await;
    assert_eq!(before["windows"][0]["count"], 3, "{before}");
    let key = rollup::keys::ItemKey::DeviceWindow {
        device: "d1".into(),
        res: "1h".parse().unwrap(),
        start: h0,
    };
    assert!(store.get(&key.pk(), &key.sk()).await.unwrap().is_none());

    let swept = processors::run::sweep_quiet_devices(store.as_ref(), store.as_ref(), &cfg)
        .await
        .unwrap();
    assert_eq!(swept, 1);
    assert!(store.get(&key.pk(), &key.sk()).await.unwrap().is_some());
    let (_, _, after) = get(&state, &uri).await;
    assert_eq!(after["windows"], before["windows"]);
    let (_, _, device) = get(&state, "/v1/devices/d1").await;
    assert_eq!(device["metrics"]["t"]["value"], 2.0, "{device}");
    let again = processors::run::sweep_quiet_devices(store.as_ref(), store.as_ref(), &cfg)
        .await
        .unwrap();
    assert_eq!(again, 0);
}

/// One device with readings in minutes 0, 1 and 4 (values 1, 2, 5) of the
/// six from T0: a gap of two minutes, and one open minute at the end.
async fn gappy() -> ApiState {
    let store = Arc::new(MemoryStore::new());
    let cfg = Arc::new(AggregateConfig::default());
    let batch: Vec<Record> = [(0, 1.0), (1, 2.0), (4, 5.0)]
        .iter()
        .enumerate()
        .map(|(i, &(minute, value))| record(i as u128 + 1, "d9", "f", T0 + minute * MIN, value))
        .collect();
    let metrics = ProcessorMetrics::default();
    process_batch("s0", &batch, store.as_ref(), &cfg, &metrics)
        .await
        .unwrap();
    let mut state = ApiState::new(store, cfg);
    state.clock = Arc::new(move || T0 + 6 * MIN);
    state
}

/// An answer's windows in short: each as its avg, prefixed by how it was
/// filled (`n`ull, `p`revious, `l`inear), `-` for no value: "1 2 l3 n- 5".
fn filled_rows(body: &Value) -> String {
    let row = |w: &Value| {
        let how = w["filled"].as_str().map_or("", |f| &f[..1]);
        let avg = w["avg"].as_f64().map_or("-".into(), |a| a.to_string());
        format!("{how}{avg}")
    };
    let rows: Vec<String> = body["windows"]
        .as_array()
        .unwrap()
        .iter()
        .map(row)
        .collect();
    rows.join(" ")
}

#[tokio::test]
async fn gaps_are_filled_as_asked_and_say_so() {
    let s = gappy().await;
    let range = format!(
        "res=1m&from={T0}&to={}&agg=count,avg,sum,last",
        T0 + 6 * MIN
    );
    let uri = |fill: &str| format!("/v1/devices/d9/metrics/t?{range}&{fill}");
    for (fill, want) in [
        ("fill=none", "1 2 5"),
        ("fill=null", "1 2 n- n- 5 n-"),
        ("fill=previous", "1 2 p2 p2 5 p5"),
        ("fill=linear", "1 2 l3 l4 5 n-"),
        // The two-minute gap is longer than one minute: left empty.
        ("fill=linear&max_gap=1m", "1 2 n- n- 5 n-"),
        ("fill=previous&max_gap=2m", "1 2 p2 p2 5 p5"),
    ] {
        let (status, _, body) = get(&s, &uri(fill)).await;
        assert_eq!(status, StatusCode::OK, "{fill}: {body}");
        assert_eq!(filled_rows(&body), want, "{fill}");
    }
    // A filled window has no readings: count 0, no sum, no last reading.
    let (_, _, body) = get(&s, &uri("fill=previous")).await;
    let gap = &body["windows"][2];
    assert_eq!(gap["count"], 0);
    assert!(gap["sum"].is_null() && gap["last"].is_null(), "{gap}");
    let text = get_csv(&s, &format!("{}&format=csv", uri("fill=linear"))).await;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "start,end,count,avg,sum,last_ts,last_value,filled"
    );
    let third = format!(
        "{},{},0,3.0,null,null,null,linear",
        T0 + 2 * MIN,
        T0 + 3 * MIN
    );
    assert_eq!(lines[3], third);
    assert!(
        lines[2].ends_with(','),
        "a stored row leaves `filled` empty: {}",
        lines[2]
    );
}

#[tokio::test]
async fn gap_filling_refuses_what_it_cannot_answer() {
    let s = gappy().await;
    let base = format!(
        "/v1/devices/d9/metrics/t?res=1m&from={T0}&to={}",
        T0 + 6 * MIN
    );
    for bad in [
        "fill=zero",
        "fill=null&max_gap=1m",
        "max_gap=1m",
        "fill=linear&max_gap=soon",
        // Six windows to fill, five allowed: a filled answer is one page.
        "fill=null&limit=5",
    ] {
        let (status, _, body) = get(&s, &format!("{base}&{bad}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert!(
            body["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{bad}"
        );
    }
}

fn presence(seq: u128, device: &str, fleet: Option<&str>, at: i64) -> Record {
    let data = schemas::Presence {
        device_id: device.into(),
        fleet: fleet.map(str::to_string),
        client_id: device.into(),
        at,
        event: schemas::PresenceEvent::Disconnected {
            reason: schemas::presence::CONNECTION_LOST.into(),
        },
    }
    .encode();
    Record {
        seq: seq.into(),
        partition_key: device.into(),
        data: Bytes::from(data),
        arrival_ms: at,
    }
}

async fn ids(state: &ApiState, uri: &str) -> Vec<String> {
    get_ok(state, uri).await["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap().to_string())
        .collect()
}

/// Three devices publish for ten minutes from one span start, so their
/// member rows say only when the span started; one then stops, one
/// disconnects with its will. Listing by status reads past the rows to
/// each device's latest reading, and the time is the API's clock.
#[tokio::test]
async fn devices_are_listed_by_status_against_the_clock() {
    let store = Arc::new(MemoryStore::new());
    let cfg = Arc::new(AggregateConfig::default());
    let metrics = ProcessorMetrics::default();
    let mut seq = 0u128;
    for minute in 0..10 {
        let mut batch = Vec::new();
        for device in ["on", "quiet", "gone"] {
            if device == "quiet" && minute >= 3 {
                continue;
            }
            seq += 1;
            batch.push(record(seq, device, "f", T0 + minute * MIN + 5, 1.0));
        }
        if minute == 6 {
            seq += 1;
            // IoT Core's events name no fleet; the device item's is used.
            batch.push(presence(seq, "gone", None, T0 + minute * MIN + 30));
        }
        process_batch("s0", &batch, store.as_ref(), &cfg, &metrics)
            .await
            .unwrap();
    }
    let mut state = ApiState::new(store.clone(), cfg);
    let now = T0 + 9 * MIN + 30;
    state.clock = Arc::new(move || now);
    // `quiet` last published 6.5 minutes ago; `gone` published after its
    // disconnect, so it is online again.
    assert_eq!(
        ids(&state, "/v1/devices?fleet=f&status=stale").await,
        ["quiet"]
    );
    assert_eq!(
        ids(&state, "/v1/devices?fleet=f&status=online").await,
        ["gone", "on"]
    );
    let body = get_ok(&state, "/v1/devices?fleet=f").await;
    let on = &body["devices"][1];
    assert_eq!(on["status"], "online");
    assert_eq!(on["last_seen"], T0 + 9 * MIN + 15);

    // Now `gone` disconnects after its last reading.
    process_batch(
        "s0",
        &[presence(seq + 1, "gone", Some("f"), T0 + 9 * MIN + 20)],
        store.as_ref(),
        &AggregateConfig::default(),
        &metrics,
    )
    .await
    .unwrap();
    assert_eq!(
        ids(&state, "/v1/devices?fleet=f&status=offline").await,
        ["gone"]
    );
    assert_eq!(
        get_ok(&state, "/v1/devices/gone").await["status"],
        "offline"
    );
    assert_eq!(get_ok(&state, "/v1/devices/quiet").await["status"], "stale");
    // A fleet's own threshold.
    let mut lenient = state.clone();
    lenient.stale_after = Arc::new(processors::api::StaleAfter {
        default_ms: 5 * MIN,
        fleets: [("f".to_string(), 10 * MIN)].into(),
    });
    assert!(
        ids(&lenient, "/v1/devices?fleet=f&status=stale")
            .await
            .is_empty()
    );
    let (status, _, _) = get(&state, "/v1/devices?fleet=f&status=asleep").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // `/metrics` counts the same statuses per fleet, where asked to.
    let (_, _, text) = get_text(&state, "/metrics").await;
    assert!(!text.contains("iotpipe_api_devices"), "{text}");
    let mut counted = state.clone();
    counted.device_counts = true;
    let (status, _, text) = get_text(&counted, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    for line in [
        "iotpipe_api_devices{fleet=\"f\",status=\"online\"} 1",
        "iotpipe_api_devices{fleet=\"f\",status=\"stale\"} 1",
        "iotpipe_api_devices{fleet=\"f\",status=\"offline\"} 1",
    ] {
        assert!(text.contains(line), "{line} in {text}");
    }
    counted.stale_after = lenient.stale_after.clone();
    let (_, _, text) = get_text(&counted, "/metrics").await;
    assert!(
        text.contains("iotpipe_api_devices{fleet=\"f\",status=\"online\"} 2"),
        "{text}"
    );
}
