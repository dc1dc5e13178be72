//! Retention: which closed segments go, and what their going costs.
//!
//! A consumer registers with a shard by opening a reader on it: its
//! checkpoint file in `checkpoints/` is its registration, and it stays
//! registered until [`super::EmbeddedLog::deregister`]. By age, a segment goes
//! only once every registered consumer's checkpoint is past its last record,
//! so a stalled processor keeps its data. Only the disk budget deletes
//! records a consumer has not read: the oldest segment first, and every such
//! deletion is reported as a [`DroppedRange`] for the caller to count and
//! dead-letter.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Arc;

use super::LogError;
use super::files;
use super::reader::CHECKPOINT_DIR;
use super::segment::{Scanner, Step};
use super::shard::Shard;
use crate::SeqNo;

/// Records the disk budget deleted before every registered consumer had read
/// them: lost readings, which a person must be able to see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroppedRange {
    pub shard: String,
    /// The first and last deleted record some consumer had not read.
    pub first_seq: SeqNo,
    pub last_seq: SeqNo,
    /// How many records lie between them (numbering may have gaps).
    pub records: u64,
    /// The consumers that had not read them all.
    pub consumers: Vec<String>,
    /// The arrival time of the newest of them.
    pub last_arrival_ms: i64,
}

/// What one retention run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionReport {
    pub segments_deleted: usize,
    /// Unread records the disk budget forced out; empty when nothing was lost.
    pub dropped: Vec<DroppedRange>,
}

/// A shard's oldest closed segment, as retention judges it.
struct Oldest {
    base: u64,
    next_base: u64,
    /// Its last record; `None` for a segment with none.
    last_seq: Option<u64>,
    last_arrival_ms: i64,
}

/// A consumer and the last record it is done with.
type Registered = (String, u64);

/// Deletes closed segments older than `cutoff_ms` that every registered
/// consumer has passed, then, while the log holds more than `max_bytes`,
/// the oldest closed segment of any shard (read ones before unread ones).
/// The segment being written is never deleted. Blocking.
pub(crate) fn enforce(
    shards: &[Arc<Shard>],
    cutoff_ms: i64,
    max_bytes: Option<u64>,
) -> Result<RetentionReport, LogError> {
    let mut report = RetentionReport::default();
    let mut touched = vec![false; shards.len()];
    for (i, shard) in shards.iter().enumerate() {
        let consumers = consumers(shard)?;
        while let Some(oldest) = oldest_closed(shard)? {
            let expired = oldest.last_arrival_ms < cutoff_ms;
            if !expired || !unread_by(&consumers, oldest.last_seq).is_empty() {
                break;
            }
            delete(shard, &oldest)?;
            touched[i] = true;
            report.segments_deleted += 1;
        }
    }
    if let Some(budget) = max_bytes {
        enforce_budget(shards, budget, &mut report, &mut touched)?;
    }
    for (shard, touched) in shards.iter().zip(touched) {
        if touched {
            files::sync_dir(&shard.dir).map_err(|source| LogError::Io {
                context: format!("syncing {}", shard.dir.display()),
                source,
            })?;
        }
    }
    Ok(report)
}

/// Deletes oldest closed segments until the log fits in `budget` bytes.
fn enforce_budget(
    shards: &[Arc<Shard>],
    budget: u64,
    report: &mut RetentionReport,
    touched: &mut [bool],
) -> Result<(), LogError> {
    while total_bytes(shards) > budget {
        // The candidate that costs least: a segment every consumer has read
        // costs nothing; else the one whose records are oldest.
        let mut best: Option<(usize, Oldest, Vec<Registered>, bool)> = None;
        for (i, shard) in shards.iter().enumerate() {
            let Some(oldest) = oldest_closed(shard)? else {
                continue;
            };
            let consumers = consumers(shard)?;
            let unread = !unread_by(&consumers, oldest.last_seq).is_empty();
            let better = best.as_ref().is_none_or(|(_, b, _, b_unread)| {
                (unread, oldest.last_arrival_ms) < (*b_unread, b.last_arrival_ms)
            });
            if better {
                best = Some((i, oldest, consumers, unread));
            }
        }
        let Some((i, oldest, consumers, unread)) = best else {
            // Only segments being written are left; they cannot go.
            tracing::warn!(
                max_bytes = budget,
                "The stream is over its disk budget with nothing left to delete but the segments being written."
            );
            break;
        };
        let shard = &shards[i];
        if unread && let Some(range) = dropped_range(shard, &oldest, &consumers)? {
            tracing::error!(
                shard = %range.shard,
                first_seq = %range.first_seq,
                last_seq = %range.last_seq,
                records = range.records,
                consumers = ?range.consumers,
                max_bytes = budget,
                "The stream's disk budget deleted records a consumer had not read."
            );
            report.dropped.push(range);
        }
        delete(shard, &oldest)?;
        touched[i] = true;
        report.segments_deleted += 1;
    }
    Ok(())
}

fn total_bytes(shards: &[Arc<Shard>]) -> u64 {
    shards
        .iter()
        .map(|s| s.segments().iter().map(|g| g.len).sum::<u64>())
        .sum()
}

/// The consumers registered with `shard` and their checkpoints. A
/// checkpoint that cannot be read counts as nothing read, so retention
/// keeps the data rather than guess.
fn consumers(shard: &Shard) -> Result<Vec<Registered>, LogError> {
    let dir = shard.dir.join(CHECKPOINT_DIR);
    let io_error = |source| LogError::Io {
        context: format!("listing {}", dir.display()),
        source,
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(io_error)? {
        let entry = entry.map_err(io_error)?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        // Temporary files of checkpoint writes start with a dot.
        if name.starts_with('.') {
            continue;
        }
        let text = files::read_if_exists(&entry.path()).map_err(io_error)?;
        let Some(text) = text else { continue };
        let seq = text.trim().parse::<u64>().unwrap_or_else(|_| {
            tracing::warn!(shard = %shard.id, consumer = %name, "A checkpoint file does not hold a sequence number; retention keeps everything for it.");
            0
        });
        out.push((name, seq));
    }
    Ok(out)
}

/// The consumers whose checkpoint is below `last_seq`.
fn unread_by(consumers: &[Registered], last_seq: Option<u64>) -> Vec<&Registered> {
    let Some(last) = last_seq else {
        return Vec::new();
    };
    consumers.iter().filter(|(_, seq)| *seq < last).collect()
}

/// The shard's oldest segment, unless it is the one being written, with its
/// last record found by one scan and remembered.
fn oldest_closed(shard: &Shard) -> Result<Option<Oldest>, LogError> {
    let (info, next_base) = {
        let segments = shard.segments();
        if segments.len() < 2 {
            return Ok(None);
        }
        (segments[0].clone(), segments[1].base)
    };
    let (last_arrival_ms, last_seq) = match (info.last_arrival_ms, info.last_seq) {
        (Some(ms), Some(seq)) => (ms, Some(seq)),
        _ => {
            let scan =
                scan(&shard.segment_path(info.base), info.len, u64::MAX).map_err(|source| {
                    LogError::Io {
                        context: format!("scanning segment {} of {}", info.base, shard.id),
                        source,
                    }
                })?;
            if let Some(kept) = shard.segments().iter_mut().find(|s| s.base == info.base) {
                kept.last_arrival_ms = Some(scan.last_arrival_ms);
                kept.last_seq = scan.last_seq;
            }
            (scan.last_arrival_ms, scan.last_seq)
        }
    };
    Ok(Some(Oldest {
        base: info.base,
        next_base,
        last_seq,
        last_arrival_ms,
    }))
}

/// The records of `oldest` that some consumer has not read.
fn dropped_range(
    shard: &Shard,
    oldest: &Oldest,
    consumers: &[Registered],
) -> Result<Option<DroppedRange>, LogError> {
    let behind = unread_by(consumers, oldest.last_seq);
    let Some(slowest) = behind.iter().map(|(_, seq)| *seq).min() else {
        return Ok(None);
    };
    let len = shard
        .segments()
        .iter()
        .find(|s| s.base == oldest.base)
        .map_or(0, |s| s.len);
    let scan =
        scan(&shard.segment_path(oldest.base), len, slowest).map_err(|source| LogError::Io {
            context: format!("scanning segment {} of {}", oldest.base, shard.id),
            source,
        })?;
    let (Some(first), Some(last)) = (scan.first_after, scan.last_seq) else {
        return Ok(None);
    };
    Ok(Some(DroppedRange {
        shard: shard.id.clone(),
        first_seq: SeqNo::from(first),
        last_seq: SeqNo::from(last),
        records: scan.records_after,
        consumers: behind.iter().map(|(name, _)| name.clone()).collect(),
        last_arrival_ms: scan.last_arrival_ms,
    }))
}

/// Forgets the segment before unlinking it, so no reader starts on it;
/// readers already in it keep their open handle.
fn delete(shard: &Shard, oldest: &Oldest) -> Result<(), LogError> {
    shard.segments().retain(|s| s.base != oldest.base);
    shard.set_oldest(oldest.next_base);
    let path = shard.segment_path(oldest.base);
    files::remove_if_exists(&path).map_err(|source| LogError::Io {
        context: format!("deleting {}", path.display()),
        source,
    })?;
    tracing::info!(
        shard = %shard.id,
        first_seq = oldest.base,
        last_seq = ?oldest.last_seq,
        last_arrival_ms = oldest.last_arrival_ms,
        "Retention deleted a segment."
    );
    Ok(())
}

/// What one pass over a closed segment found.
struct Scan {
    /// The newest record's arrival; a segment with none counts as infinitely
    /// old, since it holds nothing to keep.
    last_arrival_ms: i64,
    last_seq: Option<u64>,
    /// Records numbered above the threshold the scan was given.
    records_after: u64,
    first_after: Option<u64>,
}

fn scan(path: &Path, len: u64, after: u64) -> io::Result<Scan> {
    let file = File::open(path)?;
    let mut scanner = Scanner::new(&file, 0, len);
    let mut out = Scan {
        last_arrival_ms: i64::MIN,
        last_seq: None,
        records_after: 0,
        first_after: None,
    };
    while let Step::Frame { frame, .. } = scanner.next()? {
        out.last_arrival_ms = frame.arrival_ms;
        out.last_seq = Some(frame.seq);
        if frame.seq > after {
            out.records_after += 1;
            out.first_after.get_or_insert(frame.seq);
        }
    }
    Ok(out)
}

impl super::EmbeddedLog {
    /// Appends the log's own metrics to `out`, in Prometheus text format:
    /// the stream renders what only the stream knows.
    pub fn render_metrics(&self, out: &mut String) {
        let io = self.writer_io();
        let families: [(&str, &str, PerShard); 3] = [
            (
                "iotpipe_stream_records_dropped_total",
                "Stream records deleted by the disk budget before the processors read them.",
                self.records_dropped(),
            ),
            (
                "iotpipe_stream_segment_written_bytes_total",
                "Bytes the log wrote to its segment files: records, and zeros written ahead of them.",
                io.iter()
                    .map(|s| (s.shard.clone(), s.bytes_written))
                    .collect(),
            ),
            (
                "iotpipe_stream_syncs_completed_total",
                "fdatasyncs of the log's segment files: one per group commit, and one per closed segment.",
                io.iter().map(|s| (s.shard.clone(), s.syncs)).collect(),
            ),
        ];
        for (name, help, per_shard) in families {
            render_counter(out, name, help, &per_shard);
        }
    }
}

/// A count per shard id.
type PerShard = Vec<(String, u64)>;

/// One counter family with a sample per shard.
fn render_counter(out: &mut String, name: &str, help: &str, per_shard: &[(String, u64)]) {
    use std::fmt::Write as _;
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (shard, n) in per_shard {
        let _ = writeln!(out, "{name}{{shard=\"{shard}\"}} {n}");
    }
}
