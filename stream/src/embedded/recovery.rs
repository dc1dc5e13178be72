//! Opening a shard's files: cutting away a torn tail, resuming numbering
//! above the reserved mark.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::reader::CHECKPOINT_DIR;
use super::reserve;
use super::segment::{self, Scanner, Step};
use super::shard::{self, SegmentInfo, Shard, TailCache};
use super::writer::WriterStart;
use super::{EmbeddedConfig, OpenError, ShardRecovery, files};
use crate::{Record, SeqNo};

pub(crate) struct OpenedShard {
    pub shard: Shard,
    pub start: WriterStart,
    pub report: ShardRecovery,
}

/// Opens shard `id` in `root`: lists its segments, scans the last one, cuts
/// a torn or corrupt tail, and fills the tail cache from what remains; if
/// the files end below the reserved mark, numbering resumes at the mark. A
/// `fresh` log may create the shard; an existing one must have it.
pub(crate) fn open_shard(
    root: &Path,
    id: &str,
    config: &EmbeddedConfig,
    fresh: bool,
) -> Result<OpenedShard, OpenError> {
    let dir = root.join(id);
    let listed = list_segments(root, &dir, id, fresh)?;
    let Some(last) = listed.last().cloned() else {
        return Err(OpenError::Corrupt {
            dir: root.to_owned(),
            reason: format!("{id} has no segment files"),
        });
    };

    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&last.path)
        .map_err(OpenError::io(format!("opening {}", last.path.display())))?;
    let scan_error = OpenError::io(format!("scanning {}", last.path.display()));
    let mut tail = TailCache::new(config.tail_cache_bytes);
    let scanned = scan_last(&file, last.base, last.len, &mut tail).map_err(scan_error)?;
    let cut = cut_torn_tail(id, &file, &last, &scanned)?;
    let mut report = ShardRecovery {
        shard: id.to_owned(),
        next_seq: SeqNo::from(scanned.next_seq),
        truncated_bytes: cut.as_ref().map_or(0, |c| c.bytes),
        dropped_records: cut.as_ref().map_or(0, |c| c.records),
        numbers_skipped: 0,
    };

    let mut segments = segment_infos(&listed, scanned.good_len);
    let reserved = reserve::read(&dir).map_err(|reason| OpenError::Corrupt {
        dir: root.to_owned(),
        reason,
    })?;
    let mut start = WriterStart {
        base: last.base,
        len: scanned.good_len,
        allocated: if cut.is_some() {
            scanned.good_len
        } else {
            last.len
        },
        next_seq: scanned.next_seq,
        last_arrival_ms: scanned.last_arrival_ms.unwrap_or(i64::MIN),
        reserved: reserved.unwrap_or(0),
    };
    if let Some(mark) = reserved.filter(|m| *m > scanned.next_seq) {
        resume_at_mark(&dir, &file, &mut start, &mut segments, mark)?;
        tracing::warn!(
            shard = id,
            files_end = scanned.next_seq,
            resume_seq = mark,
            "The shard ends below numbers it may have handed out (a crash without sync): \
             numbering resumes above them, so no checkpoint is past new records."
        );
        report.next_seq = SeqNo::from(mark);
        report.numbers_skipped = mark - scanned.next_seq;
    }
    Ok(OpenedShard {
        shard: Shard::new(id.to_owned(), dir, segments, tail, start.next_seq),
        start,
        report,
    })
}

/// Lists the segments of shard `id` in `dir`, creating its checkpoint folder
/// and, in a `fresh` log, its first segment.
fn list_segments(
    root: &Path,
    dir: &Path,
    id: &str,
    fresh: bool,
) -> Result<Vec<segment::Listed>, OpenError> {
    let checkpoints = dir.join(CHECKPOINT_DIR);
    std::fs::create_dir_all(&checkpoints)
        .map_err(OpenError::io(format!("creating {}", checkpoints.display())))?;
    let listing_error = OpenError::io(format!("listing {}", dir.display()));
    let mut listed = segment::list(dir).map_err(listing_error)?;
    if fresh {
        if listed.iter().any(|s| s.len > 0) {
            return Err(OpenError::Corrupt {
                dir: root.to_owned(),
                reason: format!("{id} holds records but the meta file is missing"),
            });
        }
        if listed.is_empty() {
            let path = shard::segment_path(dir, 1);
            File::create(&path).map_err(OpenError::io(format!("creating {}", path.display())))?;
            files::sync_dir(dir).map_err(OpenError::io(format!("syncing {}", dir.display())))?;
            files::sync_dir(root).map_err(OpenError::io(format!("syncing {}", root.display())))?;
            listed =
                segment::list(dir).map_err(OpenError::io(format!("listing {}", dir.display())))?;
        }
    }
    Ok(listed)
}

/// What cutting the last segment's tail removed.
struct Cut {
    bytes: u64,
    /// Whole frames in the cut bytes, judged by their length fields.
    records: u64,
}

/// Cuts what follows the last good frame of the last segment (`file`), and
/// syncs the cut; `None` when nothing follows it but zeros.
fn cut_torn_tail(
    id: &str,
    file: &File,
    last: &segment::Listed,
    scanned: &Scanned,
) -> Result<Option<Cut>, OpenError> {
    if scanned.good_len >= last.len {
        return Ok(None);
    }
    let cut = last.len - scanned.good_len;
    let mut tail_bytes = vec![0u8; usize::try_from(cut).unwrap_or(0)];
    let read = file.read_exact_at(&mut tail_bytes, scanned.good_len);
    // Zeros only: space the writer wrote ahead of its records, which a
    // crash (rather than a clean close) left behind. Nothing is torn.
    let written_ahead = read.is_ok() && tail_bytes.iter().all(|b| *b == 0);
    if written_ahead {
        return Ok(None);
    }
    let dropped = match read {
        Ok(()) => segment::count_claimed_frames(&tail_bytes),
        Err(_) => 0,
    };
    let truncate_error = OpenError::io(format!("truncating {}", last.path.display()));
    file.set_len(scanned.good_len)
        .and_then(|()| file.sync_all())
        .map_err(truncate_error)?;
    tracing::warn!(
        shard = id,
        segment = %last.path.display(),
        dropped_bytes = cut,
        dropped_records = dropped,
        reason = %scanned.stop,
        resume_seq = scanned.next_seq,
        "Cut a torn or corrupt tail from the last segment."
    );
    Ok(Some(Cut {
        bytes: cut,
        records: dropped,
    }))
}

/// The shard's view of the listed segments; the last one, where the writer
/// resumes, ends at `good_len`.
fn segment_infos(listed: &[segment::Listed], good_len: u64) -> Vec<SegmentInfo> {
    let mut segments: Vec<SegmentInfo> = listed
        .iter()
        .map(|s| SegmentInfo {
            base: s.base,
            len: s.len,
            last_arrival_ms: None,
            last_seq: None,
        })
        .collect();
    if let Some(active) = segments.last_mut() {
        active.len = good_len;
    }
    segments
}

/// Closes the last segment (`file`) as it is and starts a new, empty one
/// named for `mark`, where numbering resumes. The gap between them holds no
/// record, and readers step over gaps between segments.
fn resume_at_mark(
    dir: &Path,
    file: &File,
    start: &mut WriterStart,
    segments: &mut Vec<SegmentInfo>,
    mark: u64,
) -> Result<(), OpenError> {
    // A closed segment holds whole frames and nothing else: cut the zeros
    // written ahead, which recovery otherwise keeps for the writer.
    let last_path = shard::segment_path(dir, start.base);
    file.set_len(start.len)
        .and_then(|()| file.sync_all())
        .map_err(OpenError::io(format!("closing {}", last_path.display())))?;
    let path = shard::segment_path(dir, mark);
    File::create(&path).map_err(OpenError::io(format!("creating {}", path.display())))?;
    files::sync_dir(dir).map_err(OpenError::io(format!("syncing {}", dir.display())))?;
    segments.push(SegmentInfo {
        base: mark,
        len: 0,
        last_arrival_ms: None,
        last_seq: None,
    });
    start.base = mark;
    start.len = 0;
    start.allocated = 0;
    start.next_seq = mark;
    Ok(())
}

struct Scanned {
    /// Bytes of valid, consecutive frames from the segment's start.
    good_len: u64,
    next_seq: u64,
    last_arrival_ms: Option<i64>,
    /// Why the scan stopped before the file's end, if it did.
    stop: String,
}

/// Scans a whole segment, stopping at the first frame that is cut, corrupt
/// or out of sequence.
fn scan_last(file: &File, base: u64, len: u64, tail: &mut TailCache) -> io::Result<Scanned> {
    let mut scanner = Scanner::new(file, 0, len);
    let mut next_seq = base;
    let mut last_arrival_ms = None;
    let mut good_len = 0;
    let stop = loop {
        match scanner.next()? {
            Step::Frame { frame, offset } => {
                if frame.seq != next_seq {
                    break format!(
                        "record {} where {next_seq} belongs, at offset {offset}",
                        frame.seq
                    );
                }
                next_seq += 1;
                last_arrival_ms = Some(frame.arrival_ms);
                tail.extend([Record {
                    seq: SeqNo::from(frame.seq),
                    partition_key: frame.key.to_owned(),
                    data: bytes::Bytes::copy_from_slice(frame.data),
                    arrival_ms: frame.arrival_ms,
                }]);
                good_len = scanner.position();
            }
            Step::End => break String::new(),
            Step::Torn { offset } => break format!("a frame cut short at offset {offset}"),
            Step::Corrupt { offset, reason } => break format!("{reason} at offset {offset}"),
        }
    };
    Ok(Scanned {
        good_len,
        next_seq,
        last_arrival_ms,
        stop,
    })
}
