//! A reader's read-ahead from the segment files, for a consumer behind the
//! tail cache: each segment is read once, front to back, stepping over
//! segments that retention deleted or that are damaged, and counting the
//! records passed over.

use std::fs::File;
use std::io;

use bytes::Bytes;

use super::segment::{Scanner, Step};
use super::shard::Shard;
use crate::{ReadError, Record, SeqNo};

/// A read from the segment files stops after this many records or bytes; the
/// rest waits in the next call, so one call's memory stays bounded.
const FILL_RECORDS: usize = 4096;
const FILL_BYTES: usize = 4 * 1024 * 1024;

/// An open segment and the offset of the frame with sequence number `seq`.
pub(super) struct FileCursor {
    base: u64,
    file: File,
    offset: u64,
    seq: u64,
}

/// What one read from the segment files produced.
pub(super) struct Fill {
    /// Consecutive records, except across a damaged segment.
    pub(super) records: Vec<Record>,
    /// Data bytes in `records`, bounded by `FILL_BYTES`.
    bytes: usize,
    /// Records passed over: deleted by retention, or in a damaged segment.
    pub(super) skipped: u64,
    /// The sequence number after the read: where the next read starts.
    pub(super) next: u64,
    /// Positioned at `next`, when the read stopped inside a segment.
    pub(super) cursor: Option<FileCursor>,
}

/// How scanning one segment ended.
enum Scan {
    /// At `end`, or with the read full; the cursor points at the next frame.
    Stopped,
    /// At the segment's end, or at damage that ended it early (described).
    Ended { damage: Option<String> },
}

impl Fill {
    /// Whether this read holds as much as one read may.
    fn is_full(&self) -> bool {
        self.records.len() >= FILL_RECORDS || self.bytes >= FILL_BYTES
    }

    /// Opens the segment holding `next`, or the oldest retained one,
    /// counting the records retention deleted in between.
    fn locate_next(&mut self, shard: &Shard) -> Result<FileCursor, ReadError> {
        let (cursor, skip) = locate(shard, self.next)?;
        self.skipped += skip;
        self.next += skip;
        Ok(cursor)
    }

    /// Moves on to the next segment, starting at `next_base`, after the one
    /// at `base`: the records a damage in it hid are counted as skipped.
    fn pass_segment(&mut self, shard: &Shard, base: u64, next_base: u64, damage: Option<String>) {
        if let Some(damage) = damage {
            let lost = next_base.saturating_sub(self.next);
            tracing::warn!(
                shard = %shard.id,
                segment = base,
                damage = %damage,
                lost,
                "A closed segment is damaged; reading continues with the next one."
            );
            self.skipped += lost;
        }
        self.next = self.next.max(next_base);
    }
}

/// Reads records from `from` (or the oldest retained, if later) up to `end`,
/// continuing from `cursor` when it points at `from`. Blocking.
pub(super) fn fill(
    shard: &Shard,
    cursor: Option<FileCursor>,
    from: u64,
    end: u64,
) -> Result<Fill, ReadError> {
    let mut out = Fill {
        records: Vec::new(),
        bytes: 0,
        skipped: 0,
        next: from,
        cursor: None,
    };
    let mut cursor = match cursor.filter(|c| c.seq == from) {
        Some(cursor) => cursor,
        None => out.locate_next(shard)?,
    };
    loop {
        let (seg_end, next_base) = segment_bounds(shard, &cursor)?;
        let damage = match scan_segment(shard, &mut cursor, seg_end, end, &mut out)? {
            Scan::Stopped => {
                out.cursor = Some(cursor);
                return Ok(out);
            }
            Scan::Ended { damage } => damage,
        };
        let Some(next_base) = next_base else {
            if let Some(damage) = damage {
                return Err(ReadError::Io(format!(
                    "segment {} of {} is damaged where records are committed: {damage}",
                    cursor.base, shard.id
                )));
            }
            // The segment being written: everything committed is read.
            out.cursor = Some(cursor);
            return Ok(out);
        };
        out.pass_segment(shard, cursor.base, next_base, damage);
        if out.next >= end || out.is_full() {
            // The next read locates the segment by number.
            return Ok(out);
        }
        cursor = match open_segment(shard, next_base)? {
            Some(cursor) => cursor,
            // Deleted by retention since the snapshot: go on at the oldest
            // retained segment.
            None => out.locate_next(shard)?,
        };
    }
}

/// Where the cursor's segment ends, and the base of the segment after it, if
/// any. One snapshot per segment: if a later segment exists, this one is
/// closed and its length final.
fn segment_bounds(shard: &Shard, cursor: &FileCursor) -> Result<(u64, Option<u64>), ReadError> {
    let (len, next_base) = {
        let segments = shard.segments();
        let len = segments
            .iter()
            .find(|s| s.base == cursor.base)
            .map(|s| s.len);
        let next = segments.iter().map(|s| s.base).find(|b| *b > cursor.base);
        (len, next)
    };
    let seg_end = match len {
        Some(len) => len,
        // Retention deleted the segment under us; the open handle still
        // reads it, and a deleted segment was closed, hence whole.
        None => cursor
            .file
            .metadata()
            .map_err(|e| segment_error(shard, "reading a segment", e))?
            .len(),
    };
    Ok((seg_end, next_base))
}

/// Appends the cursor's segment's records below `end`, up to `seg_end`, to
/// `out`, and leaves the cursor where the scan stopped.
fn scan_segment(
    shard: &Shard,
    cursor: &mut FileCursor,
    seg_end: u64,
    end: u64,
    out: &mut Fill,
) -> Result<Scan, ReadError> {
    let mut scanner = Scanner::new(&cursor.file, cursor.offset, seg_end);
    let damage = loop {
        let step = scanner
            .next()
            .map_err(|e| segment_error(shard, "reading a segment", e))?;
        match step {
            Step::Frame { frame, offset } => {
                if frame.seq < out.next {
                    continue;
                }
                if frame.seq >= end || out.is_full() {
                    cursor.offset = offset;
                    cursor.seq = frame.seq;
                    return Ok(Scan::Stopped);
                }
                if frame.seq != out.next {
                    break Some(format!("expected record {}, found {}", out.next, frame.seq));
                }
                out.bytes += frame.data.len();
                out.records.push(Record {
                    seq: SeqNo::from(frame.seq),
                    partition_key: frame.key.to_owned(),
                    data: Bytes::copy_from_slice(frame.data),
                    arrival_ms: frame.arrival_ms,
                });
                out.next += 1;
            }
            Step::End => break None,
            Step::Torn { offset } => break Some(format!("a cut frame at offset {offset}")),
            Step::Corrupt { offset, reason } => {
                break Some(format!("{reason} at offset {offset}"));
            }
        }
    };
    cursor.offset = scanner.position();
    cursor.seq = out.next;
    Ok(Scan::Ended { damage })
}

/// Opens the segment at `base` from its start; `None` if retention deleted
/// it.
fn open_segment(shard: &Shard, base: u64) -> Result<Option<FileCursor>, ReadError> {
    match File::open(shard.segment_path(base)) {
        Ok(file) => Ok(Some(FileCursor {
            base,
            file,
            offset: 0,
            seq: base,
        })),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(segment_error(shard, "opening a segment", e)),
    }
}

fn segment_error(shard: &Shard, what: &str, e: io::Error) -> ReadError {
    ReadError::Io(format!("{what} in {}: {e}", shard.id))
}

/// Opens the segment holding `seq`, or the oldest one if retention deleted
/// `seq`; returns the cursor at that segment's start and how many records
/// were skipped.
fn locate(shard: &Shard, seq: u64) -> Result<(FileCursor, u64), ReadError> {
    // Each retry follows a deletion by retention, which only moves forward.
    for _ in 0..8 {
        let (base, first_base) = {
            let segments = shard.segments();
            let first = segments.first().map(|s| s.base);
            let holding = segments
                .iter()
                .rev()
                .find(|s| s.base <= seq)
                .map(|s| s.base);
            (holding, first)
        };
        let Some(first_base) = first_base else {
            return Err(ReadError::Io(format!("{} has no segments", shard.id)));
        };
        let (base, skip) = match base {
            Some(base) => (base, 0),
            None => (first_base, first_base - seq),
        };
        match File::open(shard.segment_path(base)) {
            Ok(file) => {
                return Ok((
                    FileCursor {
                        base,
                        file,
                        offset: 0,
                        seq: base,
                    },
                    skip,
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(ReadError::Io(format!(
                    "opening a segment of {}: {e}",
                    shard.id
                )));
            }
        }
    }
    Err(ReadError::Io(format!(
        "segments of {} keep disappearing while a reader looks for record {seq}",
        shard.id
    )))
}
