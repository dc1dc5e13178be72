//! Reading one shard for one consumer: from the tail cache when the consumer
//! keeps up, from the segment files when it is behind, and waiting on the
//! writer's notification when it has read everything.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::time::Instant;

use super::files;
use super::fill::{FileCursor, fill};
use super::shard::{Committed, Shard};
use crate::{Lag, ReadError, Record, SeqNo, ShardReader};

/// Reads one shard in order for one consumer; see [`crate::ShardReader`].
pub struct EmbeddedReader {
    shard: Arc<Shard>,
    consumer: String,
    committed: watch::Receiver<Committed>,
    /// The sequence number of the next record to return.
    next_seq: u64,
    /// Records read ahead from the segment files, starting at `next_seq`: a
    /// file read fetches more than one batch, and knowing the next record
    /// lets [`ShardReader::lag`] report its age without touching the disk.
    pending: VecDeque<Record>,
    /// The sequence number after everything fetched into `pending` (equal to
    /// `next_seq` when it is empty): where the next file read starts.
    fetched_to: u64,
    /// Where the segment files continue after `pending`, kept so that a
    /// consumer far behind reads each segment once, front to back.
    cursor: Option<FileCursor>,
    /// Records this reader never returned because retention deleted them
    /// first.
    skipped: u64,
    checkpoint_dir: PathBuf,
}

impl std::fmt::Debug for EmbeddedReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedReader")
            .field("shard", &self.shard.id)
            .field("consumer", &self.consumer)
            .field("next_seq", &self.next_seq)
            .field("skipped", &self.skipped)
            .finish_non_exhaustive()
    }
}

impl EmbeddedReader {
    /// Starts after `consumer`'s checkpoint, or at the oldest retained record.
    pub(crate) fn open(shard: Arc<Shard>, consumer: &str) -> Result<Self, ReadError> {
        check_consumer(consumer)?;
        let checkpoint_dir = shard.dir.join(CHECKPOINT_DIR);
        let path = checkpoint_dir.join(consumer);
        let checkpoint = files::read_if_exists(&path)
            .map_err(|e| ReadError::Io(format!("reading {}: {e}", path.display())))?
            .map(|text| {
                text.trim().parse::<u64>().map_err(|_| {
                    ReadError::Io(format!(
                        "{} does not hold a sequence number",
                        path.display()
                    ))
                })
            })
            .transpose()?;
        let committed = shard.subscribe();
        let next_seq = match checkpoint {
            Some(seq) => seq + 1,
            None => {
                // Registers the consumer: a checkpoint just below the oldest
                // record says it has read nothing retained, so retention
                // keeps everything for it from here on.
                let oldest = shard.oldest();
                register(&checkpoint_dir, consumer, oldest.saturating_sub(1))?;
                oldest
            }
        };
        let end = shard.committed().next_seq;
        if next_seq > end {
            // Only a log restored from a backup older than the checkpoint gets
            // here (after a crash with sync off, numbering resumes above the
            // reserved mark, hence above every checkpoint); the consumer
            // waits for numbering to catch up with its checkpoint.
            tracing::warn!(
                shard = %shard.id,
                consumer,
                checkpoint = next_seq - 1,
                last_seq = end.saturating_sub(1),
                "A consumer's checkpoint is past the end of its shard."
            );
        }
        let mut reader = EmbeddedReader {
            shard,
            consumer: consumer.to_owned(),
            committed,
            next_seq,
            pending: VecDeque::new(),
            fetched_to: next_seq,
            cursor: None,
            skipped: 0,
            checkpoint_dir,
        };
        reader.skip_deleted();
        Ok(reader)
    }

    /// The consumer this reader reads and checkpoints for.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// The sequence number of the next record [`ShardReader::next_batch`]
    /// returns.
    pub fn position(&self) -> SeqNo {
        SeqNo::from(self.next_seq)
    }

    /// How many records this reader passed over because retention deleted
    /// them before they were read: data the consumer lost, which an operator
    /// must see.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Moves past records retention deleted, counting them.
    fn skip_deleted(&mut self) {
        if !self.pending.is_empty() {
            return;
        }
        let oldest = self.shard.oldest();
        if self.next_seq < oldest {
            self.count_skipped(oldest - self.next_seq);
            self.next_seq = oldest;
            self.fetched_to = oldest;
            self.cursor = None;
        }
    }

    fn count_skipped(&mut self, n: u64) {
        self.skipped += n;
        tracing::warn!(
            shard = %self.shard.id,
            consumer = %self.consumer,
            skipped = n,
            from_seq = self.next_seq,
            "Retention deleted records before this consumer read them."
        );
    }

    /// Up to `max` records below `end`, without waiting: from the tail
    /// cache, or else from records read ahead from the segment files.
    ///
    /// Cancel safe: the only await (a file read) comes before any record is
    /// taken, so a caller that drops the future (a `select!` on shutdown)
    /// loses nothing.
    async fn read_available(&mut self, max: usize, end: u64) -> Result<Vec<Record>, ReadError> {
        self.skip_deleted();
        if self.pending.is_empty() {
            if self.next_seq >= end {
                return Ok(Vec::new());
            }
            if let Some(records) = self.shard.tail().read(self.next_seq, max) {
                let records: Vec<Record> = records
                    .into_iter()
                    .take_while(|r| r.seq < SeqNo::from(end))
                    .collect();
                self.next_seq += records.len() as u64;
                self.fetched_to = self.next_seq;
                return Ok(records);
            }
        }
        // Read ahead before the read-ahead runs dry, so that after this batch
        // the next record is still at hand and lag() knows its age.
        if self.fetched_to < end
            && self.pending.len() <= max
            && self.shard.tail().arrival_of(self.fetched_to).is_none()
        {
            self.fill_from_files(end).await?;
        }
        let n = max.min(self.pending.len());
        let batch: Vec<Record> = self.pending.drain(..n).collect();
        // Records read from files may jump over a damaged segment.
        self.next_seq = self
            .pending
            .front()
            .map_or(self.fetched_to, |r| r.seq.to_u64().unwrap_or(u64::MAX));
        Ok(batch)
    }

    /// Reads the next stretch of records below `end` from the segment files
    /// onto the end of `pending`.
    async fn fill_from_files(&mut self, end: u64) -> Result<(), ReadError> {
        let shard = Arc::clone(&self.shard);
        // Taken, not borrowed: if the caller drops the future mid-read, the
        // next read finds no cursor and locates `fetched_to` afresh.
        let cursor = self.cursor.take();
        let from = self.fetched_to;
        let fill = tokio::task::spawn_blocking(move || fill(&shard, cursor, from, end))
            .await
            .map_err(|e| ReadError::Io(format!("segment read task failed: {e}")))??;
        if fill.skipped > 0 {
            self.count_skipped(fill.skipped);
        }
        if self.pending.is_empty() {
            self.next_seq = fill
                .records
                .first()
                .map_or(fill.next, |r| r.seq.to_u64().unwrap_or(u64::MAX));
        }
        self.fetched_to = fill.next;
        self.cursor = fill.cursor;
        self.pending.extend(fill.records);
        Ok(())
    }
}

#[async_trait]
impl ShardReader for EmbeddedReader {
    fn shard_id(&self) -> &str {
        &self.shard.id
    }

    async fn next_batch(&mut self, max: usize, wait: Duration) -> Result<Vec<Record>, ReadError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let deadline = Instant::now() + wait;
        loop {
            let committed = *self.committed.borrow_and_update();
            let batch = self.read_available(max, committed.next_seq).await?;
            if !batch.is_empty() {
                return Ok(batch);
            }
            if committed.closed {
                return Err(ReadError::Closed);
            }
            match tokio::time::timeout_at(deadline, self.committed.changed()).await {
                Err(_elapsed) => return Ok(Vec::new()),
                // The shard owns the sender and the reader holds the shard,
                // so the channel cannot close; treat it as closed anyway.
                Ok(Err(_)) => return Err(ReadError::Closed),
                Ok(Ok(())) => {}
            }
        }
    }

    async fn checkpoint(&mut self, seq: SeqNo) -> Result<(), ReadError> {
        let end = self.shard.committed().next_seq;
        let seq = seq.to_u64().filter(|s| *s < end).ok_or_else(|| {
            ReadError::InvalidArgument(format!(
                "checkpoint {seq} is past the last record of {} ({})",
                self.shard.id,
                end.saturating_sub(1)
            ))
        })?;
        let dir = self.checkpoint_dir.clone();
        let name = self.consumer.clone();
        tokio::task::spawn_blocking(move || {
            write_checkpoint(&dir, &name, seq, "writing checkpoint")
        })
        .await
        .map_err(|e| ReadError::Io(format!("checkpoint task failed: {e}")))?
    }

    fn lag(&self) -> Lag {
        let end = self.committed.borrow().next_seq;
        let records_behind = end.saturating_sub(self.next_seq);
        let oldest_unread_arrival_ms = if records_behind == 0 {
            None
        } else {
            self.pending
                .front()
                .map(|r| r.arrival_ms)
                .or_else(|| self.shard.tail().arrival_of(self.next_seq))
        };
        Lag {
            records_behind,
            oldest_unread_arrival_ms,
        }
    }
}

fn register(dir: &std::path::Path, consumer: &str, seq: u64) -> Result<(), ReadError> {
    write_checkpoint(dir, consumer, seq, "registering consumer")
}

/// Replaces `consumer`'s checkpoint file in `dir` with `seq`, atomically;
/// `doing` names the step in the error.
fn write_checkpoint(
    dir: &std::path::Path,
    consumer: &str,
    seq: u64,
    doing: &str,
) -> Result<(), ReadError> {
    files::write_atomic(
        dir,
        consumer,
        &format!(".{consumer}.tmp"),
        format!("{seq}\n").as_bytes(),
    )
    .map_err(|e| ReadError::Io(format!("{doing} {consumer} in {}: {e}", dir.display())))
}

/// Where each shard keeps its consumers' checkpoints.
pub(crate) const CHECKPOINT_DIR: &str = "checkpoints";

/// Consumer names become file names, so they are kept to a safe alphabet; a
/// leading dot is refused so they never meet the temporary files.
fn check_consumer(consumer: &str) -> Result<(), ReadError> {
    let ok = (1..=64).contains(&consumer.len())
        && !consumer.starts_with('.')
        && consumer
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(ReadError::InvalidArgument(format!(
            "consumer name {consumer:?} must be 1..=64 characters of [A-Za-z0-9_.-], not starting with '.'"
        )))
    }
}
