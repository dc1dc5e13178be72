//! Small durable-file helpers: atomic replacement and directory syncs.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// Makes a directory's entries (created, renamed or removed files) durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replaces `dir/name` with `contents` so that a crash leaves either the old
/// or the new file, never a mix: write a temporary file, sync it, rename it
/// over the old one, sync the directory. `temp_name` must not collide with
/// any other file's name.
pub(crate) fn write_atomic(
    dir: &Path,
    name: &str,
    temp_name: &str,
    contents: &[u8],
) -> io::Result<()> {
    let temp = dir.join(temp_name);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&temp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temp, dir.join(name))?;
    sync_dir(dir)
}

/// Removes `path`; one that is gone already is not an error, so that a
/// removal interrupted by a crash can simply be done again.
pub(crate) fn remove_if_exists(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The contents of `path`, or `None` if it does not exist.
pub(crate) fn read_if_exists(path: &Path) -> io::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}
