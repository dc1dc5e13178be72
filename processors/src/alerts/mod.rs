//! Alerts: the shell around `rollup::alerts`. It reads the windows each rule
//! watches, writes each firing once as an alert item, and delivers the
//! alerts not yet delivered to a webhook.
//!
//! - `evaluate`: one pass over the rules: windows read through the query
//!   API's own reads (so a rule sees exactly what `GET .../metrics/...`
//!   serves, fleet parts merged), [`rollup::alerts::evaluate`], and an
//!   `InsertOnce` write per firing keyed by (rule, window start, revision).
//! - `webhook`: the notification: JSON, signed with HMAC-SHA256, retried with
//!   backoff, and marked delivered in its item after a 2xx.
//! - [`run`]: the loop that wakes for an evaluation tick or a retry that is
//!   due.
//!
//! Evaluation is driven by the store, not by the write path: fleet windows
//! are written per batch and shard and merged on read, and a window is
//! judged only once the processed watermark has passed its end. The key
//! makes a firing exactly once per (rule, window, revision) whatever the
//! ticks and restarts; a notification is delivered at least once, and its
//! `X-Iotpipe-Alert-Id` lets a receiver drop a repeat (a crash between the
//! 2xx and the delivered mark sends it again).

mod evaluate;
pub mod webhook;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use rollup::AggregateConfig;
use rollup::alerts::AlertRule;
use rollup::keys::ItemKey;
use schemas::state::AlertState;
use tokio::time::Instant;

pub use aws::backoff::Backoff;
pub use evaluate::{AlertError, evaluate_rules};
pub use webhook::WebhookConfig;

use crate::store::{RollupQuery, RollupStore};

/// What the alert loop runs with.
#[derive(Debug, Clone)]
pub struct AlertsSetup {
    pub rules: Vec<AlertRule>,
    /// Where notifications go; without one, alerts are only listed.
    pub webhook: Option<WebhookConfig>,
    /// How often the rules are evaluated.
    pub evaluate_every: Duration,
    /// How long an alert item is kept after it fired, ms.
    pub keep_ms: i64,
}

/// What the alert loop counts, for `/metrics`.
#[derive(Debug, Default)]
pub struct AlertMetrics {
    /// Alert items written: one per (rule, window, revision).
    pub fired: AtomicU64,
    pub delivered: AtomicU64,
    /// Delivery attempts after a failed one.
    pub retries: AtomicU64,
    /// Delivery attempts that failed (no answer, or not a 2xx).
    pub failures: AtomicU64,
}

impl AlertMetrics {
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        for (name, help, n) in [
            (
                "iotpipe_alert_firings_total",
                "Alerts fired: windows at one revision that crossed a rule's threshold.",
                &self.fired,
            ),
            (
                "iotpipe_alert_deliveries_total",
                "Alert notifications a webhook acknowledged with a 2xx.",
                &self.delivered,
            ),
            (
                "iotpipe_alert_delivery_retries_total",
                "Alert notifications sent again after a failed attempt.",
                &self.retries,
            ),
            (
                "iotpipe_alert_delivery_failures_total",
                "Alert notification attempts that failed.",
                &self.failures,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                n.load(Relaxed)
            );
        }
    }
}

/// Everything the loop reads and writes through.
pub struct AlertContext {
    pub setup: Arc<AlertsSetup>,
    pub store: Arc<dyn RollupStore>,
    pub query: Arc<dyn RollupQuery>,
    pub aggregate: Arc<AggregateConfig>,
    pub metrics: Arc<AlertMetrics>,
    /// Now, ms since the epoch: stamps `fired_at` and `delivered_at`.
    pub clock: Arc<dyn Fn() -> i64 + Send + Sync>,
}

/// An alert waiting for delivery.
struct Undelivered {
    alert: AlertState,
    failures: u32,
    due: Instant,
}

/// What wakes the loop.
enum Wake {
    Evaluate,
    RetryDue,
    Stop,
}

/// Evaluates the rules every `evaluate_every` and delivers what fired, until
/// `shutdown` resolves. A pass that fails is logged and tried again at the
/// next tick: every decision is in the store, so nothing is lost by it.
pub async fn run(ctx: AlertContext, shutdown: impl std::future::Future<Output = ()>) {
    let mut tick = tokio::time::interval(ctx.setup.evaluate_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut outbox: BTreeMap<ItemKey, Undelivered> = BTreeMap::new();
    let client = webhook::client();
    tokio::pin!(shutdown);
    loop {
        let due = outbox.values().map(|u| u.due).min();
        let wake = tokio::select! {
            _ = &mut shutdown => Wake::Stop,
            _ = tick.tick() => Wake::Evaluate,
            _ = sleep_until(due), if due.is_some() => Wake::RetryDue,
        };
        match wake {
            Wake::Stop => return,
            Wake::Evaluate => match evaluate_rules(&ctx).await {
                Ok(found) => {
                    if ctx.setup.webhook.is_some() {
                        for (key, alert) in found {
                            outbox.entry(key).or_insert(Undelivered {
                                alert,
                                failures: 0,
                                due: Instant::now(),
                            });
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "Evaluating alert rules failed; will retry."),
            },
            Wake::RetryDue => {}
        }
        if let Some(hook) = &ctx.setup.webhook {
            deliver_due(&ctx, &client, hook, &mut outbox).await;
        }
    }
}

async fn sleep_until(due: Option<Instant>) {
    if let Some(due) = due {
        tokio::time::sleep_until(due).await;
    }
}

/// Sends every alert whose attempt is due; a delivered one leaves the
/// outbox, a failed one waits its backoff.
async fn deliver_due(
    ctx: &AlertContext,
    client: &reqwest::Client,
    hook: &WebhookConfig,
    outbox: &mut BTreeMap<ItemKey, Undelivered>,
) {
    let now = Instant::now();
    let due: Vec<ItemKey> = outbox
        .iter()
        .filter(|(_, u)| u.due <= now)
        .map(|(k, _)| k.clone())
        .collect();
    for key in due {
        let Some(u) = outbox.get_mut(&key) else {
            continue;
        };
        if u.failures > 0 {
            ctx.metrics.retries.fetch_add(1, Relaxed);
        }
        match webhook::post(client, hook, &u.alert).await {
            Ok(()) => {
                ctx.metrics.delivered.fetch_add(1, Relaxed);
                let alert = u.alert.clone();
                outbox.remove(&key);
                if let Err(e) = webhook::mark_delivered(ctx, &alert).await {
                    // Delivered but not marked: a restart sends it again,
                    // with the same id for the receiver to drop.
                    tracing::warn!(error = %e, "Marking an alert delivered failed.");
                }
            }
            Err(e) => {
                ctx.metrics.failures.fetch_add(1, Relaxed);
                u.failures += 1;
                let delay = hook.backoff.delay(u.failures, &mut rand::rng());
                u.due = Instant::now() + delay;
                tracing::warn!(
                    error = %e,
                    rule = %u.alert.rule,
                    attempts = u.failures,
                    "An alert notification failed; will retry."
                );
            }
        }
    }
}
