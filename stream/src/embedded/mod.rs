//! The embedded log: the local, durable, sharded stand-in for Kinesis.
//!
//! A directory holds a meta file, a lock file and one folder per shard. A
//! shard's records live in segment files of checksummed frames, named for
//! their first sequence number; a shard's consumers keep their checkpoints
//! beside them. One thread per shard appends, and group-commits: requests
//! that queue while a sync is in flight share the next one.
//!
//! ```text
//! <dir>/meta                                  format version, shard count
//! <dir>/LOCK                                  held while the log is open
//! <dir>/shard-0000/00000000000000000001.seg   frames, see frame.rs
//! <dir>/shard-0000/checkpoints/<consumer>     last processed sequence number;
//!                                             its presence registers the consumer
//! <dir>/shard-0000/reserved                   numbers handed out lie below it
//! ```
//!
//! Layout:
//! - `config`: [`EmbeddedConfig`], what opening reports, the log's errors.
//! - `frame`: one record's bytes (pure).
//! - `segment`: segment names, listing, scanning frames.
//! - `shard`: the state a shard's writer, readers and retention share, and
//!   its tail cache.
//! - `writer`: the per-shard append thread.
//! - `produce`: `put`, which hands each shard's writer its part of a batch.
//! - `reader`: [`EmbeddedReader`].
//! - `fill`: a reader's read-ahead from the segment files when it is behind.
//! - `recovery`: opening a shard, cutting a torn tail.
//! - `retention`: deleting segments every consumer has passed, and what a
//!   disk budget forces out unread.
//! - `reserve`: the durable bound on numbers handed out, so that numbering
//!   never restarts below a checkpoint after a crash without sync.
//! - `storage`: the two small traits the writer writes segments through,
//!   so that tests can stand a disk that loses unsynced writes under it.
//! - `meta`, `files`: the meta file, atomic file replacement.
//!
//! **Architecture Invariant:** readers see a record only once it is durable
//! (with `sync` on), so nothing a consumer acts on can vanish in a crash.
//!
//! **Architecture Invariant:** retention never deletes a record a registered
//! consumer has not read, except to keep the disk budget, and then it reports
//! each range it deleted.
//!
//! **Architecture Invariant:** a sequence number is never handed out twice
//! in a shard, whatever crashes: with `sync` off, one a crash lost is
//! skipped, never reused.

mod config;
mod files;
mod fill;
mod frame;
mod meta;
#[cfg(test)]
mod power_loss;
mod produce;
mod reader;
mod recovery;
mod reserve;
mod retention;
mod segment;
mod shard;
mod storage;
mod writer;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use tokio::sync::mpsc;

pub use config::{EmbeddedConfig, LogError, OpenError, ShardRecovery};
pub use reader::EmbeddedReader;
pub use retention::{DroppedRange, RetentionReport};

use crate::ReadError;
use crate::partition;
use config::check_config;
use meta::Meta;
use shard::Shard;
use storage::{Disk, Storage};
use writer::{AppendRequest, Writer};

/// A shard writer's thread, named by its shard for error reports.
type WriterThread = (String, JoinHandle<Result<(), String>>);

/// Requests that may queue for one shard's writer before `put` waits.
const QUEUE_DEPTH: usize = 1024;

/// The local durable, sharded log. See the module docs.
///
/// `put` may be called from many tasks at once; each shard's writer thread
/// coalesces the calls waiting on it into one write and one sync. A `put`
/// future dropped after it started may still store its records (the caller
/// never learns where), as a Kinesis call cut off in flight may: retrying
/// yields duplicates, never loss.
pub struct EmbeddedLog {
    dir: PathBuf,
    config: EmbeddedConfig,
    shards: Vec<Arc<Shard>>,
    recovery: Vec<ShardRecovery>,
    /// One queue per shard's writer; `None` once closing began, so later
    /// `put`s fail fast.
    writers: RwLock<Option<Vec<mpsc::Sender<AppendRequest>>>>,
    threads: Mutex<Vec<WriterThread>>,
    /// Held open while the log is, so a second open of the directory fails
    /// instead of interleaving appends.
    lock: Mutex<Option<File>>,
    /// Serialises retention runs, so two never delete the same segment.
    retention: tokio::sync::Mutex<()>,
    /// Unread records the disk budget deleted, per shard (in `shards` order),
    /// since the log was opened, and the last such range.
    dropped: Mutex<Dropped>,
}

/// One shard writer's writes and syncs since the log was opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardIo {
    pub shard: String,
    /// Bytes written to segment files: frames, and the zeros written ahead
    /// of them.
    pub bytes_written: u64,
    /// `fdatasync`s of segment files: one per group commit with sync on,
    /// and one each time a segment closes or the log closes.
    pub syncs: u64,
}

#[derive(Debug, Default)]
struct Dropped {
    records: Vec<u64>,
    last: Option<DroppedRange>,
}

impl std::fmt::Debug for EmbeddedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedLog")
            .field("dir", &self.dir)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl EmbeddedLog {
    /// Opens the log in `dir`, creating it if needed, and recovers each
    /// shard: a torn or corrupt tail is cut away and numbering resumes after
    /// the last good record. Blocking: it reads each shard's last segment.
    pub fn open(dir: &Path, config: EmbeddedConfig) -> Result<Arc<EmbeddedLog>, OpenError> {
        Self::open_on(dir, config, Disk)
    }

    /// [`EmbeddedLog::open`], with the writers writing segments through
    /// `storage`.
    pub(crate) fn open_on<S: Storage>(
        dir: &Path,
        config: EmbeddedConfig,
        storage: S,
    ) -> Result<Arc<EmbeddedLog>, OpenError> {
        check_config(&config)?;
        std::fs::create_dir_all(dir)
            .map_err(OpenError::io(format!("creating {}", dir.display())))?;
        let lock = take_lock(dir)?;
        let meta_path = dir.join(meta::FILE_NAME);
        let existing = files::read_if_exists(&meta_path)
            .map_err(OpenError::io(format!("reading {}", meta_path.display())))?;
        let fresh = match existing {
            Some(text) => {
                let meta = Meta::parse(&text).map_err(|reason| OpenError::Corrupt {
                    dir: dir.to_owned(),
                    reason: format!("meta file: {reason}"),
                })?;
                if meta.format != meta::FORMAT {
                    return Err(OpenError::UnsupportedFormat {
                        dir: dir.to_owned(),
                        found: meta.format,
                        supported: meta::FORMAT,
                    });
                }
                if meta.shards != config.shards {
                    return Err(OpenError::ShardCountMismatch {
                        dir: dir.to_owned(),
                        on_disk: meta.shards,
                        configured: config.shards,
                    });
                }
                false
            }
            None => true,
        };

        let mut shards = Vec::new();
        let mut starts = Vec::new();
        let mut recovered = Vec::new();
        for index in 0..config.shards {
            let opened = recovery::open_shard(dir, &shard_id(index), &config, fresh)?;
            shards.push(Arc::new(opened.shard));
            starts.push(opened.start);
            recovered.push(opened.report);
        }
        if fresh {
            // Written last: its presence says every shard folder is complete.
            files::write_atomic(
                dir,
                meta::FILE_NAME,
                meta::TEMP_NAME,
                Meta::current(config.shards).render().as_bytes(),
            )
            .map_err(OpenError::io(format!("writing {}", meta_path.display())))?;
            files::sync_dir(dir).map_err(OpenError::io(format!("syncing {}", dir.display())))?;
        }

        let mut senders = Vec::new();
        let mut threads = Vec::new();
        for (shard, start) in shards.iter().zip(starts) {
            let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
            let segment = shard.segment_path(start.base);
            let writer = Writer::new(
                Arc::clone(shard),
                storage.clone(),
                config.sync,
                config.segment_bytes,
                start,
            )
            .map_err(OpenError::io(format!("opening {}", segment.display())))?;
            let handle = std::thread::Builder::new()
                .name(format!("log-{}", shard.id))
                .spawn(move || writer.run(rx))
                .map_err(OpenError::io("starting a shard writer thread"))?;
            senders.push(tx);
            threads.push((shard.id.clone(), handle));
        }
        tracing::info!(
            dir = %dir.display(),
            shards = config.shards,
            fresh,
            "Opened the embedded log."
        );
        Ok(Arc::new(EmbeddedLog {
            dir: dir.to_owned(),
            config,
            shards,
            recovery: recovered,
            writers: RwLock::new(Some(senders)),
            threads: Mutex::new(threads),
            lock: Mutex::new(Some(lock)),
            retention: tokio::sync::Mutex::new(()),
            dropped: Mutex::new(Dropped::default()),
        }))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &EmbeddedConfig {
        &self.config
    }

    /// The shard ids, `shard-0000` upwards.
    pub fn shard_ids(&self) -> Vec<String> {
        self.shards.iter().map(|s| s.id.clone()).collect()
    }

    /// The shard a partition key's records go to.
    pub fn shard_of(&self, partition_key: &str) -> &str {
        let index = partition::shard_for(partition_key, self.config.shards) as usize;
        &self.shards[index].id
    }

    /// What opening found and repaired, per shard.
    pub fn recovery(&self) -> &[ShardRecovery] {
        &self.recovery
    }

    /// A reader of `shard` for `consumer`, starting after the consumer's
    /// checkpoint or, without one, at the oldest retained record. Registers
    /// the consumer: from now on retention keeps what it has not read.
    pub fn reader(&self, shard: &str, consumer: &str) -> Result<EmbeddedReader, ReadError> {
        let shard = self
            .shards
            .iter()
            .find(|s| s.id == shard)
            .ok_or_else(|| ReadError::NoSuchShard(shard.to_owned()))?;
        if self.is_closed() {
            return Err(ReadError::Closed);
        }
        EmbeddedReader::open(Arc::clone(shard), consumer)
    }

    fn is_closed(&self) -> bool {
        self.writers.read().map_or(true, |w| w.is_none())
    }

    /// Deletes every closed segment whose newest record arrived before
    /// `now_ms - retention_ms` and that every registered consumer has read
    /// past; then, over `max_bytes`, the oldest closed segments, read or not.
    /// The segment being written is never deleted. Unread records deleted are
    /// counted ([`EmbeddedLog::records_dropped`]) and returned by range;
    /// readers that had not reached them move on and count them in
    /// [`EmbeddedReader::skipped`].
    pub async fn enforce_retention(&self, now_ms: i64) -> Result<RetentionReport, LogError> {
        let _one_at_a_time = self.retention.lock().await;
        let cutoff = now_ms.saturating_sub(self.config.retention_ms);
        let max_bytes = self.config.max_bytes;
        let shards = self.shards.clone();
        let report =
            tokio::task::spawn_blocking(move || retention::enforce(&shards, cutoff, max_bytes))
                .await
                .map_err(|e| LogError::Task(e.to_string()))??;
        if !report.dropped.is_empty() {
            let mut dropped = self.dropped();
            dropped.records.resize(self.shards.len(), 0);
            for range in &report.dropped {
                if let Some(i) = self.shards.iter().position(|s| s.id == range.shard) {
                    dropped.records[i] += range.records;
                }
                dropped.last = Some(range.clone());
            }
        }
        Ok(report)
    }

    fn dropped(&self) -> std::sync::MutexGuard<'_, Dropped> {
        // Counters only: a panic elsewhere cannot leave them inconsistent.
        self.dropped.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Per shard, unread records the disk budget deleted since the log was
    /// opened.
    pub fn records_dropped(&self) -> Vec<(String, u64)> {
        let dropped = self.dropped();
        self.shards
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.clone(), dropped.records.get(i).copied().unwrap_or(0)))
            .collect()
    }

    /// Per shard, what its writer asked of the disk since the log was
    /// opened.
    pub fn writer_io(&self) -> Vec<ShardIo> {
        use std::sync::atomic::Ordering::Relaxed;
        self.shards
            .iter()
            .map(|s| ShardIo {
                shard: s.id.clone(),
                bytes_written: s.io().bytes.load(Relaxed),
                syncs: s.io().syncs.load(Relaxed),
            })
            .collect()
    }

    /// The last range of unread records the disk budget deleted since the
    /// log was opened.
    pub fn last_dropped(&self) -> Option<DroppedRange> {
        self.dropped().last.clone()
    }

    /// Forgets `consumer` in every shard, so retention no longer keeps
    /// records for it: for a consumer that is gone for good.
    pub fn deregister(&self, consumer: &str) -> Result<(), LogError> {
        for shard in &self.shards {
            let path = shard.dir.join(reader::CHECKPOINT_DIR).join(consumer);
            files::remove_if_exists(&path).map_err(|source| LogError::Io {
                context: format!("removing {}", path.display()),
                source,
            })?;
        }
        Ok(())
    }

    /// Stops accepting records, waits for queued ones to be written and made
    /// durable, wakes waiting readers with [`ReadError::Closed`] and releases
    /// the directory. A later `open` sees every acknowledged record.
    pub async fn close(&self) -> Result<(), LogError> {
        let threads = self.begin_close();
        let results = tokio::task::spawn_blocking(move || join_writers(threads))
            .await
            .map_err(|e| LogError::Task(e.to_string()))?;
        self.finish_close();
        results
    }

    /// Drops the writers' queues (each writer drains its queue and exits)
    /// and hands back their threads.
    fn begin_close(&self) -> Vec<WriterThread> {
        if let Ok(mut writers) = self.writers.write() {
            writers.take();
        }
        match self.threads.lock() {
            Ok(mut threads) => std::mem::take(&mut *threads),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        }
    }

    fn finish_close(&self) {
        for shard in &self.shards {
            shard.close();
        }
        if let Ok(mut lock) = self.lock.lock() {
            lock.take();
        }
    }
}

impl Drop for EmbeddedLog {
    fn drop(&mut self) {
        let threads = self.begin_close();
        if let Err(e) = join_writers(threads) {
            tracing::error!(error = %e, "Closing the embedded log failed.");
        }
        self.finish_close();
    }
}

fn join_writers(threads: Vec<WriterThread>) -> Result<(), LogError> {
    let mut first_error = None;
    for (shard, handle) in threads {
        let result = match handle.join() {
            Ok(result) => result,
            Err(_) => Err("the writer thread panicked".to_owned()),
        };
        if let Err(message) = result {
            tracing::error!(shard = %shard, error = %message, "A shard writer failed to close cleanly.");
            first_error.get_or_insert(LogError::Flush { shard, message });
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// `shard-0000`, `shard-0001`, ...
fn shard_id(index: u32) -> String {
    format!("shard-{index:04}")
}

fn take_lock(dir: &Path) -> Result<File, OpenError> {
    let path = dir.join("LOCK");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(OpenError::io(format!("opening {}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(OpenError::Locked {
            dir: dir.to_owned(),
        }),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(OpenError::io(format!("locking {}", path.display()))(e))
        }
    }
}
