//! The thin async shell around [`LeasePlanner`]: one `tick` reads the lease
//! table, plans, and makes the conditional writes the plan asks for.
//!
//! The caller ticks every [`LeaseConfig::renew_interval`] with the time, and
//! starts a reader (see [`super::LeasedStream::leased_shard_reader`]) for
//! each shard gained and stops the one of each shard lost. A reader whose lease
//! moved on fails its next checkpoint with [`ReadError::LeaseLost`], so even
//! a process that ticks too late never checkpoints a shard it lost.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use super::LeaseStore;
use super::plan::LeasePlanner;
use crate::ReadError;

/// How long leases last and how often they are renewed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    /// A lease whose counter stands still this long is taken by others: how
    /// long a dead process's shards wait.
    pub lease_duration: Duration,
    /// How often a process renews its leases and looks for free ones; well
    /// under the duration, so a slow renewal does not lose a lease.
    pub renew_interval: Duration,
}

impl Default for LeaseConfig {
    /// The KCL's failover time, renewed three times within it.
    fn default() -> Self {
        LeaseConfig {
            lease_duration: Duration::from_secs(10),
            renew_interval: Duration::from_millis(3_300),
        }
    }
}

/// What one tick changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseChanges {
    /// Shards this process now holds and had not: start reading them.
    pub gained: Vec<String>,
    /// Shards it held and does not any more: stop reading them.
    pub lost: Vec<String>,
}

/// Holds one process's leases for one consumer.
#[derive(Debug)]
pub struct LeaseKeeper {
    table: Arc<dyn LeaseStore>,
    consumer: String,
    planner: LeasePlanner,
    held: BTreeSet<String>,
}

impl LeaseKeeper {
    pub fn new(
        table: Arc<dyn LeaseStore>,
        consumer: &str,
        owner: &str,
        config: &LeaseConfig,
    ) -> Self {
        let duration_ms = i64::try_from(config.lease_duration.as_millis()).unwrap_or(i64::MAX);
        LeaseKeeper {
            table,
            consumer: consumer.to_string(),
            planner: LeasePlanner::new(owner, duration_ms),
            held: BTreeSet::new(),
        }
    }

    pub fn owner(&self) -> &str {
        self.planner.owner()
    }

    /// The shards this process holds, as of the last tick.
    pub fn held(&self) -> impl Iterator<Item = &str> {
        self.held.iter().map(String::as_str)
    }

    /// Renews, takes and releases leases of `shards` as the plan for
    /// `now_ms` says, and reports what changed.
    pub async fn tick(
        &mut self,
        shards: &[String],
        now_ms: i64,
    ) -> Result<LeaseChanges, ReadError> {
        let owner = self.planner.owner().to_string();
        self.table.heartbeat(&self.consumer, &owner).await?;
        let snapshot = self.table.snapshot(&self.consumer).await?;
        let plan = self.planner.plan(shards, &snapshot, now_ms);
        let mut holding = BTreeSet::new();
        for shard in &plan.release {
            self.table.release(&self.consumer, shard, &owner).await?;
            tracing::info!(shard, owner, "Gave a shard's lease up for another process.");
        }
        for shard in plan.renew {
            if self.table.renew(&self.consumer, &shard, &owner).await? {
                holding.insert(shard);
            }
        }
        for (shard, seen) in plan.take {
            if self
                .table
                .take(&self.consumer, &shard, &owner, seen)
                .await?
            {
                tracing::info!(shard, owner, "Took a shard's lease.");
                holding.insert(shard);
            }
        }
        let changes = LeaseChanges {
            gained: holding.difference(&self.held).cloned().collect(),
            lost: self.held.difference(&holding).cloned().collect(),
        };
        self.held = holding;
        Ok(changes)
    }

    /// Gives one lease up: for a shard this process cannot read now, so that
    /// another process may, or this one retries when it takes it again.
    pub async fn release(&mut self, shard: &str) -> Result<(), ReadError> {
        if self.held.remove(shard) {
            let owner = self.planner.owner().to_string();
            self.table.release(&self.consumer, shard, &owner).await?;
        }
        Ok(())
    }

    /// Gives every lease up, so that others take the shards at once: on a
    /// clean shutdown, after the shards' last checkpoints.
    pub async fn release_all(&mut self) -> Result<(), ReadError> {
        let owner = self.planner.owner().to_string();
        for shard in std::mem::take(&mut self.held) {
            self.table.release(&self.consumer, &shard, &owner).await?;
        }
        Ok(())
    }
}
