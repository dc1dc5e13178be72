//! Sharing a stream's shards between processes by leases, on any backend
//! that keeps a lease table: DynamoDB beside Kinesis
//! ([`crate::kinesis::LeaseTable`]), a KV bucket beside a JetStream stream
//! ([`crate::nats::NatsLeaseTable`]).
//!
//! - [`LeaseStore`]: the table's operations, per (consumer, shard) an
//!   owner, a lease counter and the consumer's checkpoint, and per (consumer,
//!   process) a heartbeat;
//! - [`LeasedStream`]: a stream whose shards are shared that way: its shard
//!   ids, its lease table, and readers whose checkpoints hold only while
//!   their process holds the shard's lease;
//! - `plan`: which leases a process takes, renews and gives up (pure, time
//!   as an argument); `keeper`: the async shell that applies the plan.
//!
//! **Architecture Invariant:** with leases, a shard is read by one process
//! at a time: a process takes only free or expired leases, and a reader that
//! lost its lease cannot checkpoint. The checkpoint lives beside the lease,
//! per consumer rather than per process, so a shard's next owner resumes
//! where the last commit left off.

mod keeper;
mod plan;

use std::sync::Arc;

use async_trait::async_trait;

pub use self::keeper::{LeaseChanges, LeaseConfig, LeaseKeeper};
pub use self::plan::{LeasePlan, LeasePlanner};
use crate::{ReadError, ShardReader};

/// Where a consumer stands in a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checkpoint {
    /// Done with every record up to this sequence number (decimal).
    At(String),
    /// Done with the whole shard, which is closed (Kinesis resharding).
    ShardEnd,
}

/// One shard's lease as the table holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub shard: String,
    /// The process holding it; `None`: free.
    pub owner: Option<String>,
    /// Moved by every take and renewal: a counter that stops moving means a
    /// dead owner.
    pub counter: u64,
    pub checkpoint: Option<Checkpoint>,
}

/// A process's heartbeat: its counter moves while the process lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    pub owner: String,
    pub counter: u64,
}

/// Everything the table holds for one consumer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseSnapshot {
    pub leases: Vec<Lease>,
    pub heartbeats: Vec<Heartbeat>,
}

/// A lease table's operations. Every write is conditional, so two processes
/// that act on the same snapshot cannot both succeed.
#[async_trait]
pub trait LeaseStore: std::fmt::Debug + Send + Sync + 'static {
    /// The consumer's checkpoint in `shard`, read consistently.
    async fn get(&self, consumer: &str, shard: &str) -> Result<Option<Checkpoint>, ReadError>;

    /// Moves the checkpoint to `new`; with `owner`, only while that process
    /// holds the shard's lease, else [`ReadError::LeaseLost`]. `expected` is
    /// the checkpoint this reader last saw (`None`: none yet), which a
    /// backend may also require (DynamoDB does; on JetStream a write that
    /// timed out may have landed, so only the lease is required there).
    async fn set(
        &self,
        consumer: &str,
        shard: &str,
        owner: Option<&str>,
        expected: Option<&Checkpoint>,
        new: &Checkpoint,
    ) -> Result<(), ReadError>;

    /// Every lease and heartbeat of `consumer`.
    async fn snapshot(&self, consumer: &str) -> Result<LeaseSnapshot, ReadError>;

    /// Takes `shard`'s lease for `owner` if its counter is still `seen`
    /// (`None`: the shard has no lease yet). `Ok(false)`: someone else moved
    /// first.
    async fn take(
        &self,
        consumer: &str,
        shard: &str,
        owner: &str,
        seen: Option<u64>,
    ) -> Result<bool, ReadError>;

    /// Renews `owner`'s lease on `shard`. `Ok(false)`: it is not `owner`'s
    /// any more.
    async fn renew(&self, consumer: &str, shard: &str, owner: &str) -> Result<bool, ReadError>;

    /// Gives `owner`'s lease on `shard` up, so another process takes it at
    /// once rather than after the expiry. `Ok(false)`: it was not `owner`'s.
    async fn release(&self, consumer: &str, shard: &str, owner: &str) -> Result<bool, ReadError>;

    /// Says that `owner` is alive.
    async fn heartbeat(&self, consumer: &str, owner: &str) -> Result<(), ReadError>;
}

/// A stream whose shards processes share by leases.
#[async_trait]
pub trait LeasedStream: Send + Sync + 'static {
    /// The shards there are to share now.
    async fn lease_shards(&self) -> Result<Vec<String>, ReadError>;

    /// The table the leases and checkpoints are kept in.
    fn lease_store(&self) -> Arc<dyn LeaseStore>;

    /// A reader of a shard whose lease `owner` holds: its checkpoints
    /// succeed only while `owner` still holds the lease, and fail with
    /// [`ReadError::LeaseLost`] once another process took it.
    async fn leased_shard_reader(
        &self,
        shard: &str,
        consumer: &str,
        owner: &str,
    ) -> Result<Box<dyn ShardReader>, ReadError>;
}
