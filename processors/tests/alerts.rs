//! Alert rules evaluated on windows the real core wrote, and listed by the
//! API: each crossing window fires once per revision, whatever the passes;
//! behind the alerts lease, delivered by one process of several; and
//! relayed from the store to another process's tap once each; and on AWS
//! (DynamoDB and SNS on moto), published to the topic once each.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_sqs::types::QueueAttributeName;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use processors::alerts::{
    AlertContext, AlertLease, AlertMetrics, AlertRelay, AlertWorker, AlertsSetup, Backoff,
    Notifier, evaluate_rules,
};
use processors::api::{ApiState, app};
use processors::lambda::alerts::{AlertsFunctionConfig, AlertsHandler, AlertsReport, SnsTopic};
use processors::lambda::env::FromEnv;
use processors::metrics::ProcessorMetrics;
use processors::run::{advance_idle_watermark, process_batch};
use processors::store::dynamodb::DynamoStore;
use processors::store::memory::MemoryStore;
use processors::store::{RollupQuery, RollupStore};
use rollup::AggregateConfig;
use rollup::alerts::{AlertRule, Scope};
use schemas::state::AlertState;
use serde_json::Value;
use testkit::MemoryLeaseStore;
use testkit::batches::{one_reading, one_reading_received};
use testkit::moto::{moto_config, sqs_queue, unique_name};
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
    cfg: Arc<AggregateConfig>,
    ctx: AlertContext,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture::on(Arc::new(MemoryStore::new()))
    }

    /// The rules `hot` and `hot2` on `store`.
    fn on<S: RollupStore + RollupQuery>(store: Arc<S>) -> Fixture {
        let cfg = Arc::new(AggregateConfig::default());
        let ctx = AlertContext {
            setup: Arc::new(AlertsSetup {
                rules: vec![rule("hot", 1), rule("hot2", 2)],
                webhook: None,
                evaluate_every: Duration::from_secs(1),
                keep_ms: 86_400_000,
            }),
            store: store.clone(),
            query: store,
            aggregate: cfg.clone(),
            metrics: Arc::new(AlertMetrics::default()),
            clock: Arc::new(|| T0 + 10 * MIN),
        };
        Fixture { cfg, ctx }
    }

    async fn batch(&self, records: &[schemas::shard::Record]) {
        process_batch(
            "s0",
            records,
            self.ctx.store.as_ref(),
            &self.cfg,
            &ProcessorMetrics::default(),
        )
        .await
        .unwrap();
    }

    /// Everything that arrived up to `at` is applied.
    async fn watermark(&self, at: i64) {
        let now = at + self.cfg.watermark_slack_ms;
        advance_idle_watermark("s0", self.ctx.store.as_ref(), &self.cfg, now)
            .await
            .unwrap();
    }

    /// One reading a minute from minute 0 (a window's average is its value):
    /// 10, 40, 20, 29 and 50.
    async fn five_minutes(&self) {
        let values = [10.0, 40.0, 20.0, 29.0, 50.0];
        let on_time: Vec<_> = values
            .iter()
            .enumerate()
            .map(|(i, v)| one_reading(i as u64 + 1, "d1", "f", T0 + i as i64 * MIN + 5, *v))
            .collect();
        self.batch(&on_time).await;
    }

    /// A late reading of 40 in minute 3, applied with the watermark past
    /// its arrival: minute 3 becomes 34.5 at revision 1.
    async fn late_minute_3(&self) {
        let late = T0 + 5 * MIN + 20;
        let reading = one_reading_received(6, "d1", "f", T0 + 3 * MIN + 30, 40.0, late);
        self.batch(&[reading]).await;
        self.watermark(late).await;
    }

    /// One pass; returns the alerts fired so far, in total.
    async fn evaluate(&self) -> u64 {
        evaluate_rules(&self.ctx).await.unwrap();
        self.ctx.metrics.fired.load(Relaxed)
    }

    async fn list(&self, query: &str) -> (StatusCode, Value) {
        let mut state = ApiState::new(self.ctx.query.clone(), self.cfg.clone());
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
    f.five_minutes().await;

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
    f.late_minute_3().await;
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

/// A receiver that records who delivered which alert, and refuses while
/// its switch is on.
struct Recorder {
    process: &'static str,
    refuse: AtomicBool,
    log: Arc<Mutex<Vec<(&'static str, String)>>>,
}

#[async_trait::async_trait]
impl Notifier for Recorder {
    async fn notify(&self, alert: &AlertState) -> Result<(), String> {
        if self.refuse.load(Relaxed) {
            return Err("refused".into());
        }
        let id = processors::alerts::webhook::alert_id(alert);
        self.log.lock().unwrap().push((self.process, id));
        Ok(())
    }
}

/// One `process` instance's alert loop on the fixture's store and the
/// shared lease table.
fn process(
    f: &Fixture,
    leases: &Arc<MemoryLeaseStore>,
    name: &'static str,
    log: &Arc<Mutex<Vec<(&'static str, String)>>>,
) -> (AlertWorker, Arc<Recorder>) {
    let recorder = Arc::new(Recorder {
        process: name,
        refuse: AtomicBool::new(false),
        log: log.clone(),
    });
    let ctx = AlertContext {
        setup: f.ctx.setup.clone(),
        store: f.ctx.store.clone(),
        query: f.ctx.query.clone(),
        aggregate: f.cfg.clone(),
        metrics: Arc::new(AlertMetrics::default()),
        clock: f.ctx.clock.clone(),
    };
    let backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(1));
    let worker = AlertWorker::new(ctx)
        .with_lease(AlertLease::new(leases.clone(), name, LEASE))
        .with_notifier(recorder.clone(), backoff);
    (worker, recorder)
}

const LEASE: Duration = Duration::from_secs(10);

/// A renewal of every process at `now`, then a pass and a delivery each.
async fn round(processes: &mut [&mut AlertWorker], now: i64) -> Vec<bool> {
    let mut leads = Vec::new();
    for p in processes.iter_mut() {
        leads.push(p.renew(now).await);
    }
    for p in processes.iter_mut() {
        p.evaluate().await.unwrap();
        p.deliver_due().await;
    }
    leads
}

#[tokio::test]
async fn behind_the_lease_one_process_delivers_each_alert_and_another_takes_over_when_it_dies() {
    let f = Fixture::new();
    let leases = Arc::new(MemoryLeaseStore::new());
    let log = Arc::new(Mutex::new(Vec::new()));
    let (mut a, a_hook) = process(&f, &leases, "a", &log);
    let (mut b, _) = process(&f, &leases, "b", &log);
    let delivered = |log: &Mutex<Vec<(&'static str, String)>>| log.lock().unwrap().clone();

    f.five_minutes().await;
    f.watermark(T0 + 3 * MIN).await;
    let t = 1_000_000;
    assert_eq!(round(&mut [&mut a, &mut b], t).await, [true, false]);
    assert_eq!(round(&mut [&mut a, &mut b], t + 3_000).await, [true, false]);
    let hot_1 = format!("hot/{}/0", T0 + MIN);
    assert_eq!(delivered(&log), [("a", hot_1.clone())]);

    // Minute 4 crosses `hot` (not `hot2`: minute 3 did not); a fires it,
    // its receiver refuses, and a dies before a retry: it neither renews
    // nor gives the lease up.
    a_hook.refuse.store(true, Relaxed);
    f.watermark(T0 + 5 * MIN).await;
    assert_eq!(round(&mut [&mut a, &mut b], t + 6_000).await, [true, false]);
    drop(a);

    // b waits out the lease on its own clock, from when it saw a's last
    // renewal; then it takes over and delivers what a left undelivered.
    let last_renewal = t + 6_000;
    let early = last_renewal + LEASE.as_millis() as i64 - 1;
    assert_eq!(round(&mut [&mut b], early).await, [false]);
    assert_eq!(delivered(&log).len(), 1);
    let expired = last_renewal + LEASE.as_millis() as i64;
    assert_eq!(round(&mut [&mut b], expired).await, [true]);
    assert_eq!(round(&mut [&mut b], expired + 3_000).await, [true]);
    let hot_4 = format!("hot/{}/0", T0 + 4 * MIN);
    assert_eq!(delivered(&log), [("a", hot_1), ("b", hot_4)]);
    let (_, body) = f.list("").await;
    let alerts = body["alerts"].as_array().unwrap();
    assert_eq!(alerts.len(), 2, "{body}");
    assert!(alerts.iter().all(|a| a["delivered"] == true), "{body}");
}

#[tokio::test]
async fn a_relay_hands_on_each_alert_fired_since_it_started_once() {
    let f = Fixture::new();
    let fired_at = (f.ctx.clock)();
    let setup = f.ctx.setup.clone();
    let mut relay = AlertRelay::new(f.ctx.query.clone(), &setup, &f.cfg, fired_at);
    let mut too_young = AlertRelay::new(f.ctx.query.clone(), &setup, &f.cfg, fired_at + 1);
    let ids = |alerts: Vec<AlertState>| -> Vec<(String, i64, u64)> {
        alerts
            .iter()
            .map(|a| alert(&a.rule, (a.window_start - T0) / MIN, a.revision))
            .collect()
    };
    let now = T0 + 10 * MIN;
    assert!(relay.poll(now).await.unwrap().is_empty());

    f.five_minutes().await;
    f.watermark(T0 + 5 * MIN).await;
    assert_eq!(f.evaluate().await, 2);
    assert_eq!(
        ids(relay.poll(now).await.unwrap()),
        [alert("hot", 1, 0), alert("hot", 4, 0)]
    );
    assert!(relay.poll(now + 1).await.unwrap().is_empty(), "once each");
    // Alerts fired before a relay started went to the taps of the
    // processes running then.
    assert!(too_young.poll(now).await.unwrap().is_empty());

    // A late reading revises minute 3: only the alerts it fires are new.
    f.late_minute_3().await;
    assert_eq!(f.evaluate().await, 4);
    assert_eq!(
        ids(relay.poll(now + 2).await.unwrap()),
        [alert("hot", 3, 1), alert("hot2", 4, 0)]
    );
    assert!(relay.poll(now + 3).await.unwrap().is_empty());
}

#[tokio::test]
async fn on_aws_each_alert_is_published_to_the_sns_topic_once_and_marked_delivered() {
    let aws = moto_config().unwrap();
    let sdk = aws.load().await;
    let (sns, sqs) = (
        aws_sdk_sns::Client::new(&sdk),
        aws_sdk_sqs::Client::new(&sdk),
    );
    let topic = sns
        .create_topic()
        .name(unique_name("alerts"))
        .send()
        .await
        .unwrap()
        .topic_arn
        .unwrap();
    // What the topic publishes lands in a queue the test reads, as is.
    let queue_url = sqs_queue(&sqs, "alerts").await.unwrap();
    let queue_arn = sqs
        .get_queue_attributes()
        .queue_url(&queue_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap()[&QueueAttributeName::QueueArn]
        .clone();
    sns.subscribe()
        .topic_arn(&topic)
        .protocol("sqs")
        .endpoint(&queue_arn)
        .attributes("RawMessageDelivery", "true")
        .send()
        .await
        .unwrap();
    let store = Arc::new(DynamoStore::connect(&aws, &unique_name("rollups")).await);
    store.create_table().await.unwrap();
    let f = Fixture::on(store.clone());
    f.five_minutes().await;
    f.watermark(T0 + 5 * MIN).await;

    // The function as its environment configures it.
    let rules = r#"[
        {"name": "hot", "fleet": "f", "metric": "t", "resolution": "1m",
         "aggregate": "avg", "comparison": ">", "threshold": 30.0},
        {"name": "hot2", "fleet": "f", "metric": "t", "resolution": "1m",
         "aggregate": "avg", "comparison": ">", "threshold": 30.0, "for": 2}
    ]"#;
    let table = store.table_name().to_string();
    let vars = |name: &str| match name {
        "TABLE_NAME" => Some(table.clone()),
        "ALERTS_TOPIC_ARN" => Some(topic.clone()),
        "ALERT_RULES" => Some(rules.to_string()),
        _ => None,
    };
    let config = AlertsFunctionConfig::from_vars(vars).unwrap();
    assert_eq!(config.setup.rules, f.ctx.setup.rules);
    let notifier = Arc::new(SnsTopic::new(sns, &topic));
    let handler = AlertsHandler::new(store, config, notifier, Arc::new(|| T0 + 10 * MIN));
    let report = handler.pass().await;
    assert_eq!((report.fired, report.delivered, report.failed), (2, 2, 0));
    assert_eq!(report.error, None);
    assert_eq!(handler.pass().await, AlertsReport::default(), "once each");

    let mut published = Vec::new();
    loop {
        let received = sqs
            .receive_message()
            .queue_url(&queue_url)
            .max_number_of_messages(10)
            .send()
            .await
            .unwrap();
        let messages = received.messages();
        if messages.is_empty() {
            break;
        }
        for m in messages {
            let body: Value = serde_json::from_str(m.body().unwrap()).unwrap();
            published.push(alert(
                body["rule"].as_str().unwrap(),
                (body["window_start"].as_i64().unwrap() - T0) / MIN,
                body["revision"].as_u64().unwrap(),
            ));
            sqs.delete_message()
                .queue_url(&queue_url)
                .receipt_handle(m.receipt_handle().unwrap())
                .send()
                .await
                .unwrap();
        }
    }
    published.sort();
    assert_eq!(published, [alert("hot", 1, 0), alert("hot", 4, 0)]);
    let (_, body) = f.list("").await;
    let alerts = body["alerts"].as_array().unwrap();
    assert_eq!(alerts.len(), 2, "{body}");
    assert!(alerts.iter().all(|a| a["delivered"] == true), "{body}");
}
