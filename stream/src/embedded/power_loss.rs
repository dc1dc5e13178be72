//! A disk that loses every write not yet synced when its power is cut, and
//! the crash tests that need one.
//!
//! Killing the process cannot tell a log that syncs from one that does not:
//! the kernel keeps what was written either way. [`PowerLossDisk`] stands
//! under the shard writers (see `storage`) and remembers, per segment file,
//! what was written and what was synced; [`PowerLossDisk::cut`] turns it off
//! (every later write or sync fails), and [`PowerLossDisk::restore`] leaves
//! each file as it was last synced, and removes files whose names were never
//! made durable, as a machine that lost power would.
//!
//! What it covers: segment data and the creation of segment files, the only
//! writes the log makes without syncing at once. Checkpoints, the meta file
//! and the reserved mark are written with [`super::files::write_atomic`],
//! which syncs before it returns, so a power loss leaves them as written.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

use super::storage::{SegmentFile, Storage};
use super::{EmbeddedConfig, EmbeddedLog};
use crate::{PutOutcome, PutRecord, SeqNo, ShardReader, StreamProducer};

/// A disk whose power a test can cut. Clones share the disk.
#[derive(Debug, Clone, Default)]
pub(crate) struct PowerLossDisk {
    state: Arc<Mutex<DiskState>>,
}

#[derive(Debug, Default)]
struct DiskState {
    off: bool,
    /// Every file the writers opened or created.
    files: HashMap<PathBuf, Image>,
    /// Files created since their directory was last synced.
    unsynced_names: HashSet<PathBuf>,
}

/// One file's bytes: as written, and as a power loss would leave them.
#[derive(Debug, Default)]
struct Image {
    written: Vec<u8>,
    synced: Vec<u8>,
}

impl PowerLossDisk {
    fn state(&self) -> MutexGuard<'_, DiskState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state, if the power is on.
    fn powered(&self) -> io::Result<MutexGuard<'_, DiskState>> {
        let state = self.state();
        if state.off {
            return Err(io::Error::other("the power is off"));
        }
        Ok(state)
    }

    /// Cuts the power: from now on every write and sync fails.
    pub(crate) fn cut(&self) {
        self.state().off = true;
    }

    /// Brings the files back as the power loss left them.
    pub(crate) fn restore(&self) -> io::Result<()> {
        let state = self.state();
        for (path, image) in &state.files {
            if state.unsynced_names.contains(path) {
                std::fs::remove_file(path)?;
            } else {
                std::fs::write(path, &image.synced)?;
            }
        }
        Ok(())
    }

    fn track(&self, path: &Path, file: File, existing: Vec<u8>) -> PowerLossFile {
        PowerLossFile {
            path: path.to_owned(),
            file,
            disk: self.clone(),
        }
        .tracked(existing)
    }
}

impl Storage for PowerLossDisk {
    type File = PowerLossFile;

    fn open(&self, path: &Path) -> io::Result<PowerLossFile> {
        let _on = self.powered()?;
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        // What a file held when the log opened it had survived already.
        let existing = std::fs::read(path)?;
        drop(_on);
        Ok(self.track(path, file, existing))
    }

    fn create(&self, path: &Path) -> io::Result<PowerLossFile> {
        let mut state = self.powered()?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        state.unsynced_names.insert(path.to_owned());
        drop(state);
        Ok(self.track(path, file, Vec::new()))
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.powered()?;
        state.unsynced_names.retain(|p| p.parent() != Some(dir));
        Ok(())
    }
}

/// A segment file on a [`PowerLossDisk`]: writes go through to the real file
/// (readers read it directly) and into the disk's image of it.
#[derive(Debug)]
pub(crate) struct PowerLossFile {
    path: PathBuf,
    file: File,
    disk: PowerLossDisk,
}

impl PowerLossFile {
    fn tracked(self, existing: Vec<u8>) -> Self {
        self.disk.state().files.insert(
            self.path.clone(),
            Image {
                written: existing.clone(),
                synced: existing,
            },
        );
        self
    }

    fn image<'a>(&self, state: &'a mut DiskState) -> &'a mut Image {
        state.files.entry(self.path.clone()).or_default()
    }
}

impl SegmentFile for PowerLossFile {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut state = self.disk.powered()?;
        FileExt::write_all_at(&self.file, buf, offset)?;
        let image = &mut self.image(&mut state).written;
        let (start, end) = (offset as usize, offset as usize + buf.len());
        if image.len() < end {
            image.resize(end, 0);
        }
        image[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut state = self.disk.powered()?;
        let image = self.image(&mut state);
        image.synced = image.written.clone();
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut state = self.disk.powered()?;
        self.file.set_len(len)?;
        self.image(&mut state).written.resize(len as usize, 0);
        Ok(())
    }
}

#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const SHARD: &str = "shard-0000";
    const PUTTERS: usize = 4;
    /// Records acknowledged before the power goes: several segments' worth.
    const ACKED_BEFORE_CUT: usize = 300;

    /// Segments small enough that the run rolls over several of them.
    const SMALL_SEGMENTS: u64 = 16 * 1024;
    /// A segment that holds the whole run, so nothing rolls (a roll syncs
    /// the closed segment whatever the setting).
    const ONE_SEGMENT: u64 = 4 * 1024 * 1024;

    fn config(sync: bool) -> EmbeddedConfig {
        config_with(sync, SMALL_SEGMENTS)
    }

    fn config_with(sync: bool, segment_bytes: u64) -> EmbeddedConfig {
        EmbeddedConfig {
            shards: 1,
            segment_bytes,
            sync,
            ..EmbeddedConfig::default()
        }
    }

    fn record(key: &str, n: usize) -> PutRecord {
        let mut data = format!("{key}/{n}/").into_bytes();
        data.resize(100, b'.');
        PutRecord {
            partition_key: key.to_owned(),
            data: Bytes::from(data),
        }
    }

    fn seq(s: SeqNo) -> u64 {
        s.to_u64().expect("embedded positions fit a u64")
    }

    /// Every record the shard holds, read for consumer `consumer`. The log
    /// was just opened, so everything readable is readable without waiting.
    async fn read_all(log: &EmbeddedLog, consumer: &str) -> Vec<(u64, Bytes)> {
        let mut reader = log.reader(SHARD, consumer).unwrap();
        let mut out = Vec::new();
        loop {
            let batch = reader.next_batch(1000, Duration::ZERO).await.unwrap();
            if batch.is_empty() {
                return out;
            }
            out.extend(batch.into_iter().map(|r| (seq(r.seq), r.data)));
        }
    }

    /// Everything `consumer` has not processed yet, then checkpointed.
    async fn process_all(log: &EmbeddedLog, consumer: &str) -> Vec<Bytes> {
        let mut reader = log.reader(SHARD, consumer).unwrap();
        let mut out = Vec::new();
        loop {
            let batch = reader.next_batch(1000, Duration::ZERO).await.unwrap();
            let Some(last) = batch.last() else {
                return out;
            };
            reader.checkpoint(last.seq).await.unwrap();
            out.extend(batch.into_iter().map(|r| r.data));
        }
    }

    /// Putters append until the power goes; returns what was acknowledged.
    async fn put_until_cut(log: Arc<EmbeddedLog>, disk: &PowerLossDisk) -> Vec<(u64, Bytes)> {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let (count_tx, mut count) = watch::channel(0usize);
        let mut putters = Vec::new();
        for p in 0..PUTTERS {
            let (log, acked, count_tx) = (log.clone(), acked.clone(), count_tx.clone());
            putters.push(tokio::spawn(async move {
                for n in 0..1000 {
                    let records: Vec<PutRecord> = (0..3)
                        .map(|i| record(&format!("k{p}"), 3 * n + i))
                        .collect();
                    let outcomes = log.put(records.clone()).await.unwrap();
                    for (record, outcome) in records.into_iter().zip(outcomes) {
                        let PutOutcome::Stored { seq: s, .. } = outcome else {
                            return;
                        };
                        let mut acked = acked.lock().unwrap();
                        acked.push((seq(s), record.data));
                        count_tx.send_replace(acked.len());
                    }
                }
            }));
        }
        count.wait_for(|n| *n >= ACKED_BEFORE_CUT).await.unwrap();
        disk.cut();
        for putter in putters {
            putter.await.unwrap();
        }
        acked.lock().unwrap().clone()
    }

    /// Appends from several tasks, cuts the power mid-stream, restores the
    /// disk and reopens: returns the acknowledged records that are missing
    /// or changed, and how many were acknowledged.
    async fn acknowledged_but_lost(sync: bool, segment_bytes: u64) -> (Vec<u64>, usize) {
        let dir = tempfile::tempdir().unwrap();
        let disk = PowerLossDisk::default();
        let log = EmbeddedLog::open_on(dir.path(), config_with(sync, segment_bytes), disk.clone())
            .unwrap();
        let acked = put_until_cut(log.clone(), &disk).await;
        drop(log);
        disk.restore().unwrap();

        let log = EmbeddedLog::open(dir.path(), config_with(sync, segment_bytes)).unwrap();
        let kept: HashMap<u64, Bytes> = read_all(&log, "check").await.into_iter().collect();
        let lost = acked
            .iter()
            .filter(|(s, data)| kept.get(s) != Some(data))
            .map(|(s, _)| *s)
            .collect();
        (lost, acked.len())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_sync_every_acknowledged_record_survives_a_power_loss() {
        let (lost, acked) = acknowledged_but_lost(true, SMALL_SEGMENTS).await;
        assert!(acked >= ACKED_BEFORE_CUT);
        assert_eq!(lost, Vec::<u64>::new(), "of {acked} acknowledged");
    }

    /// The same run without sync: the disk layer is what tells them apart.
    /// In one segment, so that no roll-over syncs part of the run and the
    /// loss does not hang on where the cut falls.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_sync_a_power_loss_loses_acknowledged_records() {
        let (lost, acked) = acknowledged_but_lost(false, ONE_SEGMENT).await;
        assert!(!lost.is_empty(), "none of {acked} acknowledged was lost");
    }

    /// Without sync a crash may lose acknowledged records; it must not make
    /// new ones look processed. A consumer checkpointed every record, the
    /// power went and took them; records appended after the restart get
    /// numbers above the checkpoint, and the consumer reads them all. Twice,
    /// so a restart after a restart holds too.
    #[tokio::test]
    async fn without_sync_numbering_resumes_above_every_checkpoint_after_a_power_loss() {
        let dir = tempfile::tempdir().unwrap();
        let mut checkpoint = 0;
        for round in 0..2 {
            let disk = PowerLossDisk::default();
            let log = EmbeddedLog::open_on(dir.path(), config(false), disk.clone()).unwrap();
            let records: Vec<PutRecord> =
                (0..10).map(|n| record(&format!("r{round}"), n)).collect();
            let stored = log.put(records).await.unwrap();
            let mut reader = log.reader(SHARD, "proc").unwrap();
            let batch = reader.next_batch(100, Duration::ZERO).await.unwrap();
            assert_eq!(batch.len(), 10, "round {round}");
            let PutOutcome::Stored { seq: last, .. } = &stored[9] else {
                panic!("{stored:?}")
            };
            assert!(seq(*last) > checkpoint);
            checkpoint = seq(*last);
            reader.checkpoint(*last).await.unwrap();
            disk.cut();
            drop(reader);
            drop(log);
            disk.restore().unwrap();

            let log = EmbeddedLog::open(dir.path(), config(false)).unwrap();
            let after: Vec<PutRecord> = (0..3).map(|n| record("after", n)).collect();
            let outcomes = log.put(after.clone()).await.unwrap();
            for outcome in &outcomes {
                let PutOutcome::Stored { seq: s, .. } = outcome else {
                    panic!("{outcome:?}")
                };
                assert!(
                    seq(*s) > checkpoint,
                    "{s} reuses a number at or below {checkpoint}"
                );
            }
            let read = process_all(&log, "proc").await;
            let expected: Vec<Bytes> = after.into_iter().map(|r| r.data).collect();
            assert_eq!(
                read, expected,
                "round {round}: the consumer reads every new record"
            );
            assert!(log.recovery()[0].numbers_skipped > 0, "round {round}");
            log.close().await.unwrap();
        }
    }

    /// A consumer behind the crash reads what survived, then steps over the
    /// gap to the new records, in order; one that had read everything that
    /// survived reads the new records once each. What survived is what a clean close
    /// made durable, so the segment recovery resumes after holds records (and
    /// the tail cache too, with the gap right after them).
    #[tokio::test]
    async fn a_consumer_behind_the_crash_reads_the_survivors_then_the_new_records() {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(dir.path(), config(false)).unwrap();
        let durable: Vec<PutRecord> = (0..250).map(|n| record("durable", n)).collect();
        for r in &durable {
            log.put(vec![r.clone()]).await.unwrap();
        }
        let mut slow = log.reader(SHARD, "slow").unwrap();
        let first = slow.next_batch(5, Duration::ZERO).await.unwrap();
        slow.checkpoint(first[4].seq).await.unwrap();
        drop(slow);
        assert_eq!(process_all(&log, "caught-up").await.len(), 250);
        log.close().await.unwrap();
        drop(log);

        let disk = PowerLossDisk::default();
        let log = EmbeddedLog::open_on(dir.path(), config(false), disk.clone()).unwrap();
        for n in 0..100 {
            log.put(vec![record("lost", n)]).await.unwrap();
        }
        disk.cut();
        drop(log);
        disk.restore().unwrap();

        let log = EmbeddedLog::open(dir.path(), config(false)).unwrap();
        log.put((0..3).map(|n| record("new", n)).collect())
            .await
            .unwrap();
        let mut expected: Vec<Bytes> = durable[5..].iter().map(|r| r.data.clone()).collect();
        expected.extend((0..3).map(|n| record("new", n).data));
        assert_eq!(process_all(&log, "slow").await, expected);
        assert_eq!(process_all(&log, "caught-up").await, expected[245..]);
        let seqs: Vec<u64> = read_all(&log, "again")
            .await
            .iter()
            .map(|(s, _)| *s)
            .collect();
        assert_eq!(seqs.len(), 253);
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    }

    #[tokio::test]
    async fn without_sync_a_clean_restart_leaves_no_gap() {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(dir.path(), config(false)).unwrap();
        log.put((0..5).map(|n| record("k", n)).collect())
            .await
            .unwrap();
        log.close().await.unwrap();
        drop(log);
        let log = EmbeddedLog::open(dir.path(), config(false)).unwrap();
        let report = &log.recovery()[0];
        assert_eq!((seq(report.next_seq), report.numbers_skipped), (6, 0));
    }
}
