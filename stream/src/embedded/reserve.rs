//! A shard's reserved mark: a durable bound on the sequence numbers it handed
//! out, so that numbering never restarts below a consumer's checkpoint.
//!
//! Without sync, records a writer acknowledged (and readers saw, and
//! consumers checkpointed) may be lost in a machine crash, and the segment
//! files then end below numbers already handed out. Were numbering to resume
//! at the end of the files, new records would reuse those numbers and every
//! consumer whose checkpoint lies above them would pass them over as
//! processed. So before it hands out a number at or above the mark, the
//! writer raises the mark by [`STEP`] and syncs it; recovery resumes
//! numbering at the mark when the files end below it, in a new segment named
//! for it (readers step over the gap between segments). A clean close lowers
//! the mark to the next number, so only a crash leaves a gap.
//!
//! ```text
//! <dir>/shard-0000/reserved     "N\n": no number at or above N was handed out
//! ```

use std::path::Path;

use super::files;

pub(crate) const FILE_NAME: &str = "reserved";
const TEMP_NAME: &str = ".reserved.tmp";

/// How far ahead of the numbers handed out the mark is raised: one sync per
/// this many records, against a gap of at most this many numbers after a
/// crash (a reader's lag counts the gap until it steps over it).
pub(crate) const STEP: u64 = 1 << 16;

/// The mark in shard folder `dir`; `None` if there is none (a log that always
/// synced, or one from before the mark existed).
pub(crate) fn read(dir: &Path) -> Result<Option<u64>, String> {
    let path = dir.join(FILE_NAME);
    let text =
        files::read_if_exists(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    text.map(|t| {
        t.trim()
            .parse::<u64>()
            .map_err(|_| format!("{} does not hold a sequence number", path.display()))
    })
    .transpose()
}

/// Replaces the mark, durably.
pub(crate) fn write(dir: &Path, mark: u64) -> Result<(), String> {
    files::write_atomic(dir, FILE_NAME, TEMP_NAME, format!("{mark}\n").as_bytes())
        .map_err(|e| format!("writing {}: {e}", dir.join(FILE_NAME).display()))
}
