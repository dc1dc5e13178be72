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
//! - `deliver`: the [`Notifier`] seam (the webhook is one) and the outbox of
//!   alerts waiting for delivery, each retried on its own backoff.
//! - `lease`: [`AlertLease`], the one lease (`alerts`) whose holder alone
//!   evaluates and delivers, among processes sharing a lease table.
//! - `run`: [`AlertWorker`], one process's evaluation and delivery as steps
//!   a test drives with the time as an argument, and [`run`], the loop that
//!   wakes for an evaluation tick, a lease renewal or a retry that is due.
//! - `rules`: [`RuleConfig`], a rule as the config file and the AWS
//!   function's environment write it.
//! - `relay`: [`AlertRelay`], the alerts another process fired, read from
//!   the store for this process's live tap (`iotpipe ingest` apart from
//!   `iotpipe process`).
//!
//! Evaluation is driven by the store, not by the write path: fleet windows
//! are written per batch and shard and merged on read, and a window is
//! judged only once the processed watermark has passed its end. The key
//! makes a firing exactly once per (rule, window, revision) whatever the
//! ticks and restarts; a notification is delivered at least once, and its
//! `X-Iotpipe-Alert-Id` lets a receiver drop a repeat (a crash between the
//! 2xx and the delivered mark sends it again). With several processes on
//! one store, only the holder of the `alerts` lease evaluates and delivers,
//! so a notification is not sent once per process; when it dies, another
//! takes the lease after its expiry and delivers what it left undelivered.

mod deliver;
mod evaluate;
mod lease;
mod relay;
mod rules;
mod run;
pub mod webhook;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use rollup::AggregateConfig;
use rollup::alerts::AlertRule;
use schemas::state::AlertState;

pub use aws::backoff::Backoff;
pub use deliver::Notifier;
pub use evaluate::{AlertError, Pass, evaluate_rules};
pub use lease::{ALERTS_LEASE, AlertLease};
pub use relay::{AlertRelay, relay};
pub use rules::RuleConfig;
pub use run::{AlertWorker, run};
pub use webhook::{Webhook, WebhookConfig};

/// Where each alert also goes once, as it fires, best effort and without a
/// delivery mark: the MQTT endpoint's live tap, when it runs in this
/// process.
pub type AlertFeed = Arc<dyn Fn(&AlertState) + Send + Sync>;

/// The MQTT topic an alert of `rule` is published on, on the live tap.
pub fn tap_topic(rule: &str) -> String {
    format!("{TAP_TOPIC_PREFIX}{rule}")
}

/// Every alert topic starts with it; `iotpipe/alerts/#` watches them all.
pub const TAP_TOPIC_PREFIX: &str = "iotpipe/alerts/";

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
