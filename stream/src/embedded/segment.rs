//! Segment files: their names, listing them, and scanning their frames with
//! positioned reads (so a scan shares a file handle with nobody's cursor).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::frame::{self, Corruption, Decoded, FrameRef};

const EXTENSION: &str = ".seg";
/// How much a scan reads per call: large enough that a sequential scan costs
/// few system calls, small enough to stay in cache.
const READ_CHUNK: usize = 256 * 1024;

/// A segment is named for the sequence number of its first record, zero
/// padded so that names sort in sequence order. An empty segment's name is the
/// sequence number its first record will get.
pub(crate) fn file_name(base: u64) -> String {
    format!("{base:020}{EXTENSION}")
}

fn parse_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(EXTENSION)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A segment file found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Listed {
    pub base: u64,
    pub path: PathBuf,
    pub len: u64,
}

/// The segments in `dir`, oldest first. Other files are ignored.
pub(crate) fn list(dir: &Path) -> io::Result<Vec<Listed>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Some(base) = entry.file_name().to_str().and_then(parse_name) else {
            continue;
        };
        let meta = entry.metadata()?;
        if meta.is_file() {
            out.push(Listed {
                base,
                path: entry.path(),
                len: meta.len(),
            });
        }
    }
    out.sort_by_key(|s| s.base);
    Ok(out)
}

/// One step of a scan.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step<'a> {
    /// A valid frame that starts at `offset`.
    Frame { frame: FrameRef<'a>, offset: u64 },
    /// The scan reached its end exactly at a frame boundary.
    End,
    /// The bytes from `offset` to the end are the start of a frame, cut short.
    Torn { offset: u64 },
    /// The bytes at `offset` are not a frame.
    Corrupt { offset: u64, reason: Corruption },
}

/// Reads the frames of one segment between two offsets, in chunks.
pub(crate) struct Scanner<'f> {
    file: &'f File,
    /// Offset of the next frame.
    pos: u64,
    /// Where the scan stops: the file's length, or the committed length of a
    /// segment that is still being written.
    end: u64,
    buf: Vec<u8>,
    /// Index in `buf` of the byte at `pos`.
    start: usize,
}

impl<'f> Scanner<'f> {
    pub(crate) fn new(file: &'f File, pos: u64, end: u64) -> Self {
        Scanner {
            file,
            pos,
            end,
            buf: Vec::new(),
            start: 0,
        }
    }

    /// The offset of the next frame.
    pub(crate) fn position(&self) -> u64 {
        self.pos
    }

    pub(crate) fn next(&mut self) -> io::Result<Step<'_>> {
        if self.pos >= self.end {
            return Ok(Step::End);
        }
        loop {
            let avail = &self.buf[self.start..];
            let need = match frame::claimed_len(avail) {
                Some(need) => need,
                None if avail.len() < frame::HEADER_LEN => frame::HEADER_LEN,
                // A header with an impossible length: decode names it.
                None => break,
            };
            if avail.len() >= need {
                break;
            }
            if self.pos + need as u64 > self.end {
                return Ok(Step::Torn { offset: self.pos });
            }
            self.refill(need)?;
        }
        let offset = self.pos;
        match frame::decode(&self.buf[self.start..]) {
            Decoded::Frame { frame, len } => {
                self.start += len;
                self.pos += len as u64;
                Ok(Step::Frame { frame, offset })
            }
            Decoded::Corrupt(reason) => Ok(Step::Corrupt { offset, reason }),
            Decoded::Incomplete { .. } => Ok(Step::Torn { offset }),
        }
    }

    /// Replaces the buffer with at least `need` bytes from `pos` (fewer only if
    /// the scan's end comes first).
    fn refill(&mut self, need: usize) -> io::Result<()> {
        let remaining = usize::try_from(self.end - self.pos).unwrap_or(usize::MAX);
        let len = need.max(READ_CHUNK).min(remaining);
        self.buf.clear();
        self.buf.resize(len, 0);
        self.start = 0;
        let mut filled = 0;
        while filled < len {
            match self
                .file
                .read_at(&mut self.buf[filled..], self.pos + filled as u64)
            {
                // The file is shorter than the scan expected: what is there is
                // all there is, and the caller sees a torn frame.
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.buf.truncate(filled);
        if filled < need.min(len) {
            self.end = self.pos + filled as u64;
        }
        Ok(())
    }
}

/// How many whole frames the bytes at the start of `tail` seem to hold, going
/// by their length fields alone: what a dropped tail probably cost.
pub(crate) fn count_claimed_frames(tail: &[u8]) -> u64 {
    let mut count = 0;
    let mut rest = tail;
    while let Some(len) = frame::claimed_len(rest) {
        if len > rest.len() {
            break;
        }
        count += 1;
        rest = &rest[len..];
    }
    count
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn segment_with(frames: &[(u64, &str, &[u8])]) -> (tempfile::NamedTempFile, Vec<u64>) {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        let mut buf = Vec::new();
        let mut offsets = Vec::new();
        for (seq, key, data) in frames {
            offsets.push(buf.len() as u64);
            frame::encode(*seq, 0, key, data, &mut buf);
        }
        file.write_all(&buf).unwrap();
        (file, offsets)
    }

    #[test]
    fn names_sort_in_sequence_order() {
        assert_eq!(file_name(1), "00000000000000000001.seg");
        assert_eq!(parse_name(&file_name(12345)), Some(12345));
        assert_eq!(parse_name("00000000000000000001.seg.tmp"), None);
        assert_eq!(parse_name("1.seg"), None);
        assert!(file_name(9) < file_name(10));
    }

    #[test]
    fn scans_frames_across_chunks_and_stops_at_end() {
        let big = vec![7u8; READ_CHUNK + 10];
        let frames: Vec<(u64, &str, &[u8])> = vec![(1, "a", b"x"), (2, "b", &big), (3, "c", b"yz")];
        let (file, offsets) = segment_with(&frames);
        let len = file.as_file().metadata().unwrap().len();
        let mut scan = Scanner::new(file.as_file(), 0, len);
        for (i, (seq, key, data)) in frames.iter().enumerate() {
            match scan.next().unwrap() {
                Step::Frame { frame, offset } => {
                    assert_eq!((frame.seq, frame.key, frame.data), (*seq, *key, *data));
                    assert_eq!(offset, offsets[i]);
                }
                other => panic!("frame {i}: {other:?}"),
            }
        }
        assert_eq!(scan.next().unwrap(), Step::End);
        assert_eq!(scan.position(), len);
    }

    #[test]
    fn a_cut_frame_is_torn_and_the_scan_can_start_midway() {
        let (file, offsets) = segment_with(&[(1, "a", b"xxxx"), (2, "b", b"yyyy")]);
        let len = file.as_file().metadata().unwrap().len();
        let mut scan = Scanner::new(file.as_file(), offsets[1], len - 1);
        assert_eq!(scan.next().unwrap(), Step::Torn { offset: offsets[1] });
        // A scan told to go past the file's end finds the frame cut short.
        let mut scan = Scanner::new(file.as_file(), 0, len + 100);
        assert!(matches!(scan.next().unwrap(), Step::Frame { .. }));
        assert!(matches!(scan.next().unwrap(), Step::Frame { .. }));
        assert_eq!(scan.next().unwrap(), Step::Torn { offset: len });
    }

    #[test]
    fn counts_whole_frames_in_a_dropped_tail() {
        let mut buf = Vec::new();
        frame::encode(1, 0, "a", b"one", &mut buf);
        frame::encode(2, 0, "a", b"two", &mut buf);
        assert_eq!(count_claimed_frames(&buf), 2);
        assert_eq!(count_claimed_frames(&buf[..buf.len() - 1]), 1);
        assert_eq!(count_claimed_frames(&[0u8; 40]), 0);
    }
}
