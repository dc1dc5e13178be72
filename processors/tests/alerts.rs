//! Alert rules evaluated on windows the real core wrote, and listed by the
//! API: each crossing window fires once per revision, whatever the passes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use processors::alerts::{AlertContext, AlertMetrics, AlertsSetup, evaluate_rules};
use processors::api::{ApiState, app};
use processors::metrics::ProcessorMetrics;
use processors::run::{advance_idle_watermark, process_batch};
use processors::store::memory::MemoryStore;
use rollup::AggregateConfig;
use rollup::alerts::{AlertRule, Scope};
use serde_json::Value;
use testkit::batches::{one_reading, one_reading_received};
use tower::ServiceExt;

const T0: i64 = 1_764_240_000_000; // a minute boundary
const MIN: i64 = 60_000;

fn rule(name: &str, for_windows: u32) -> AlertRule {
    AlertRule {
        name: name.into(),
        scope: Scope::Fleet("f".into()),
        metric: "t".into(),
        res: "1m".parse().unwrap(),
        aggregate: "avg".parse().unwrap(),
        comparison: ">".parse().unwrap(),
        threshold: 30.0,
        for_windows,
    }
}

struct Fixture {
    store: Arc<MemoryStore>,
    cfg: Arc<AggregateConfig>,
    ctx: AlertContext,
}

impl Fixture {
    fn new() -> Fixture {
        let store = Arc::new(MemoryStore::new());
        let cfg = Arc::new(AggregateConfig::default());
        let ctx = AlertContext {
            setup: Arc::new(AlertsSetup {
                rules: vec![rule("hot", 1), rule("hot2", 2)],
                webhook: None,
                evaluate_every: Duration::from_secs(1),
                keep_ms: 86_400_000,
            }),
            store: store.clone(),
            query: store.clone(),
            aggregate: cfg.clone(),
            metrics: Arc::new(AlertMetrics::default()),
            clock: Arc::new(|| T0 + 10 * MIN),
        };
        Fixture { store, cfg, ctx }
    }

    async fn batch(&self, records: &[schemas::shard::Record]) {
        process_batch(
            "s0",
            records,
            self.store.as_ref(),
            &self.cfg,
            &ProcessorMetrics::default(),
        )
        .await
        .unwrap();
    }

    /// Everything that arrived up to `at` is applied.
    async fn watermark(&self, at: i64) {
        let now = at + self.cfg.watermark_slack_ms;
        advance_idle_watermark("s0", self.store.as_ref(), &self.cfg, now)
            .await
            .unwrap();
    }

    /// One pass; returns the alerts fired so far, in total.
    async fn evaluate(&self) -> u64 {
        evaluate_rules(&self.ctx).await.unwrap();
        self.ctx.metrics.fired.load(Relaxed)
    }

    async fn list(&self, query: &str) -> (StatusCode, Value) {
        let mut state = ApiState::new(self.store.clone(), self.cfg.clone());
        state.alert_rules = Arc::from(["hot".to_string(), "hot2".to_string()]);
        let resp = app(state)
            .oneshot(
                Request::get(format!("/v1/alerts{query}"))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    /// (rule, minute of the window, revision) of every listed alert.
    async fn listed(&self, query: &str) -> Vec<(String, i64, u64)> {
        let (status, body) = self.list(query).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["rule"].as_str().unwrap().to_string(),
                    (a["window_start"].as_i64().unwrap() - T0) / MIN,
                    a["revision"].as_u64().unwrap(),
                )
            })
            .collect()
    }
}

fn alert(rule: &str, minute: i64, revision: u64) -> (String, i64, u64) {
    (rule.to_string(), minute, revision)
}

#[tokio::test]
async fn each_crossing_window_fires_once_per_revision() {
    let f = Fixture::new();
    // One reading a minute; the average of a window is its value.
    let values = [10.0, 40.0, 20.0, 29.0, 50.0];
    let on_time: Vec<_> = values
        .iter()
        .enumerate()
        .map(|(i, v)| one_reading(i as u64 + 1, "d1", "f", T0 + i as i64 * MIN + 5, *v))
        .collect();
    f.batch(&on_time).await;

    // Nothing is judged before the watermark passed a window's end.
    assert_eq!(f.evaluate().await, 0);
    f.watermark(T0 + 3 * MIN).await;
    assert_eq!(f.evaluate().await, 1, "minute 1 crossed");
    assert_eq!(f.evaluate().await, 1, "a second pass fires nothing again");

    f.watermark(T0 + 5 * MIN).await;
    assert_eq!(
        f.evaluate().await,
        2,
        "minute 4 crossed; minute 3 (29) did not"
    );

    // A late reading lifts minute 3 to 34.5 at revision 1: `hot` fires for
    // it, and `hot2` (two windows in a row) now holds at minute 4.
    let late = T0 + 5 * MIN + 20;
    f.batch(&[one_reading_received(
        6,
        "d1",
        "f",
        T0 + 3 * MIN + 30,
        40.0,
        late,
    )])
    .await;
    f.watermark(late).await;
    assert_eq!(f.evaluate().await, 4);
    assert_eq!(f.evaluate().await, 4);

    assert_eq!(
        f.listed("").await,
        [
            alert("hot", 4, 0),
            alert("hot2", 4, 0),
            alert("hot", 3, 1),
            alert("hot", 1, 0),
        ]
    );
    let from = T0 + 2 * MIN;
    assert_eq!(
        f.listed(&format!("?rule=hot&from={from}")).await,
        [alert("hot", 4, 0), alert("hot", 3, 1)]
    );
    let (_, body) = f.list("?rule=hot&limit=1").await;
    let newest = &body["alerts"][0];
    assert_eq!(newest["value"], 50.0);
    assert_eq!(newest["late_count"], 0);
    assert_eq!(newest["delivered"], false);
    let (_, body) = f.list(&format!("?rule=hot&to={}", T0 + 2 * MIN)).await;
    assert_eq!(body["alerts"].as_array().unwrap().len(), 1, "{body}");
    let (status, _) = f.list("?rule=a%7Cb").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = f.list("?severity=high").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}
