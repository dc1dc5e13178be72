//! The log's configuration, what opening it reports, and its errors.

use std::io;
use std::path::PathBuf;

use crate::SeqNo;

/// How the embedded log stores and keeps records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddedConfig {
    /// Shards in a new log. An existing log must be opened with the count it
    /// was created with: records are placed by key hash, so another count
    /// would reorder devices.
    pub shards: u32,
    /// A segment file closes once it holds this many bytes; retention
    /// deletes whole segments.
    pub segment_bytes: u64,
    /// How long records are kept, by arrival time, once every registered
    /// consumer has read them.
    pub retention_ms: i64,
    /// The most bytes the segments may hold; over it, retention deletes the
    /// oldest segments even unread, and reports what was lost. `None`: no
    /// budget, and unread records are kept however long a consumer stalls.
    pub max_bytes: Option<u64>,
    /// Sync each group of appends to disk before acknowledging it. Off, an
    /// acknowledged record survives a crash of the process but not of the
    /// machine; its sequence number is never reused, so consumers that had
    /// checkpointed past it still read every record appended after the
    /// crash.
    pub sync: bool,
    /// Memory per shard for its newest records, so that consumers keeping up
    /// read without touching the disk.
    pub tail_cache_bytes: usize,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        EmbeddedConfig {
            shards: 4,
            segment_bytes: 64 * 1024 * 1024,
            retention_ms: 24 * 60 * 60 * 1000,
            max_bytes: None,
            sync: true,
            tail_cache_bytes: 8 * 1024 * 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("invalid embedded log config: {0}")]
    InvalidConfig(String),
    #[error(
        "{dir} holds a log of {on_disk} shards, but {configured} were configured; \
         the embedded log cannot reshard, so configure {on_disk} or use a new directory"
    )]
    ShardCountMismatch {
        dir: PathBuf,
        on_disk: u32,
        configured: u32,
    },
    #[error("{dir} holds a log of format {found}; this build reads format {supported}")]
    UnsupportedFormat {
        dir: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("{dir} is not a usable embedded log: {reason}")]
    Corrupt { dir: PathBuf, reason: String },
    #[error("{dir} is already open, in this process or another")]
    Locked { dir: PathBuf },
}

impl OpenError {
    pub(super) fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> OpenError {
        let context = context.into();
        move |source| OpenError::Io { context, source }
    }
}

/// Failures of the log's upkeep: retention and closing.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// A shard's writer could not make its last records durable on close.
    #[error("closing shard {shard}: {message}")]
    Flush { shard: String, message: String },
    #[error("a background task failed: {0}")]
    Task(String),
}

/// What opening found in one shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardRecovery {
    pub shard: String,
    /// The sequence number the next record gets.
    pub next_seq: SeqNo,
    /// Bytes cut from the end of the last segment: a torn or corrupt tail.
    pub truncated_bytes: u64,
    /// Whole frames in the cut tail, judged by their length fields: records
    /// that were written but are lost (zero for a write that was cut short,
    /// which was never acknowledged).
    pub dropped_records: u64,
    /// Sequence numbers passed over because the files ended below the
    /// reserved mark (a crash with `sync` off): an upper bound on the
    /// acknowledged records the crash lost; none of the numbers is reused.
    pub numbers_skipped: u64,
}

pub(super) fn check_config(config: &EmbeddedConfig) -> Result<(), OpenError> {
    if config.shards == 0 {
        return Err(OpenError::InvalidConfig("shards must be at least 1".into()));
    }
    if config.segment_bytes == 0 {
        return Err(OpenError::InvalidConfig(
            "segment_bytes must be at least 1".into(),
        ));
    }
    if config.retention_ms <= 0 {
        return Err(OpenError::InvalidConfig(
            "retention_ms must be positive".into(),
        ));
    }
    Ok(())
}
