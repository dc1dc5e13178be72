//! Delivery: the [`Notifier`] an alert is sent through, and the outbox of
//! alerts not yet delivered, each retried on its own backoff and marked
//! delivered in the store once its receiver took it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use async_trait::async_trait;
use aws::backoff::Backoff;
use rollup::keys::ItemKey;
use rollup::{Commit, Condition, Write};
use schemas::state::{AlertState, Item, ItemState};
use tokio::time::Instant;

use super::AlertContext;
use super::evaluate::AlertError;

/// Where notifications go: a webhook, or a topic of a notification service.
#[async_trait]
pub trait Notifier: Send + Sync {
    /// Sends one alert; `Ok` once the receiver has it, so that it is marked
    /// delivered and never sent again. Called again for the same alert after
    /// an error, and after a crash between this and the mark.
    async fn notify(&self, alert: &AlertState) -> Result<(), String>;
}

/// An alert waiting for delivery.
struct Undelivered {
    alert: AlertState,
    failures: u32,
    due: Instant,
}

/// The alerts this process is to deliver, by key.
pub(super) struct Outbox {
    notifier: Arc<dyn Notifier>,
    backoff: Backoff,
    waiting: BTreeMap<ItemKey, Undelivered>,
}

impl Outbox {
    pub(super) fn new(notifier: Arc<dyn Notifier>, backoff: Backoff) -> Self {
        Outbox {
            notifier,
            backoff,
            waiting: BTreeMap::new(),
        }
    }

    /// Queues `alerts` for delivery now, unless queued already (then they
    /// keep their backoff).
    pub(super) fn add(&mut self, alerts: Vec<(ItemKey, AlertState)>) {
        for (key, alert) in alerts {
            self.waiting.entry(key).or_insert(Undelivered {
                alert,
                failures: 0,
                due: Instant::now(),
            });
        }
    }

    /// Forgets every queued alert: another process delivers them now.
    pub(super) fn clear(&mut self) {
        self.waiting.clear();
    }

    /// When the next attempt is due.
    pub(super) fn next_due(&self) -> Option<Instant> {
        self.waiting.values().map(|u| u.due).min()
    }

    /// Sends every alert whose attempt is due; a delivered one leaves the
    /// outbox and is marked in the store, a failed one waits its backoff.
    pub(super) async fn deliver_due(&mut self, ctx: &AlertContext) {
        let now = Instant::now();
        let due: Vec<ItemKey> = self
            .waiting
            .iter()
            .filter(|(_, u)| u.due <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            let Some(u) = self.waiting.get_mut(&key) else {
                continue;
            };
            if u.failures > 0 {
                ctx.metrics.retries.fetch_add(1, Relaxed);
            }
            match self.notifier.notify(&u.alert).await {
                Ok(()) => {
                    ctx.metrics.delivered.fetch_add(1, Relaxed);
                    let alert = u.alert.clone();
                    self.waiting.remove(&key);
                    if let Err(e) = mark_delivered(ctx, &alert).await {
                        // Delivered but not marked: a restart sends it again,
                        // with the same id for the receiver to drop.
                        tracing::warn!(error = %e, "Marking an alert delivered failed.");
                    }
                }
                Err(e) => {
                    ctx.metrics.failures.fetch_add(1, Relaxed);
                    u.failures += 1;
                    let delay = self.backoff.delay(u.failures, &mut rand::rng());
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
}

/// Writes the alert's delivery mark, once: a restart then leaves it alone.
async fn mark_delivered(ctx: &AlertContext, alert: &AlertState) -> Result<(), AlertError> {
    let key = ItemKey::AlertDelivered {
        rule: alert.rule.clone(),
        start: alert.window_start,
        revision: alert.revision,
    };
    // Looked up first so that a cache in front of the store knows the item.
    ctx.store.load(std::slice::from_ref(&key)).await?;
    ctx.store
        .commit(Commit {
            writes: vec![Write {
                key,
                condition: Condition::InsertOnce,
                item: Item {
                    applied: Default::default(),
                    state: ItemState::AlertDelivered((ctx.clock)()),
                },
                expires_at: Some(alert.fired_at.saturating_add(ctx.setup.keep_ms)),
            }],
            then: Vec::new(),
        })
        .await?;
    Ok(())
}
