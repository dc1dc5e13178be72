//! Alerts another process fired, for this process's live tap. When
//! `iotpipe ingest` runs apart from `iotpipe process`, the process that
//! evaluates the rules has no endpoint to publish on; so every ingest
//! process reads the alert items from the shared store, every
//! `evaluate_every`, and hands each alert fired since it started to its own
//! tap, once. A subscriber on any ingest process (there may be several
//! behind one address) then sees every alert, and nothing is published into
//! the stream or through a client connection.
//!
//! Reads cover the windows that can still fire: those that started within
//! the allowed lateness, the longest rule's `for` chain and an hour of
//! processing lag before now. An alert of an older window (a pipeline
//! further behind than that) is listed and delivered, but not on the tap,
//! which is best effort like every QoS 0 message.

use std::collections::BTreeSet;
use std::sync::Arc;

use rollup::AggregateConfig;
use rollup::keys::{self, time_sk};
use schemas::state::{AlertState, ItemState};

use super::{AlertFeed, AlertsSetup};
use crate::store::{Range, RollupQuery, StoreError};

/// How far behind its window an alert may fire and still reach the tap,
/// beyond the lateness and the rule's own windows: processing lag.
const LAG_MS: i64 = 3_600_000;

/// The alerts one relay read per rule and poll, at most.
const READ_LIMIT: usize = 10_000;

/// Which alerts this process has handed to its tap.
pub struct AlertRelay {
    query: Arc<dyn RollupQuery>,
    rules: Vec<String>,
    /// Alerts fired before this (the process's start) went to the taps of
    /// the processes running then.
    since_ms: i64,
    lookback_ms: i64,
    /// (rule, window start, revision) of the alerts handed on and still
    /// within the lookback.
    sent: BTreeSet<(String, i64, u64)>,
}

impl AlertRelay {
    pub fn new(
        query: Arc<dyn RollupQuery>,
        setup: &AlertsSetup,
        aggregate: &AggregateConfig,
        started_ms: i64,
    ) -> Self {
        let chain = setup
            .rules
            .iter()
            .map(|r| r.res.ms().saturating_mul(i64::from(r.for_windows) + 1))
            .max()
            .unwrap_or(0);
        AlertRelay {
            query,
            rules: setup.rules.iter().map(|r| r.name.clone()).collect(),
            since_ms: started_ms,
            lookback_ms: aggregate.allowed_lateness_ms + chain + LAG_MS,
            sent: BTreeSet::new(),
        }
    }

    /// The alerts fired since the relay started that it has not returned
    /// before, read at `now_ms`, oldest window first.
    pub async fn poll(&mut self, now_ms: i64) -> Result<Vec<AlertState>, StoreError> {
        let from = now_ms.saturating_sub(self.lookback_ms);
        self.sent.retain(|(_, start, _)| *start >= from);
        let mut new = Vec::new();
        for rule in &self.rules {
            let rows = self
                .query
                .range(Range {
                    pk: keys::alert_pk(rule),
                    from: time_sk(from),
                    // Above every sort key of the partition: digits and `|`.
                    to: "~".to_string(),
                    limit: READ_LIMIT,
                    descending: false,
                })
                .await?;
            for (_, item) in rows {
                let ItemState::Alert(a) = item.state else {
                    continue;
                };
                let id = (a.rule.clone(), a.window_start, a.revision);
                if a.fired_at >= self.since_ms && self.sent.insert(id) {
                    new.push(a);
                }
            }
        }
        Ok(new)
    }
}

/// Polls `relay` every `every` and hands what it returns to `feed`, until
/// `shutdown` resolves. A failed read is logged and tried at the next tick.
pub async fn relay(
    mut relay: AlertRelay,
    every: std::time::Duration,
    clock: Arc<dyn Fn() -> i64 + Send + Sync>,
    feed: AlertFeed,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tick.tick() => {}
        }
        match relay.poll(clock()).await {
            Ok(alerts) => alerts.iter().for_each(|a| feed(a)),
            Err(e) => {
                tracing::warn!(error = %e, "Reading alerts for the live tap failed; will retry.")
            }
        }
    }
}
