//! The embedded log's own promises: durability across restarts, recovery of
//! damaged tails, segment rolling, retention, and failure handling.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use stream::embedded::{EmbeddedConfig, EmbeddedLog, EmbeddedReader, OpenError};
use stream::{ProduceError, PutOutcome, PutRecord, ReadError, Record, ShardReader, StreamProducer};

const WAIT: Duration = Duration::from_secs(10);

fn one_shard() -> EmbeddedConfig {
    EmbeddedConfig {
        shards: 1,
        ..EmbeddedConfig::default()
    }
}

fn record(key: &str, n: usize, len: usize) -> PutRecord {
    let mut data = format!("{key}/{n}/").into_bytes();
    data.resize(len.max(data.len()), b'.');
    PutRecord {
        partition_key: key.to_owned(),
        data: Bytes::from(data),
    }
}

/// Puts `records` and returns each one's sequence number, failing the test
/// on any failed record.
/// The embedded log numbers records 1, 2, 3, ...: these tests speak u64.
type SeqNo = u64;

fn pos(seq: stream::SeqNo) -> SeqNo {
    seq.to_u64().expect("embedded positions fit a u64")
}

fn s(seq: SeqNo) -> stream::SeqNo {
    stream::SeqNo::from(seq)
}

async fn put(log: &EmbeddedLog, records: Vec<PutRecord>) -> Vec<SeqNo> {
    log.put(records)
        .await
        .unwrap()
        .into_iter()
        .map(|o| match o {
            PutOutcome::Stored { seq, .. } => pos(seq),
            PutOutcome::Failed { message, .. } => panic!("put failed: {message}"),
        })
        .collect()
}

async fn read_n(reader: &mut EmbeddedReader, n: usize) -> Vec<Record> {
    let mut out = Vec::new();
    while out.len() < n {
        let batch = reader.next_batch(n - out.len(), WAIT).await.unwrap();
        assert!(!batch.is_empty(), "got {} of {n} records", out.len());
        out.extend(batch);
    }
    out
}

async fn nothing_more(reader: &mut EmbeddedReader) {
    let batch = reader
        .next_batch(100, Duration::from_millis(20))
        .await
        .unwrap();
    assert!(
        batch.is_empty(),
        "unexpected records {:?}",
        batch.iter().map(|r| pos(r.seq)).collect::<Vec<_>>()
    );
}

fn seqs(records: &[Record]) -> Vec<SeqNo> {
    records.iter().map(|r| pos(r.seq)).collect()
}

fn segments(dir: &Path, shard: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir.join(shard))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn round_trip_with_lag() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path(), EmbeddedConfig::default()).unwrap();
    assert_eq!(
        log.shard_ids(),
        ["shard-0000", "shard-0001", "shard-0002", "shard-0003"]
    );
    let seqs_put = put(&log, (0..5).map(|n| record("dev-1", n, 100)).collect()).await;
    assert_eq!(seqs_put, [1, 2, 3, 4, 5]);

    let mut reader = log.reader(log.shard_of("dev-1"), "lag").unwrap();
    let lag = reader.lag();
    assert_eq!(lag.records_behind, 5);
    let first = read_n(&mut reader, 2).await;
    assert_eq!(lag.oldest_unread_arrival_ms, Some(first[0].arrival_ms));
    assert_eq!(first[0].data.len(), 100);
    assert!(first[0].data.starts_with(b"dev-1/0/"));
    assert_eq!(reader.lag().records_behind, 3);
    read_n(&mut reader, 3).await;
    assert_eq!(reader.lag(), stream::Lag::default());
}

#[tokio::test]
async fn records_in_runs_and_interleaved_go_to_their_keys_shards() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path(), EmbeddedConfig::default()).unwrap();
    // Runs of one key, keys alternating, and a refused record inside a run:
    // a put reuses the shard of the record before only for the same key.
    let keys = [
        "dev-1", "dev-1", "dev-2", "dev-2", "dev-1", "dev-3", "", "dev-3", "dev-4", "dev-1",
        "dev-5", "dev-5", "dev-6",
    ];
    let outcomes = log
        .put(keys.iter().map(|k| record(k, 0, 10)).collect())
        .await
        .unwrap();
    let shards: std::collections::BTreeSet<&str> = keys
        .iter()
        .filter(|k| !k.is_empty())
        .map(|k| log.shard_of(k))
        .collect();
    assert!(
        shards.len() > 1,
        "the keys must span shards to test anything"
    );
    for (key, outcome) in keys.iter().zip(&outcomes) {
        match outcome {
            PutOutcome::Stored { shard, .. } => assert_eq!(shard, log.shard_of(key), "{key}"),
            PutOutcome::Failed { retryable, .. } => assert!(key.is_empty() && !retryable),
        }
    }
}

#[tokio::test]
async fn bad_records_and_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path(), EmbeddedConfig::default()).unwrap();
    let outcomes = log
        .put(vec![
            record("ok", 0, 10),
            PutRecord {
                partition_key: String::new(),
                data: Bytes::from_static(b"x"),
            },
            PutRecord {
                partition_key: "big".into(),
                data: Bytes::from(vec![0u8; 1024 * 1024]),
            },
            record("ok", 1, 10),
        ])
        .await
        .unwrap();
    assert!(matches!(&outcomes[0], PutOutcome::Stored { seq, .. } if pos(*seq) == 1));
    assert!(matches!(
        outcomes[1],
        PutOutcome::Failed {
            retryable: false,
            ..
        }
    ));
    assert!(matches!(
        outcomes[2],
        PutOutcome::Failed {
            retryable: false,
            ..
        }
    ));
    assert!(matches!(&outcomes[3], PutOutcome::Stored { seq, .. } if pos(*seq) == 2));
    assert!(log.put(Vec::new()).await.unwrap().is_empty());

    assert!(matches!(
        log.reader("shard-0009", "c"),
        Err(ReadError::NoSuchShard(_))
    ));
    for bad in ["", ".hidden", "a/b", "../up", &"x".repeat(65)] {
        assert!(
            matches!(
                log.reader("shard-0000", bad),
                Err(ReadError::InvalidArgument(_))
            ),
            "{bad:?}"
        );
    }
    let mut reader = log.reader(log.shard_of("ok"), "c").unwrap();
    assert!(matches!(
        reader.checkpoint(s(3)).await,
        Err(ReadError::InvalidArgument(_))
    ));
}

#[tokio::test]
async fn restart_keeps_records_and_sequence_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let keys: Vec<String> = (0..12).map(|i| format!("dev-{i}")).collect();
    let first: Vec<SeqNo>;
    {
        let log = EmbeddedLog::open(dir.path(), EmbeddedConfig::default()).unwrap();
        first = put(&log, keys.iter().map(|k| record(k, 0, 50)).collect()).await;
        log.close().await.unwrap();
        assert!(matches!(
            log.put(vec![record("dev-0", 9, 5)]).await,
            Err(ProduceError::Closed)
        ));
    }
    // Dropping without close must keep acknowledged records too.
    let second: Vec<SeqNo>;
    {
        let log = EmbeddedLog::open(dir.path(), EmbeddedConfig::default()).unwrap();
        assert!(log.recovery().iter().all(|r| r.truncated_bytes == 0));
        second = put(&log, keys.iter().map(|k| record(k, 1, 50)).collect()).await;
    }
    let log = EmbeddedLog::open(dir.path(), EmbeddedConfig::default()).unwrap();
    for shard in log.shard_ids() {
        let on_shard: Vec<usize> = (0..keys.len())
            .filter(|i| log.shard_of(&keys[*i]) == shard)
            .collect();
        let n = on_shard.len();
        // Numbering went on after the restart instead of starting over.
        let expected: Vec<SeqNo> = (1..=2 * n as SeqNo).collect();
        let mut got: Vec<SeqNo> = on_shard
            .iter()
            .flat_map(|i| [first[*i], second[*i]])
            .collect();
        got.sort();
        assert_eq!(got, expected, "{shard}");
        assert_eq!(
            log.recovery()
                .iter()
                .find(|r| r.shard == shard)
                .map(|r| pos(r.next_seq))
                .unwrap(),
            2 * n as SeqNo + 1
        );
        let mut reader = log.reader(&shard, "restart").unwrap();
        let records = read_n(&mut reader, 2 * n).await;
        assert_eq!(seqs(&records), expected);
        nothing_more(&mut reader).await;
    }
}

/// Five records of key `k` in a one-shard log, closed; returns the segment
/// and the length of one frame.
async fn closed_log_of_five(dir: &Path) -> (PathBuf, u64) {
    let log = EmbeddedLog::open(dir, one_shard()).unwrap();
    put(&log, (0..5).map(|n| record("k", n, 40)).collect()).await;
    log.close().await.unwrap();
    let segment = segments(dir, "shard-0000").remove(0);
    let len = std::fs::metadata(&segment).unwrap().len();
    (segment, len / 5)
}

/// Reopens after damage and checks that `intact` records survive and that
/// numbering resumes right after them.
async fn reopen_after_damage(dir: &Path, intact: usize, truncated: u64, dropped: u64) {
    let log = EmbeddedLog::open(dir, one_shard()).unwrap();
    let report = &log.recovery()[0];
    assert_eq!(report.truncated_bytes, truncated);
    assert_eq!(report.dropped_records, dropped);
    assert_eq!(pos(report.next_seq), intact as SeqNo + 1);
    let mut reader = log.reader("shard-0000", "check").unwrap();
    let records = read_n(&mut reader, intact).await;
    for (n, r) in records.iter().enumerate() {
        assert!(r.data.starts_with(format!("k/{n}/").as_bytes()));
    }
    nothing_more(&mut reader).await;
    assert_eq!(
        put(&log, vec![record("k", 99, 40)]).await,
        [intact as SeqNo + 1]
    );
    let next = read_n(&mut reader, 1).await;
    assert!(next[0].data.starts_with(b"k/99/"));
}

/// Rewrites `segment` as `f` leaves its bytes: what a crash or a bad disk
/// might have left.
fn damage(segment: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = std::fs::read(segment).unwrap();
    f(&mut bytes);
    std::fs::write(segment, bytes).unwrap();
}

#[tokio::test]
async fn a_frame_cut_short_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let (segment, frame) = closed_log_of_five(dir.path()).await;
    damage(&segment, |bytes| bytes.truncate(bytes.len() - 3));
    reopen_after_damage(dir.path(), 4, frame - 3, 0).await;
}

#[tokio::test]
async fn garbage_after_the_last_frame_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let (segment, _) = closed_log_of_five(dir.path()).await;
    damage(&segment, |bytes| {
        bytes.extend(std::iter::repeat_n(0xAB, 37))
    });
    reopen_after_damage(dir.path(), 5, 37, 0).await;
}

#[tokio::test]
async fn the_active_segment_is_written_ahead_and_trimmed_on_close() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path(), one_shard()).unwrap();
    put(&log, (0..5).map(|n| record("k", n, 40)).collect()).await;
    let segment = segments(dir.path(), "shard-0000").remove(0);
    let open_len = std::fs::metadata(&segment).unwrap().len();
    log.close().await.unwrap();
    let closed_len = std::fs::metadata(&segment).unwrap().len();
    assert!(open_len >= 1 << 20, "{open_len} bytes while open");
    assert!(closed_len < 1024, "{closed_len} bytes once closed");
}

/// What a crash leaves after the last frame: the zeros the writer wrote
/// ahead of its records. They are free space, not damage.
#[tokio::test]
async fn zeros_written_ahead_are_kept_not_cut() {
    let dir = tempfile::tempdir().unwrap();
    let (segment, _) = closed_log_of_five(dir.path()).await;
    damage(&segment, |bytes| bytes.extend(std::iter::repeat_n(0, 4096)));
    reopen_after_damage(dir.path(), 5, 0, 0).await;
}

#[tokio::test]
async fn a_frame_cut_short_before_zeros_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let (segment, frame) = closed_log_of_five(dir.path()).await;
    damage(&segment, |bytes| {
        bytes.truncate(bytes.len() - 3);
        bytes.extend(std::iter::repeat_n(0, 4096));
    });
    // The torn frame's header claims a length the zeros fill, so it counts as
    // one dropped record.
    reopen_after_damage(dir.path(), 4, frame - 3 + 4096, 1).await;
}

#[tokio::test]
async fn a_flipped_byte_in_the_last_frame_drops_that_frame() {
    let dir = tempfile::tempdir().unwrap();
    let (segment, frame) = closed_log_of_five(dir.path()).await;
    damage(&segment, |bytes| {
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
    });
    reopen_after_damage(dir.path(), 4, frame, 1).await;
}

#[tokio::test]
async fn checkpoints_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = EmbeddedLog::open(dir.path(), one_shard()).unwrap();
        put(&log, (0..10).map(|n| record("k", n, 10)).collect()).await;
        let mut reader = log.reader("shard-0000", "proc").unwrap();
        let records = read_n(&mut reader, 6).await;
        reader.checkpoint(records[5].seq).await.unwrap();
        log.close().await.unwrap();
    }
    let log = EmbeddedLog::open(dir.path(), one_shard()).unwrap();
    let mut reader = log.reader("shard-0000", "proc").unwrap();
    assert_eq!(pos(reader.position()), 7);
    assert_eq!(seqs(&read_n(&mut reader, 4).await), [7, 8, 9, 10]);
    // No temporary files are left beside the checkpoint.
    let names: Vec<String> = std::fs::read_dir(dir.path().join("shard-0000/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["proc"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_reader_wakes_on_append_and_on_close() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path(), one_shard()).unwrap();
    let mut reader = log.reader("shard-0000", "wake").unwrap();
    let waiting = tokio::spawn(async move {
        let batch = reader.next_batch(10, Duration::from_secs(600)).await;
        (batch, reader)
    });
    put(&log, vec![record("k", 0, 10)]).await;
    let (batch, mut reader) = tokio::time::timeout(WAIT, waiting).await.unwrap().unwrap();
    assert_eq!(seqs(&batch.unwrap()), [1]);

    let waiting =
        tokio::spawn(async move { reader.next_batch(10, Duration::from_secs(600)).await });
    log.close().await.unwrap();
    let closed = tokio::time::timeout(WAIT, waiting).await.unwrap().unwrap();
    assert!(matches!(closed, Err(ReadError::Closed)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_putters() {
    const TASKS: usize = 64;
    const PER_TASK: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path(), EmbeddedConfig::default()).unwrap();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let log = Arc::clone(&log);
        tasks.push(tokio::spawn(async move {
            for n in 0..PER_TASK {
                put(&log, vec![record(&format!("dev-{t}"), n, 100)]).await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let mut total = 0;
    for shard in log.shard_ids() {
        let mut reader = log.reader(&shard, "all").unwrap();
        let behind = reader.lag().records_behind as usize;
        let records = read_n(&mut reader, behind).await;
        assert_eq!(seqs(&records), (1..=behind as SeqNo).collect::<Vec<_>>());
        let mut next = std::collections::HashMap::new();
        for r in &records {
            let n: usize = std::str::from_utf8(&r.data)
                .unwrap()
                .split('/')
                .nth(1)
                .unwrap()
                .parse()
                .unwrap();
            let expected = next.entry(r.partition_key.clone()).or_insert(0);
            assert_eq!(n, *expected, "{}", r.partition_key);
            *expected += 1;
        }
        total += records.len();
    }
    assert_eq!(total, TASKS * PER_TASK);
}

#[tokio::test]
async fn segments_roll_and_far_behind_readers_read_files() {
    let dir = tempfile::tempdir().unwrap();
    let config = EmbeddedConfig {
        segment_bytes: 1024,
        // No cache: every read goes to the segment files.
        tail_cache_bytes: 0,
        ..one_shard()
    };
    {
        let log = EmbeddedLog::open(dir.path(), config.clone()).unwrap();
        for batch in 0..20 {
            put(
                &log,
                (0..10).map(|i| record("k", batch * 10 + i, 100)).collect(),
            )
            .await;
        }
        let files = segments(dir.path(), "shard-0000");
        assert!(files.len() >= 20, "{} segments", files.len());
        for file in &files[..files.len() - 1] {
            assert!(std::fs::metadata(file).unwrap().len() <= 1024);
        }
        let mut reader = log.reader("shard-0000", "files").unwrap();
        let mut records = read_n(&mut reader, 120).await;
        // Behind, with nothing cached, the reader still knows the age of
        // the next record: it read ahead from the files.
        let lag = reader.lag();
        assert_eq!(lag.records_behind, 80);
        let next = lag.oldest_unread_arrival_ms.expect("arrival of record 121");
        records.extend(read_n(&mut reader, 80).await);
        assert_eq!(next, records[120].arrival_ms);
        assert_eq!(seqs(&records), (1..=200).collect::<Vec<SeqNo>>());
        reader.checkpoint(s(57)).await.unwrap();
        nothing_more(&mut reader).await;
        // A reader at the end picks up records appended to the current
        // segment and to segments rolled since it last read.
        put(&log, (200..230).map(|n| record("k", n, 100)).collect()).await;
        assert_eq!(
            seqs(&read_n(&mut reader, 30).await),
            (201..=230).collect::<Vec<SeqNo>>()
        );
    }
    let log = EmbeddedLog::open(dir.path(), config).unwrap();
    let mut reader = log.reader("shard-0000", "files").unwrap();
    let records = read_n(&mut reader, 173).await;
    assert_eq!(seqs(&records), (58..=230).collect::<Vec<SeqNo>>());
    for (r, n) in records.iter().zip(57..) {
        assert!(r.data.starts_with(format!("k/{n}/").as_bytes()));
    }
    assert_eq!(put(&log, vec![record("k", 230, 100)]).await, [231]);
}

fn small_segments() -> EmbeddedConfig {
    EmbeddedConfig {
        segment_bytes: 1024,
        retention_ms: 60_000,
        ..one_shard()
    }
}

/// The first sequence number of each segment of `shard`, oldest first.
fn bases(dir: &Path, shard: &str) -> Vec<SeqNo> {
    segments(dir, shard)
        .iter()
        .map(|p| p.file_stem().unwrap().to_str().unwrap().parse().unwrap())
        .collect()
}

/// A log of 100 records in many small segments, a consumer `slow` that is
/// done with records 1 and 2, and the newest record's arrival time.
async fn hundred_records_and_a_slow_consumer(dir: &Path) -> (Arc<EmbeddedLog>, i64) {
    let log = EmbeddedLog::open(dir, small_segments()).unwrap();
    put(&log, (0..100).map(|n| record("k", n, 100)).collect()).await;
    let mut slow = log.reader("shard-0000", "slow").unwrap();
    let first_two = read_n(&mut slow, 2).await;
    slow.checkpoint(first_two[1].seq).await.unwrap();
    let records = read_n(&mut log.reader("shard-0000", "probe").unwrap(), 100).await;
    log.deregister("probe").unwrap();
    (log, records[99].arrival_ms)
}

#[tokio::test]
async fn a_stalled_consumer_keeps_its_segments_past_age_retention() {
    let dir = tempfile::tempdir().unwrap();
    let (log, newest_arrival) = hundred_records_and_a_slow_consumer(dir.path()).await;
    let before = bases(dir.path(), "shard-0000");
    assert!(before.len() > 3, "{before:?}");

    // Every record is past its retention, but `slow` has read only two.
    let report = log
        .enforce_retention(newest_arrival + 60_001)
        .await
        .unwrap();
    assert_eq!(report, stream::embedded::RetentionReport::default());
    assert_eq!(bases(dir.path(), "shard-0000"), before);

    // After a restart, it reads every record it had not, and lost none.
    log.close().await.unwrap();
    drop(log);
    let log = EmbeddedLog::open(dir.path(), small_segments()).unwrap();
    let mut slow = log.reader("shard-0000", "slow").unwrap();
    assert_eq!(
        seqs(&read_n(&mut slow, 98).await),
        (3..=100).collect::<Vec<_>>()
    );
    assert_eq!(slow.skipped(), 0);
}

#[tokio::test]
async fn a_consumer_past_a_segment_lets_it_go() {
    let dir = tempfile::tempdir().unwrap();
    let (log, newest_arrival) = hundred_records_and_a_slow_consumer(dir.path()).await;
    let before = bases(dir.path(), "shard-0000");
    let mut slow = log.reader("shard-0000", "slow").unwrap();
    let read = read_n(&mut slow, (before[2] - 3) as usize).await;
    let now = newest_arrival + 60_001;

    // One record short of the second segment's end: only the first goes.
    slow.checkpoint(s(before[2] - 2)).await.unwrap();
    assert_eq!(
        log.enforce_retention(now).await.unwrap().segments_deleted,
        1
    );
    assert_eq!(bases(dir.path(), "shard-0000"), before[1..]);
    // Past it: the second goes too, and nothing unread was lost.
    slow.checkpoint(read.last().unwrap().seq).await.unwrap();
    let report = log.enforce_retention(now).await.unwrap();
    assert_eq!((report.segments_deleted, report.dropped.len()), (1, 0));
    assert_eq!(bases(dir.path(), "shard-0000"), before[2..]);
    assert_eq!(log.records_dropped(), [("shard-0000".to_owned(), 0)]);
    assert_eq!(pos(read_n(&mut slow, 1).await[0].seq), before[2]);
    assert_eq!(slow.skipped(), 0);
}

#[tokio::test]
async fn the_disk_budget_drops_the_oldest_unread_segment_and_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = hundred_records_and_a_slow_consumer(dir.path()).await;
    // A consumer that has read everything costs nothing when data goes.
    let mut done = log.reader("shard-0000", "done").unwrap();
    let all = read_n(&mut done, 100).await;
    done.checkpoint(all[99].seq).await.unwrap();
    let oldest_arrival = all[0].arrival_ms;
    drop(done);
    // Closing trims the segment being written, so file sizes are exact.
    log.close().await.unwrap();
    drop(log);
    let sizes: Vec<u64> = segments(dir.path(), "shard-0000")
        .iter()
        .map(|p| p.metadata().unwrap().len())
        .collect();
    let before = bases(dir.path(), "shard-0000");
    let budget = sizes.iter().sum::<u64>() - sizes[0];
    let log = EmbeddedLog::open(
        dir.path(),
        EmbeddedConfig {
            max_bytes: Some(budget),
            ..small_segments()
        },
    )
    .unwrap();

    // Nothing is old enough for age retention: the budget alone deletes the
    // first segment, whose records 3.. `slow` had not read.
    let report = log.enforce_retention(oldest_arrival).await.unwrap();
    let lost = before[1] - 3;
    assert_eq!(report.segments_deleted, 1);
    assert_eq!(
        report.dropped,
        [stream::embedded::DroppedRange {
            shard: "shard-0000".into(),
            first_seq: s(3),
            last_seq: s(before[1] - 1),
            records: lost,
            consumers: vec!["slow".into()],
            last_arrival_ms: report.dropped[0].last_arrival_ms,
        }]
    );
    assert_eq!(log.records_dropped(), [("shard-0000".to_owned(), lost)]);
    assert_eq!(log.last_dropped(), Some(report.dropped[0].clone()));
    assert_eq!(bases(dir.path(), "shard-0000"), before[1..]);
    // Within budget now: another run deletes nothing.
    let again = log.enforce_retention(oldest_arrival).await.unwrap();
    assert_eq!(again.segments_deleted, 0);

    // The consumer moves on past the hole and counts what it lost.
    let mut slow = log.reader("shard-0000", "slow").unwrap();
    assert_eq!(slow.skipped(), lost);
    assert_eq!(pos(read_n(&mut slow, 1).await[0].seq), before[1]);
}

#[tokio::test]
async fn the_disk_budget_deletes_read_segments_before_older_unread_ones() {
    let dir = tempfile::tempdir().unwrap();
    let two = EmbeddedConfig {
        shards: 2,
        ..small_segments()
    };
    let log = EmbeddedLog::open(dir.path(), two.clone()).unwrap();
    let key_in = |shard: &str| {
        (0..)
            .map(|i| format!("dev-{i}"))
            .find(|k| log.shard_of(k) == shard)
            .unwrap()
    };
    let (unread_key, read_key) = (key_in("shard-0001"), key_in("shard-0000"));
    // The unread shard's records are the older ones.
    put(&log, (0..50).map(|n| record(&unread_key, n, 100)).collect()).await;
    put(&log, (0..50).map(|n| record(&read_key, n, 100)).collect()).await;
    let _registered = log.reader("shard-0001", "app").unwrap();
    let mut reader = log.reader("shard-0000", "app").unwrap();
    let read = read_n(&mut reader, 50).await;
    reader.checkpoint(read[49].seq).await.unwrap();
    drop((reader, _registered));
    log.close().await.unwrap();
    drop(log);
    let closed_bytes = |shard: &str| -> u64 {
        let files = segments(dir.path(), shard);
        files[..files.len() - 1]
            .iter()
            .map(|p| p.metadata().unwrap().len())
            .sum()
    };
    let total: u64 = ["shard-0000", "shard-0001"]
        .iter()
        .flat_map(|s| segments(dir.path(), s))
        .map(|p| p.metadata().unwrap().len())
        .sum();
    let unread_before = bases(dir.path(), "shard-0001");
    let log = EmbeddedLog::open(
        dir.path(),
        EmbeddedConfig {
            max_bytes: Some(total - closed_bytes("shard-0000")),
            ..two
        },
    )
    .unwrap();

    let report = log.enforce_retention(0).await.unwrap();
    assert!(report.segments_deleted > 0);
    assert_eq!(report.dropped, []);
    assert_eq!(segments(dir.path(), "shard-0000").len(), 1);
    assert_eq!(bases(dir.path(), "shard-0001"), unread_before);
}

#[tokio::test]
async fn a_failed_write_fails_its_records_and_the_log_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let config = EmbeddedConfig {
        segment_bytes: 100,
        ..one_shard()
    };
    let log = EmbeddedLog::open(dir.path(), config).unwrap();
    assert_eq!(put(&log, vec![record("k", 0, 80)]).await, [1]);
    // The next record needs a new segment; a directory in the way of its
    // file makes creating it fail.
    let blocker = dir.path().join("shard-0000/00000000000000000002.seg");
    std::fs::create_dir(&blocker).unwrap();
    let outcomes = log
        .put(vec![record("k", 1, 80), record("k", 2, 80)])
        .await
        .unwrap();
    for outcome in &outcomes {
        assert!(
            matches!(
                outcome,
                PutOutcome::Failed {
                    retryable: true,
                    ..
                }
            ),
            "{outcome:?}"
        );
    }
    let mut reader = log.reader("shard-0000", "after").unwrap();
    assert_eq!(seqs(&read_n(&mut reader, 1).await), [1]);
    nothing_more(&mut reader).await;

    std::fs::remove_dir(&blocker).unwrap();
    assert_eq!(
        put(&log, vec![record("k", 1, 80), record("k", 2, 80)]).await,
        [2, 3]
    );
    let records = read_n(&mut reader, 2).await;
    assert!(records[0].data.starts_with(b"k/1/") && records[1].data.starts_with(b"k/2/"));
}

#[tokio::test]
async fn opening_checks_shard_count_and_exclusive_use() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path(), EmbeddedConfig::default()).unwrap();
    assert!(matches!(
        EmbeddedLog::open(dir.path(), EmbeddedConfig::default()),
        Err(OpenError::Locked { .. })
    ));
    log.close().await.unwrap();
    let mismatch = EmbeddedLog::open(
        dir.path(),
        EmbeddedConfig {
            shards: 8,
            ..EmbeddedConfig::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            mismatch,
            OpenError::ShardCountMismatch {
                on_disk: 4,
                configured: 8,
                ..
            }
        ),
        "{mismatch}"
    );
    // Released on close: the same settings open again.
    drop(log);
    EmbeddedLog::open(dir.path(), EmbeddedConfig::default()).unwrap();
    assert!(matches!(
        EmbeddedLog::open(
            &dir.path().join("other"),
            EmbeddedConfig {
                shards: 0,
                ..EmbeddedConfig::default()
            }
        ),
        Err(OpenError::InvalidConfig(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_next_batch_loses_nothing() {
    const RECORDS: usize = 12_000;
    let dir = tempfile::tempdir().unwrap();
    let config = EmbeddedConfig {
        tail_cache_bytes: 0,
        ..one_shard()
    };
    let log = EmbeddedLog::open(dir.path(), config).unwrap();
    put(&log, (0..RECORDS).map(|n| record("k", n, 20)).collect()).await;
    let mut reader = log.reader("shard-0000", "cancel").unwrap();
    let mut got = Vec::new();
    // Every other call is dropped at its first await, as a select! on
    // shutdown would drop it; batch sizes vary so that some calls start with
    // too few records read ahead and must read the files again.
    for (i, max) in [1000, 1700, 300, 2500, 900].into_iter().cycle().enumerate() {
        if got.len() == RECORDS || i == 40 {
            break;
        }
        let call = reader.next_batch(max, WAIT);
        if i % 2 == 0 {
            got.extend(call.await.unwrap());
        } else if let Ok(batch) = tokio::time::timeout(Duration::ZERO, call).await {
            got.extend(batch.unwrap());
        }
    }
    let rest = RECORDS - got.len();
    got.extend(read_n(&mut reader, rest).await);
    assert_eq!(seqs(&got), (1..=RECORDS as SeqNo).collect::<Vec<SeqNo>>());
    nothing_more(&mut reader).await;
}

#[tokio::test]
async fn each_group_commit_is_one_sync_and_the_zeros_ahead_count_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path(), one_shard()).unwrap();
    // Each put is awaited before the next starts, so each is its own group.
    for n in 0..3 {
        put(&log, vec![record("dev-a", n, 100)]).await;
    }
    let io = log.writer_io();
    assert_eq!(io.len(), 1);
    assert_eq!(io[0].syncs, 3);
    let mut metrics = String::new();
    log.render_metrics(&mut metrics);
    assert!(
        metrics.contains("iotpipe_stream_syncs_completed_total{shard=\"shard-0000\"} 3\n"),
        "{metrics}"
    );
    let written = io[0].bytes_written;
    assert!(
        metrics.contains(&format!(
            "iotpipe_stream_segment_written_bytes_total{{shard=\"shard-0000\"}} {written}\n"
        )),
        "{metrics}"
    );
    // Closing cuts the zeros and syncs once more; the file then holds the
    // three frames.
    log.close().await.unwrap();
    assert_eq!(log.writer_io()[0].syncs, 4);
    let segment = std::fs::read_dir(dir.path().join("shard-0000"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "seg"))
        .unwrap();
    let frame = std::fs::metadata(segment).unwrap().len() / 3;
    // The first group wrote its frame and zeros up to the first 1 MiB step;
    // the other two overwrote zeros.
    assert_eq!(written, (1 << 20) + 2 * frame);
}

#[tokio::test]
async fn without_sync_group_commits_do_not_sync() {
    let dir = tempfile::tempdir().unwrap();
    let config = EmbeddedConfig {
        sync: false,
        ..one_shard()
    };
    let log = EmbeddedLog::open(dir.path(), config).unwrap();
    for n in 0..3 {
        put(&log, vec![record("dev-a", n, 100)]).await;
    }
    assert_eq!(log.writer_io()[0].syncs, 0);
    assert!(log.writer_io()[0].bytes_written > 300);
}
