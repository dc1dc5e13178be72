//! The `alerts` function: an EventBridge schedule runs it every minute. It
//! evaluates the rules against the DynamoDB table with the same
//! [`evaluate_rules`](crate::alerts::evaluate_rules) as the local loop, and
//! publishes each alert not yet delivered to an SNS topic, marking it
//! delivered as the webhook path does.
//!
//! Each invocation is one pass from scratch: an alert whose publish failed
//! is found undelivered in the table by the next one, so nothing is kept
//! between invocations. The template reserves a concurrency of one, so two
//! invocations never run the rules at once, which is what the lease does
//! for local processes.
//!
//! Configuration, beside [`FunctionConfig`]'s:
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `ALERTS_TOPIC_ARN` | the SNS topic each alert is published to | required |
//! | `ALERT_RULES` | the rules: a JSON array of objects with the fields of `[[alerts.rules]]` | required |
//! | `ALERT_KEEP` | how long a fired alert is kept | `7d` |

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sns::types::MessageAttributeValue;
use rollup::AggregateConfig;
use schemas::state::AlertState;
use serde::Serialize;

use super::Handler;
use super::env::{EnvError, FromEnv, FunctionConfig, duration_ms, required};
use crate::alerts::webhook::{alert_id, body};
use crate::alerts::{
    AlertContext, AlertMetrics, AlertWorker, AlertsSetup, Backoff, Notifier, RuleConfig,
};
use crate::store::{RollupQuery, RollupStore};

/// The SNS message attribute holding the alert's id, the same on every
/// attempt, so that a subscriber can drop a repeat.
pub const ALERT_ID_ATTRIBUTE: &str = "alert_id";

/// The alerts function's configuration.
#[derive(Debug, Clone)]
pub struct AlertsFunctionConfig {
    pub function: FunctionConfig,
    pub topic_arn: String,
    pub setup: AlertsSetup,
}

impl FromEnv for AlertsFunctionConfig {
    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, EnvError> {
        let function = FunctionConfig::from_vars(&var)?;
        let topic_arn = required(&var, "ALERTS_TOPIC_ARN")?;
        let text = required(&var, "ALERT_RULES")?;
        let invalid = |detail: String| EnvError::Invalid {
            name: "ALERT_RULES",
            detail,
        };
        let written: Vec<RuleConfig> =
            serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        let rules = written
            .iter()
            .map(|r| r.rule(&function.aggregate))
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid)?;
        let keep_ms = match var("ALERT_KEEP") {
            Some(text) => duration_ms("ALERT_KEEP", text.trim())?,
            None => 7 * 86_400_000,
        };
        let setup = AlertsSetup {
            rules,
            webhook: None,
            // The schedule's period; the function does not loop.
            evaluate_every: Duration::from_secs(60),
            keep_ms,
        };
        Ok(AlertsFunctionConfig {
            function,
            topic_arn,
            setup,
        })
    }
}

/// An SNS topic as a [`Notifier`]: the alert's JSON (the webhook's body) as
/// the message, its id as an attribute.
#[derive(Debug, Clone)]
pub struct SnsTopic {
    client: aws_sdk_sns::Client,
    arn: String,
}

impl SnsTopic {
    pub fn new(client: aws_sdk_sns::Client, arn: impl Into<String>) -> Self {
        SnsTopic {
            client,
            arn: arn.into(),
        }
    }
}

#[async_trait]
impl Notifier for SnsTopic {
    async fn notify(&self, alert: &AlertState) -> Result<(), String> {
        let id = MessageAttributeValue::builder()
            .data_type("String")
            .string_value(alert_id(alert))
            .build()
            .map_err(|e| e.to_string())?;
        let message = String::from_utf8_lossy(&body(alert)).into_owned();
        self.client
            .publish()
            .topic_arn(&self.arn)
            .message(message)
            .message_attributes(ALERT_ID_ATTRIBUTE, id)
            .send()
            .await
            .map_err(|e| format!("publishing to {}: {}", self.arn, aws::client::describe(&e)))?;
        Ok(())
    }
}

/// What one invocation did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AlertsReport {
    pub fired: u64,
    pub delivered: u64,
    pub failed: u64,
    /// Why the pass stopped early, if it did; the next one starts over.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One pass of the rules per scheduled event.
pub struct AlertsHandler {
    setup: Arc<AlertsSetup>,
    store: Arc<dyn RollupStore>,
    query: Arc<dyn RollupQuery>,
    aggregate: Arc<AggregateConfig>,
    notifier: Arc<dyn Notifier>,
    clock: Arc<dyn Fn() -> i64 + Send + Sync>,
}

impl AlertsHandler {
    /// `store` both writes and reads the table; `clock` stamps the alerts.
    pub fn new<S: RollupStore + RollupQuery>(
        store: Arc<S>,
        config: AlertsFunctionConfig,
        notifier: Arc<dyn Notifier>,
        clock: Arc<dyn Fn() -> i64 + Send + Sync>,
    ) -> Self {
        AlertsHandler {
            setup: Arc::new(config.setup),
            store: store.clone(),
            query: store,
            aggregate: Arc::new(config.function.aggregate),
            notifier,
            clock,
        }
    }

    /// Evaluates every rule once and publishes every undelivered alert once.
    pub async fn pass(&self) -> AlertsReport {
        let metrics = Arc::new(AlertMetrics::default());
        let ctx = AlertContext {
            setup: self.setup.clone(),
            store: self.store.clone(),
            query: self.query.clone(),
            aggregate: self.aggregate.clone(),
            metrics: metrics.clone(),
            clock: self.clock.clone(),
        };
        // One attempt per invocation: the next schedule is the retry.
        let once = Backoff::new(Duration::from_secs(60), Duration::from_secs(60));
        let mut worker = AlertWorker::new(ctx).with_notifier(self.notifier.clone(), once);
        let error = worker.evaluate().await.err().map(|e| e.to_string());
        worker.deliver_due().await;
        AlertsReport {
            fired: metrics.fired.load(Relaxed),
            delivered: metrics.delivered.load(Relaxed),
            failed: metrics.failures.load(Relaxed),
            error,
        }
    }
}

impl Handler for AlertsHandler {
    /// The scheduled event; what it says is not needed.
    type Event = serde_json::Value;
    type Response = AlertsReport;

    async fn handle(&self, _event: serde_json::Value) -> AlertsReport {
        let report = self.pass().await;
        if let Some(e) = &report.error {
            tracing::error!(error = %e, "Evaluating alert rules failed; the next schedule retries.");
        }
        report
    }
}
