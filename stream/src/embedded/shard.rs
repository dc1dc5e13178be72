//! The state of one shard that its writer, its readers and retention share.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::watch;

use super::segment;
use crate::{Record, SeqNo};

/// Per-record bookkeeping the tail cache charges on top of key and data, so a
/// budget of tiny records still bounds memory.
const RECORD_OVERHEAD: usize = 64;

/// What readers wait on: the writer publishes it after every durable group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Committed {
    /// The sequence number the next record will get; everything below it is
    /// durable and readable.
    pub next_seq: u64,
    /// The log was closed: nothing more will arrive.
    pub closed: bool,
}

/// A segment as the shard tracks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SegmentInfo {
    pub base: u64,
    /// Bytes that hold durable records. For the segment being written this
    /// trails the file's length while a group is in flight, and readers never
    /// read past it.
    pub len: u64,
    /// The arrival time of the segment's last record, once known: retention
    /// needs it, and it is learnt when the segment closes or by one scan.
    pub last_arrival_ms: Option<i64>,
    /// The sequence number of the segment's last record, once a scan has
    /// found it: below the next segment's base after a crash without sync
    /// left a gap, and retention must know whether consumers passed it.
    pub last_seq: Option<u64>,
}

pub(crate) struct Shard {
    pub id: String,
    pub dir: PathBuf,
    /// Oldest first; the last one is being written.
    segments: Mutex<Vec<SegmentInfo>>,
    tail: Mutex<TailCache>,
    committed: watch::Sender<Committed>,
    /// The first sequence number retention has not deleted, so a reader can
    /// tell cheaply that it fell behind.
    oldest: AtomicU64,
    /// What the writer has asked of the disk since the log was opened.
    io: WriterIo,
}

/// A shard writer's writes and syncs, counted for `/metrics`: with small
/// groups, each sync rewrites a page of the segment's tail, so syncs, more
/// than records, decide what the disk writes.
#[derive(Debug, Default)]
pub(crate) struct WriterIo {
    /// Bytes written to segment files: frames, and the zeros written ahead.
    pub bytes: AtomicU64,
    /// `fdatasync`s of segment files: one per group commit with sync on,
    /// and one each time a segment closes.
    pub syncs: AtomicU64,
}

impl Shard {
    pub(crate) fn new(
        id: String,
        dir: PathBuf,
        segments: Vec<SegmentInfo>,
        tail: TailCache,
        next_seq: u64,
    ) -> Self {
        let oldest = segments.first().map_or(next_seq, |s| s.base);
        let (committed, _) = watch::channel(Committed {
            next_seq,
            closed: false,
        });
        Shard {
            id,
            dir,
            segments: Mutex::new(segments),
            tail: Mutex::new(tail),
            committed,
            oldest: AtomicU64::new(oldest),
            io: WriterIo::default(),
        }
    }

    pub(crate) fn io(&self) -> &WriterIo {
        &self.io
    }

    pub(crate) fn segment_path(&self, base: u64) -> PathBuf {
        segment_path(&self.dir, base)
    }

    pub(crate) fn segments(&self) -> MutexGuard<'_, Vec<SegmentInfo>> {
        // A panic while holding the lock cannot leave the list half-edited
        // (every edit is a single push, remove or assignment), so a poisoned
        // lock is still safe to use.
        self.segments.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn tail(&self) -> MutexGuard<'_, TailCache> {
        self.tail.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Committed> {
        self.committed.subscribe()
    }

    pub(crate) fn committed(&self) -> Committed {
        *self.committed.borrow()
    }

    pub(crate) fn oldest(&self) -> u64 {
        self.oldest.load(Ordering::Acquire)
    }

    /// Makes records durable up to `next_seq` visible. The segment list and
    /// the tail cache are updated first, so a reader that sees the new value
    /// finds the records.
    pub(crate) fn publish(&self, next_seq: u64) {
        self.committed.send_modify(|c| c.next_seq = next_seq);
    }

    pub(crate) fn close(&self) {
        self.committed.send_modify(|c| c.closed = true);
    }

    /// Forgets segments that retention deleted: everything below `oldest`.
    pub(crate) fn set_oldest(&self, oldest: u64) {
        self.oldest.store(oldest, Ordering::Release);
        self.tail().trim_below(oldest);
    }
}

pub(crate) fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(segment::file_name(base))
}

/// The newest records of a shard, so that readers keeping up never touch the
/// disk. Holds consecutive sequence numbers.
#[derive(Debug)]
pub(crate) struct TailCache {
    records: VecDeque<Record>,
    bytes: usize,
    budget: usize,
}

impl TailCache {
    pub(crate) fn new(budget: usize) -> Self {
        TailCache {
            records: VecDeque::new(),
            bytes: 0,
            budget,
        }
    }

    fn cost(record: &Record) -> usize {
        record.partition_key.len() + record.data.len() + RECORD_OVERHEAD
    }

    /// Appends records that follow the cached ones, evicting the oldest over
    /// budget. A record that does not follow the last one (numbering resumed
    /// above a gap after a crash) starts the cache over.
    pub(crate) fn extend(&mut self, records: impl IntoIterator<Item = Record>) {
        for record in records {
            let follows = self.records.back().is_none_or(|last| {
                last.seq.to_u64().and_then(|s| s.checked_add(1)) == record.seq.to_u64()
            });
            if !follows {
                self.records.clear();
                self.bytes = 0;
            }
            let cost = Self::cost(&record);
            if cost > self.budget {
                // Too big to cache: the cache would no longer be contiguous
                // with it missing, so start over after it.
                self.records.clear();
                self.bytes = 0;
                continue;
            }
            self.bytes += cost;
            self.records.push_back(record);
            while self.bytes > self.budget {
                match self.records.pop_front() {
                    Some(old) => self.bytes -= Self::cost(&old),
                    None => break,
                }
            }
        }
    }

    pub(crate) fn trim_below(&mut self, seq: u64) {
        while self
            .records
            .front()
            .is_some_and(|r| r.seq < SeqNo::from(seq))
        {
            if let Some(old) = self.records.pop_front() {
                self.bytes -= Self::cost(&old);
            }
        }
    }

    fn index_of(&self, seq: u64) -> Option<usize> {
        let first = self.records.front()?.seq.to_u64()?;
        let index = seq.checked_sub(first)?;
        let index = usize::try_from(index).ok()?;
        (index < self.records.len()).then_some(index)
    }

    /// Up to `max` records from `seq` on, if the cache holds `seq`.
    pub(crate) fn read(&self, seq: u64, max: usize) -> Option<Vec<Record>> {
        let start = self.index_of(seq)?;
        Some(self.records.range(start..).take(max).cloned().collect())
    }

    pub(crate) fn arrival_of(&self, seq: u64) -> Option<i64> {
        self.index_of(seq).map(|i| self.records[i].arrival_ms)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn record(seq: u64, len: usize) -> Record {
        Record {
            seq: SeqNo::from(seq),
            partition_key: "k".into(),
            data: Bytes::from(vec![0u8; len]),
            arrival_ms: seq as i64,
        }
    }

    #[test]
    fn keeps_the_newest_within_budget() {
        let per = 1 + 100 + RECORD_OVERHEAD;
        let mut cache = TailCache::new(per * 3);
        cache.extend((1..=5).map(|s| record(s, 100)));
        assert!(cache.read(2, 10).is_none());
        let got = cache.read(3, 10).unwrap();
        let seqs: Vec<u64> = got.iter().filter_map(|r| r.seq.to_u64()).collect();
        assert_eq!(seqs, [3, 4, 5]);
        assert_eq!(cache.read(4, 1).unwrap().len(), 1);
        assert!(cache.read(6, 10).is_none());
        assert_eq!(cache.arrival_of(5), Some(5));
    }

    #[test]
    fn a_gap_in_numbering_starts_it_over() {
        let mut cache = TailCache::new(10_000);
        cache.extend((1..=3).map(|s| record(s, 10)));
        cache.extend((100..=101).map(|s| record(s, 10)));
        assert!(cache.read(3, 10).is_none());
        let seqs: Vec<u64> = cache
            .read(100, 10)
            .unwrap()
            .iter()
            .filter_map(|r| r.seq.to_u64())
            .collect();
        assert_eq!(seqs, [100, 101]);
    }

    #[test]
    fn an_oversized_record_empties_it_and_trim_drops_old() {
        let mut cache = TailCache::new(1000);
        cache.extend((1..=3).map(|s| record(s, 10)));
        cache.extend([record(4, 5000)]);
        assert!(cache.read(3, 1).is_none());
        cache.extend((5..=7).map(|s| record(s, 10)));
        cache.trim_below(6);
        assert!(cache.read(5, 1).is_none());
        assert_eq!(cache.read(6, 10).unwrap().len(), 2);
    }
}
