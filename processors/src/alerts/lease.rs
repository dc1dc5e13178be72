//! The one lease whose holder runs the rules. Every `process` instance on a
//! shared store would otherwise evaluate and deliver alike, and a receiver
//! would get each notification once per instance.
//!
//! It is a lease like a shard's, in the same [`LeaseStore`] (DynamoDB's
//! lease table beside Kinesis, JetStream's checkpoint bucket), under a
//! consumer of its own with one "shard", so the planner that shares shards
//! gives it to exactly one live process and lets another take it once its
//! counter stood still for the lease duration. The embedded log needs none:
//! it belongs to one process.

use std::sync::Arc;
use std::time::Duration;

use stream::lease::{LeaseConfig, LeaseKeeper, LeaseStore};

/// The consumer and the lease's name in the lease table.
pub const ALERTS_LEASE: &str = "alerts";

/// This process's claim on the alerts lease.
#[derive(Debug)]
pub struct AlertLease {
    keeper: LeaseKeeper,
    renew_every: Duration,
    holds: bool,
}

impl AlertLease {
    /// As `owner` (unique per process), with leases of `lease_duration`,
    /// renewed every third of it.
    pub fn new(table: Arc<dyn LeaseStore>, owner: &str, lease_duration: Duration) -> Self {
        let config = LeaseConfig {
            lease_duration,
            renew_interval: lease_duration / 3,
        };
        AlertLease {
            keeper: LeaseKeeper::new(table, ALERTS_LEASE, owner, &config),
            renew_every: config.renew_interval,
            holds: false,
        }
    }

    /// How often [`AlertLease::renew`] is to be called.
    pub fn renew_every(&self) -> Duration {
        self.renew_every
    }

    /// Whether this process held the lease at the last renewal.
    pub fn holds(&self) -> bool {
        self.holds
    }

    /// Renews the lease, or takes it if it is free or expired, at `now_ms`
    /// on this process's clock; returns whether this process holds it. A
    /// failed renewal counts as not holding it: the other processes may take
    /// it after the expiry, and two deliverers are worse than a late one.
    pub async fn renew(&mut self, now_ms: i64) -> bool {
        let name = [ALERTS_LEASE.to_string()];
        let held = self.holds;
        self.holds = match self.keeper.tick(&name, now_ms).await {
            Ok(_) => self.keeper.held().next().is_some(),
            Err(e) => {
                tracing::warn!(error = %e, "Renewing the alerts lease failed; will retry.");
                false
            }
        };
        match (held, self.holds) {
            (false, true) => tracing::info!(
                owner = self.keeper.owner(),
                "Took the alerts lease: this process evaluates the rules."
            ),
            (true, false) => tracing::info!(
                owner = self.keeper.owner(),
                "Lost the alerts lease: another process evaluates the rules."
            ),
            _ => {}
        }
        self.holds
    }

    /// Gives the lease up, so that another process takes it at once: on a
    /// clean shutdown.
    pub async fn release(&mut self) {
        self.holds = false;
        if let Err(e) = self.keeper.release_all().await {
            tracing::warn!(error = %e, "Giving the alerts lease up failed; it will expire.");
        }
    }
}
