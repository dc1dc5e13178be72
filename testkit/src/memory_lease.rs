//! A lease table in memory: the [`LeaseStore`] contract without a stream
//! server, for tests of code that runs only while it holds a lease (the
//! alert loop). Every write is conditional, as on the real tables, and one
//! lock makes each one atomic.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;
use stream::ReadError;
use stream::lease::{Checkpoint, Heartbeat, Lease, LeaseSnapshot, LeaseStore};

/// (consumer, shard or owner).
type Key = (String, String);

#[derive(Debug, Default)]
struct Table {
    leases: BTreeMap<Key, Lease>,
    heartbeats: BTreeMap<Key, u64>,
}

/// Leases and heartbeats of every consumer, in one process's memory: the
/// processes a test plays share it through an `Arc`.
#[derive(Debug, Default)]
pub struct MemoryLeaseStore {
    table: Mutex<Table>,
}

impl MemoryLeaseStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applies `change` to `owner`'s lease on `shard`; false when it is
    /// not `owner`'s.
    fn owned(&self, consumer: &str, shard: &str, owner: &str, change: fn(&mut Lease)) -> bool {
        let mut table = self.lock();
        match table.leases.get_mut(&key(consumer, shard)) {
            Some(lease) if lease.owner.as_deref() == Some(owner) => {
                change(lease);
                lease.counter += 1;
                true
            }
            _ => false,
        }
    }
}

fn key(a: &str, b: &str) -> Key {
    (a.to_string(), b.to_string())
}

#[async_trait]
impl LeaseStore for MemoryLeaseStore {
    async fn get(&self, consumer: &str, shard: &str) -> Result<Option<Checkpoint>, ReadError> {
        let table = self.lock();
        Ok(table
            .leases
            .get(&key(consumer, shard))
            .and_then(|l| l.checkpoint.clone()))
    }

    async fn set(
        &self,
        consumer: &str,
        shard: &str,
        owner: Option<&str>,
        _expected: Option<&Checkpoint>,
        new: &Checkpoint,
    ) -> Result<(), ReadError> {
        let mut table = self.lock();
        let lease = table
            .leases
            .entry(key(consumer, shard))
            .or_insert_with(|| Lease {
                shard: shard.to_string(),
                owner: None,
                counter: 0,
                checkpoint: None,
            });
        if owner.is_some() && lease.owner.as_deref() != owner {
            return Err(ReadError::LeaseLost(shard.to_string()));
        }
        lease.checkpoint = Some(new.clone());
        Ok(())
    }

    async fn snapshot(&self, consumer: &str) -> Result<LeaseSnapshot, ReadError> {
        let table = self.lock();
        Ok(LeaseSnapshot {
            leases: table
                .leases
                .iter()
                .filter(|((c, _), _)| c == consumer)
                .map(|(_, l)| l.clone())
                .collect(),
            heartbeats: table
                .heartbeats
                .iter()
                .filter(|((c, _), _)| c == consumer)
                .map(|((_, owner), counter)| Heartbeat {
                    owner: owner.clone(),
                    counter: *counter,
                })
                .collect(),
        })
    }

    async fn take(
        &self,
        consumer: &str,
        shard: &str,
        owner: &str,
        seen: Option<u64>,
    ) -> Result<bool, ReadError> {
        let mut table = self.lock();
        let lease = table.leases.get_mut(&key(consumer, shard));
        if lease.as_ref().map(|l| l.counter) != seen {
            return Ok(false);
        }
        match lease {
            Some(lease) => {
                lease.owner = Some(owner.to_string());
                lease.counter += 1;
            }
            None => {
                let lease = Lease {
                    shard: shard.to_string(),
                    owner: Some(owner.to_string()),
                    counter: 1,
                    checkpoint: None,
                };
                table.leases.insert(key(consumer, shard), lease);
            }
        }
        Ok(true)
    }

    async fn renew(&self, consumer: &str, shard: &str, owner: &str) -> Result<bool, ReadError> {
        Ok(self.owned(consumer, shard, owner, |_| {}))
    }

    async fn release(&self, consumer: &str, shard: &str, owner: &str) -> Result<bool, ReadError> {
        Ok(self.owned(consumer, shard, owner, |l| l.owner = None))
    }

    async fn heartbeat(&self, consumer: &str, owner: &str) -> Result<(), ReadError> {
        *self
            .lock()
            .heartbeats
            .entry(key(consumer, owner))
            .or_default() += 1;
        Ok(())
    }
}
