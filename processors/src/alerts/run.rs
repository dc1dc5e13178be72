//! One process's alerting: [`AlertWorker`], whose steps (renew the lease,
//! evaluate, deliver what is due) take the time as an argument so that a
//! test drives several processes through a takeover; and [`run`], the loop
//! that calls them as timers wake it.

use std::sync::Arc;

use tokio::time::Instant;

use super::deliver::{Notifier, Outbox};
use super::evaluate::{AlertError, evaluate_rules};
use super::lease::AlertLease;
use super::webhook::Webhook;
use super::{AlertContext, AlertFeed, Backoff};

/// Evaluation and delivery in one process.
pub struct AlertWorker {
    ctx: AlertContext,
    /// Without one, this process is the only one (the embedded log) and
    /// always runs the rules.
    lease: Option<AlertLease>,
    /// Without a notifier, alerts are only listed (and fed).
    outbox: Option<Outbox>,
    feed: Option<AlertFeed>,
}

impl AlertWorker {
    /// A worker that delivers to the configured webhook, if any, and holds
    /// no lease.
    pub fn new(ctx: AlertContext) -> Self {
        let outbox = ctx.setup.webhook.clone().map(|hook| {
            let backoff = hook.backoff;
            Outbox::new(Arc::new(Webhook::new(hook)), backoff)
        });
        AlertWorker {
            ctx,
            lease: None,
            outbox,
            feed: None,
        }
    }

    /// Runs the rules only while holding `lease`.
    pub fn with_lease(mut self, lease: AlertLease) -> Self {
        self.lease = Some(lease);
        self
    }

    /// Delivers through `notifier` instead of the configured webhook.
    pub fn with_notifier(mut self, notifier: Arc<dyn Notifier>, backoff: Backoff) -> Self {
        self.outbox = Some(Outbox::new(notifier, backoff));
        self
    }

    /// Hands each alert to `feed` as it fires.
    pub fn with_feed(mut self, feed: AlertFeed) -> Self {
        self.feed = Some(feed);
        self
    }

    /// Whether this process runs the rules now.
    pub fn leads(&self) -> bool {
        self.lease.as_ref().is_none_or(AlertLease::holds)
    }

    /// Renews (or takes) the lease at `now_ms`; returns whether this process
    /// runs the rules. One that lost the lease forgets its outbox: the new
    /// holder finds those alerts undelivered in the store.
    pub async fn renew(&mut self, now_ms: i64) -> bool {
        let Some(lease) = &mut self.lease else {
            return true;
        };
        if !lease.renew(now_ms).await
            && let Some(outbox) = &mut self.outbox
        {
            outbox.clear();
        }
        self.leads()
    }

    /// One pass over the rules, if this process runs them: writes what
    /// fired, feeds it, and queues every undelivered alert. Returns how many
    /// alerts fired.
    pub async fn evaluate(&mut self) -> Result<usize, AlertError> {
        if !self.leads() {
            return Ok(0);
        }
        let pass = evaluate_rules(&self.ctx).await?;
        if let Some(feed) = &self.feed {
            for alert in &pass.fired {
                feed(alert);
            }
        }
        if let Some(outbox) = &mut self.outbox {
            outbox.add(pass.undelivered);
        }
        Ok(pass.fired.len())
    }

    /// Sends what is due, if this process runs the rules.
    pub async fn deliver_due(&mut self) {
        if !self.leads() {
            return;
        }
        if let Some(outbox) = &mut self.outbox {
            outbox.deliver_due(&self.ctx).await;
        }
    }

    fn next_due(&self) -> Option<Instant> {
        self.outbox.as_ref().and_then(Outbox::next_due)
    }

    async fn release(&mut self) {
        if let Some(lease) = &mut self.lease {
            lease.release().await;
        }
    }
}

/// What wakes the loop.
enum Wake {
    Evaluate,
    Renew,
    RetryDue,
    Stop,
}

/// Renews the lease, evaluates the rules every `evaluate_every` and delivers
/// what fired, until `shutdown` resolves; then gives the lease up. A pass
/// that fails is logged and tried again at the next tick: every decision is
/// in the store, so nothing is lost by it.
pub async fn run(mut worker: AlertWorker, shutdown: impl std::future::Future<Output = ()>) {
    let mut tick = tokio::time::interval(worker.ctx.setup.evaluate_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let renew_every = worker.lease.as_ref().map(AlertLease::renew_every);
    // Without a lease it never ticks (the branch is off).
    let mut renew = tokio::time::interval(renew_every.unwrap_or(worker.ctx.setup.evaluate_every));
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        let due = worker.next_due();
        let wake = tokio::select! {
            // Renewals first: a pass must not run on a lease that expired.
            biased;
            _ = &mut shutdown => Wake::Stop,
            _ = renew.tick(), if renew_every.is_some() => Wake::Renew,
            _ = tick.tick() => Wake::Evaluate,
            _ = sleep_until(due), if due.is_some() => Wake::RetryDue,
        };
        match wake {
            Wake::Stop => break,
            Wake::Renew => {
                let now = (worker.ctx.clock)();
                worker.renew(now).await;
            }
            Wake::Evaluate => {
                if let Err(e) = worker.evaluate().await {
                    tracing::warn!(error = %e, "Evaluating alert rules failed; will retry.");
                }
            }
            Wake::RetryDue => {}
        }
        worker.deliver_due().await;
    }
    worker.release().await;
}

async fn sleep_until(due: Option<Instant>) {
    if let Some(due) = due {
        tokio::time::sleep_until(due).await;
    }
}
