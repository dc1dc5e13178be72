//! What a shard's writer does to its segment files, as two small traits, so
//! that a test can stand a disk that loses unsynced writes under the log.
//!
//! Production uses [`Disk`], plain `std::fs`; the writer is generic over the
//! storage, so the seam costs nothing at run time. Readers and recovery read
//! the files directly: they only need to see what was written, and a test's
//! storage writes through to the real files.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::files;

/// A segment file open for appending.
pub(crate) trait SegmentFile: Send + 'static {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes everything written so far survive a power loss.
    fn sync_data(&self) -> io::Result<()>;
    fn set_len(&self, len: u64) -> io::Result<()>;
}

/// Where a writer gets its segment files.
pub(crate) trait Storage: Clone + Send + 'static {
    type File: SegmentFile;
    /// Opens an existing segment to append to it.
    fn open(&self, path: &Path) -> io::Result<Self::File>;
    /// Creates a segment, emptying any file of that name. Its name is not
    /// durable until [`Storage::sync_dir`].
    fn create(&self, path: &Path) -> io::Result<Self::File>;
    /// Makes a directory's entries durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// The real disk.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Disk;

impl Storage for Disk {
    type File = File;

    fn open(&self, path: &Path) -> io::Result<File> {
        OpenOptions::new().read(true).write(true).open(path)
    }

    fn create(&self, path: &Path) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        files::sync_dir(dir)
    }
}

impl SegmentFile for File {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }
}
