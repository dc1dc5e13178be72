//! The lease table on JetStream: the stream's checkpoint bucket (a KV
//! bucket) holds each consumer's checkpoint and lease per partition in one
//! entry, and a heartbeat per process.
//!
//! | key                               | value                          |
//! |-----------------------------------|--------------------------------|
//! | `{consumer}.{shard}`              | `{checkpoint}` or `{checkpoint}\n{owner}` |
//! | `{consumer}.worker.{owner}`       | `{owner}`                      |
//!
//! `checkpoint` is the decimal stream sequence number the consumer is done
//! with (empty: none yet); without an owner line the lease is free, which is
//! also how an unleased reader's checkpoint reads (and how every checkpoint
//! read before leases existed). The worker key's owner part is made
//! key-safe; the value keeps the name.
//!
//! The lease counter is the entry's revision: every write to a key moves it,
//! and the bucket compares and swaps on it (`create` for an absent key,
//! `update(key, value, revision)` otherwise), as DynamoDB's conditions do
//! on `lease_counter`. Expiry is the planner's, as on DynamoDB: a revision
//! that stood still for a lease duration on the observer's own clock. A
//! checkpoint write by the owner moves it too, which only says again that
//! the owner lives.
//!
//! Reads may be served by any replica and lag a write: a read-modify-write
//! that raced, or read a stale revision, fails its compare and reads again.

use async_nats::jetstream::kv;
use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;

use crate::ReadError;
use crate::lease::{Checkpoint, Heartbeat, Lease, LeaseSnapshot, LeaseStore};

/// Heartbeat keys are `{consumer}.worker.{owner}`; shard ids never are
/// `worker`.
const WORKER: &str = "worker";
/// Attempts of one read-modify-write against other writers before it is
/// reported as an error.
const MAX_RACES: u32 = 20;

/// The lease table of one stream, in its checkpoint bucket.
#[derive(Clone)]
pub struct NatsLeaseTable {
    kv: kv::Store,
}

impl std::fmt::Debug for NatsLeaseTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsLeaseTable").finish_non_exhaustive()
    }
}

/// A shard entry's value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ShardEntry {
    checkpoint: Option<u64>,
    owner: Option<String>,
}

impl ShardEntry {
    fn encode(&self) -> Bytes {
        let checkpoint = self.checkpoint.map(|c| c.to_string()).unwrap_or_default();
        match &self.owner {
            Some(owner) => format!("{checkpoint}\n{owner}").into(),
            None => checkpoint.into(),
        }
    }

    fn decode(value: &[u8]) -> Option<ShardEntry> {
        let text = std::str::from_utf8(value).ok()?;
        let (checkpoint, owner) = match text.split_once('\n') {
            Some((c, owner)) if !owner.is_empty() => (c, Some(owner.to_string())),
            Some((c, _)) => (c, None),
            None => (text, None),
        };
        let checkpoint = match checkpoint {
            "" => None,
            c => Some(c.parse().ok()?),
        };
        Some(ShardEntry { checkpoint, owner })
    }
}

fn shard_key(consumer: &str, shard: &str) -> String {
    format!("{consumer}.{shard}")
}

/// The heartbeat key of `owner`, whose name may hold characters a key may
/// not.
fn worker_key(consumer: &str, owner: &str) -> String {
    let safe: String = owner
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{consumer}.{WORKER}.{safe}")
}

fn parse_checkpoint(checkpoint: &Checkpoint) -> Result<u64, ReadError> {
    match checkpoint {
        Checkpoint::At(seq) => seq.parse().map_err(|_| {
            ReadError::InvalidArgument(format!("{seq} is not a JetStream sequence number"))
        }),
        Checkpoint::ShardEnd => Err(ReadError::InvalidArgument(
            "a JetStream partition never ends".to_string(),
        )),
    }
}

impl NatsLeaseTable {
    pub(super) fn new(kv: kv::Store) -> Self {
        NatsLeaseTable { kv }
    }

    /// A key's latest entry, `None` when it has none (or was deleted).
    async fn entry(&self, key: &str) -> Result<Option<kv::Entry>, ReadError> {
        let entry = self
            .kv
            .entry(key)
            .await
            .map_err(|e| ReadError::Io(format!("reading {key}: {e}")))?;
        Ok(entry.filter(|e| e.operation == kv::Operation::Put))
    }

    /// A shard entry and its revision.
    async fn shard_entry(&self, key: &str) -> Result<Option<(ShardEntry, u64)>, ReadError> {
        let Some(entry) = self.entry(key).await? else {
            return Ok(None);
        };
        let value = ShardEntry::decode(&entry.value).ok_or_else(|| {
            ReadError::Io(format!(
                "{key} holds {:?}, not a checkpoint and lease",
                entry.value
            ))
        })?;
        Ok(Some((value, entry.revision)))
    }

    /// Writes `value` if the key is still at `revision` (`None`: absent).
    /// `Ok(false)`: another write came first.
    async fn write(
        &self,
        key: &str,
        revision: Option<u64>,
        value: &ShardEntry,
    ) -> Result<bool, ReadError> {
        let result = match revision {
            None => self
                .kv
                .create(key, value.encode())
                .await
                .map(|_| ())
                .map_err(|e| match e.kind() {
                    kv::CreateErrorKind::AlreadyExists => None,
                    _ => Some(e.to_string()),
                }),
            Some(revision) => self
                .kv
                .update(key, value.encode(), revision)
                .await
                .map(|_| ())
                .map_err(|e| match e.kind() {
                    kv::UpdateErrorKind::WrongLastRevision => None,
                    _ => Some(e.to_string()),
                }),
        };
        match result {
            Ok(()) => Ok(true),
            Err(None) => Ok(false),
            Err(Some(e)) => Err(ReadError::Io(format!("writing {key}: {e}"))),
        }
    }

    /// Reads the shard entry, lets `change` decide the new value (`None`:
    /// leave it, and answer `Ok(false)`), and writes it if nothing else was
    /// written meanwhile, else starts again.
    async fn modify(
        &self,
        key: &str,
        change: impl Fn(Option<ShardEntry>) -> Option<ShardEntry>,
    ) -> Result<bool, ReadError> {
        for _ in 0..MAX_RACES {
            let current = self.shard_entry(key).await?;
            let revision = current.as_ref().map(|(_, r)| *r);
            let Some(new) = change(current.map(|(v, _)| v)) else {
                return Ok(false);
            };
            if self.write(key, revision, &new).await? {
                return Ok(true);
            }
        }
        Err(ReadError::Io(format!(
            "{key} kept changing under {MAX_RACES} writes in a row"
        )))
    }

    /// Applies `change` to `owner`'s lease on the shard only while `owner`
    /// holds it.
    async fn modify_owned(
        &self,
        consumer: &str,
        shard: &str,
        owner: &str,
        change: impl Fn(ShardEntry) -> ShardEntry,
    ) -> Result<bool, ReadError> {
        self.modify(&shard_key(consumer, shard), |current| {
            current
                .filter(|v| v.owner.as_deref() == Some(owner))
                .map(&change)
        })
        .await
    }
}

#[async_trait]
impl LeaseStore for NatsLeaseTable {
    async fn get(&self, consumer: &str, shard: &str) -> Result<Option<Checkpoint>, ReadError> {
        let entry = self.shard_entry(&shard_key(consumer, shard)).await?;
        Ok(entry
            .and_then(|(v, _)| v.checkpoint)
            .map(|c| Checkpoint::At(c.to_string())))
    }

    async fn set(
        &self,
        consumer: &str,
        shard: &str,
        owner: Option<&str>,
        _expected: Option<&Checkpoint>,
        new: &Checkpoint,
    ) -> Result<(), ReadError> {
        let checkpoint = Some(parse_checkpoint(new)?);
        let written = match owner {
            Some(owner) => {
                self.modify_owned(consumer, shard, owner, |v| ShardEntry { checkpoint, ..v })
                    .await?
            }
            None => {
                self.modify(&shard_key(consumer, shard), |current| {
                    Some(ShardEntry {
                        checkpoint,
                        ..current.unwrap_or_default()
                    })
                })
                .await?
            }
        };
        if written {
            Ok(())
        } else {
            Err(ReadError::LeaseLost(shard.to_string()))
        }
    }

    async fn snapshot(&self, consumer: &str) -> Result<LeaseSnapshot, ReadError> {
        let keys: Vec<String> = self
            .kv
            .keys()
            .await
            .map_err(|e| ReadError::Io(format!("listing leases: {e}")))?
            .try_collect()
            .await
            .map_err(|e| ReadError::Io(format!("listing leases: {e}")))?;
        let prefix = format!("{consumer}.");
        let mut out = LeaseSnapshot::default();
        for key in keys {
            let Some(rest) = key.strip_prefix(&prefix) else {
                continue;
            };
            if rest.starts_with(&format!("{WORKER}.")) {
                if let Some(entry) = self.entry(&key).await? {
                    out.heartbeats.push(Heartbeat {
                        owner: String::from_utf8_lossy(&entry.value).into_owned(),
                        counter: entry.revision,
                    });
                }
            } else if let Some((value, revision)) = self.shard_entry(&key).await? {
                out.leases.push(Lease {
                    shard: rest.to_string(),
                    owner: value.owner,
                    counter: revision,
                    checkpoint: value.checkpoint.map(|c| Checkpoint::At(c.to_string())),
                });
            }
        }
        out.leases.sort_by(|a, b| a.shard.cmp(&b.shard));
        Ok(out)
    }

    async fn take(
        &self,
        consumer: &str,
        shard: &str,
        owner: &str,
        seen: Option<u64>,
    ) -> Result<bool, ReadError> {
        let key = shard_key(consumer, shard);
        let checkpoint = match seen {
            None => None,
            Some(seen) => match self.shard_entry(&key).await? {
                Some((value, revision)) if revision == seen => value.checkpoint,
                // Taken, renewed or released since the snapshot.
                _ => return Ok(false),
            },
        };
        let value = ShardEntry {
            checkpoint,
            owner: Some(owner.to_string()),
        };
        self.write(&key, seen, &value).await
    }

    async fn renew(&self, consumer: &str, shard: &str, owner: &str) -> Result<bool, ReadError> {
        // Writing the same value moves the revision, which is the counter.
        self.modify_owned(consumer, shard, owner, |v| v).await
    }

    async fn release(&self, consumer: &str, shard: &str, owner: &str) -> Result<bool, ReadError> {
        self.modify_owned(consumer, shard, owner, |v| ShardEntry { owner: None, ..v })
            .await
    }

    async fn heartbeat(&self, consumer: &str, owner: &str) -> Result<(), ReadError> {
        let key = worker_key(consumer, owner);
        self.kv
            .put(&key, owner.to_string().into())
            .await
            .map(|_| ())
            .map_err(|e| ReadError::Io(format!("writing a heartbeat: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_read_back_and_a_bare_checkpoint_is_a_free_lease() {
        for value in [
            ShardEntry::default(),
            ShardEntry {
                checkpoint: Some(42),
                owner: None,
            },
            ShardEntry {
                checkpoint: None,
                owner: Some("host-1-2".into()),
            },
            ShardEntry {
                checkpoint: Some(7),
                owner: Some("host-1-2".into()),
            },
        ] {
            assert_eq!(ShardEntry::decode(&value.encode()), Some(value));
        }
        assert_eq!(
            ShardEntry::decode(b"42"),
            Some(ShardEntry {
                checkpoint: Some(42),
                owner: None
            })
        );
        assert_eq!(ShardEntry::decode(b"x"), None);
        assert_eq!(ShardEntry::decode(b"x\nowner"), None);
    }

    #[test]
    fn keys_are_key_safe_and_apart() {
        assert_eq!(
            shard_key("processors", "shard-0001"),
            "processors.shard-0001"
        );
        assert_eq!(
            worker_key("processors", "host.example-1-2"),
            "processors.worker.host_example-1-2"
        );
    }
}
