//! The contract of [`StreamProducer`] and [`ShardReader`], as async checks
//! that every backend runs against itself in its tests.
//!
//! A backend's test implements [`Harness`] over a fresh, empty stream and
//! calls each check (or [`run_all`]), or has
//! [`stream_conformance_tests!`](crate::stream_conformance_tests) write one
//! test per check. Checks return a [`Violation`] instead of
//! panicking, put modest numbers of records (a stand-in server may be slow),
//! and wait on the stream itself, never on sleeps.
//!
//! What is checked:
//! - [`round_trip`]: every record put is read back once, from the shard and
//!   with the sequence number its outcome named; a new consumer starts at the
//!   oldest record.
//! - [`order_per_partition_key`]: a key's records come back in put order,
//!   all from one shard.
//! - [`sequence_increases_per_shard`]: sequence numbers increase strictly in
//!   read order.
//! - [`checkpoint_resume`]: a reader resumes after its consumer's checkpoint;
//!   other consumers are independent.
//! - [`batch_limits`]: a batch never exceeds `max`, and batches continue
//!   without gaps or repeats.
//! - [`wait_returns_empty_on_timeout`]: with nothing to read, `next_batch`
//!   waits the full `wait` and returns an empty batch.
//! - [`waiting_reader_wakes_on_put`]: a reader waiting in `next_batch` gets a
//!   record put meanwhile, well before its wait ends.
//! - [`concurrent_putters`]: many tasks putting at once lose, repeat and
//!   reorder nothing.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;

use stream::{PutOutcome, PutRecord, ReadError, Record, SeqNo, ShardReader, StreamProducer};

/// One `#[tokio::test]` per check, named after it, each against a fresh
/// harness that `$make` (an expression, `.await` allowed) builds.
#[macro_export]
macro_rules! stream_conformance_tests {
    ($make:expr) => {
        $crate::stream_conformance_tests!(@current $make;
            round_trip,
            order_per_partition_key,
            sequence_increases_per_shard,
            checkpoint_resume,
            batch_limits,
            wait_returns_empty_on_timeout
        );
        // These two race a reader against putters: give them two threads.
        $crate::stream_conformance_tests!(@multi $make;
            waiting_reader_wakes_on_put,
            concurrent_putters
        );
    };
    (@current $make:expr; $($check:ident),*) => {$(
        #[tokio::test]
        async fn $check() {
            $crate::stream_conformance::$check(&$make).await.unwrap();
        }
    )*};
    (@multi $make:expr; $($check:ident),*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $check() {
            $crate::stream_conformance::$check(&$make).await.unwrap();
        }
    )*};
}

/// How long a check waits for records it knows were stored. Generous: a
/// polling backend against a stand-in server can take a while, and a
/// conforming backend returns as soon as they are there.
const ARRIVAL_WAIT: Duration = Duration::from_secs(10);

/// A backend under test, over a stream that is empty when the check starts.
#[async_trait]
pub trait Harness: Send + Sync {
    fn producer(&self) -> Arc<dyn StreamProducer>;
    fn shard_ids(&self) -> Vec<String>;
    async fn reader(&self, shard: &str, consumer: &str) -> Result<Box<dyn ShardReader>, ReadError>;
}

/// A broken promise of the contract.
#[derive(Debug, thiserror::Error)]
#[error("{check}: {message}")]
pub struct Violation {
    pub check: &'static str,
    pub message: String,
}

fn violation(check: &'static str, message: impl Into<String>) -> Violation {
    Violation {
        check,
        message: message.into(),
    }
}

fn ensure(
    check: &'static str,
    ok: bool,
    message: impl FnOnce() -> String,
) -> Result<(), Violation> {
    if ok {
        Ok(())
    } else {
        Err(violation(check, message()))
    }
}

/// Runs every check, each against a fresh stream from `make`.
pub async fn run_all<H, F, Fut>(make: F) -> Result<(), Violation>
where
    H: Harness,
    F: Fn() -> Fut,
    Fut: Future<Output = H>,
{
    round_trip(&make().await).await?;
    order_per_partition_key(&make().await).await?;
    sequence_increases_per_shard(&make().await).await?;
    checkpoint_resume(&make().await).await?;
    batch_limits(&make().await).await?;
    wait_returns_empty_on_timeout(&make().await).await?;
    waiting_reader_wakes_on_put(&make().await).await?;
    concurrent_putters(&make().await).await?;
    Ok(())
}

/// Record `n` of partition key `key`: its data, `{key}/{n}`, tells a read
/// which record it is ([`number_of`]). Backends' own tests put these too.
pub fn record(key: &str, n: usize) -> PutRecord {
    PutRecord {
        partition_key: key.to_owned(),
        data: Bytes::from(format!("{key}/{n}")),
    }
}

/// The `n` a record's data carries, as [`record`] wrote it.
fn number_of(check: &'static str, record: &Record) -> Result<usize, Violation> {
    std::str::from_utf8(&record.data)
        .ok()
        .and_then(|text| text.strip_prefix(&format!("{}/", record.partition_key)))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| {
            violation(
                check,
                format!("record {} has data it was not put with", record.seq),
            )
        })
}

/// Puts `records` and returns where each was stored; any failure violates
/// the check.
async fn put_all(
    check: &'static str,
    h: &dyn Harness,
    records: Vec<PutRecord>,
) -> Result<Vec<(String, SeqNo)>, Violation> {
    put_stored(check, h.producer().as_ref(), records).await
}

/// Puts `records` into `producer` and returns the shard and sequence number
/// each was stored at; a failed put or record violates `check`.
pub async fn put_stored(
    check: &'static str,
    producer: &dyn StreamProducer,
    records: Vec<PutRecord>,
) -> Result<Vec<(String, SeqNo)>, Violation> {
    let n = records.len();
    let outcomes = producer
        .put(records)
        .await
        .map_err(|e| violation(check, format!("put failed: {e}")))?;
    ensure(check, outcomes.len() == n, || {
        format!("put of {n} records returned {} outcomes", outcomes.len())
    })?;
    outcomes
        .into_iter()
        .map(|o| match o {
            PutOutcome::Stored { shard, seq } => Ok((shard, seq)),
            PutOutcome::Failed { message, .. } => {
                Err(violation(check, format!("a record failed: {message}")))
            }
        })
        .collect()
}

/// Reads `expected` records from `reader`, in batches of up to `max`.
async fn read_n(
    check: &'static str,
    reader: &mut dyn ShardReader,
    expected: usize,
    max: usize,
) -> Result<Vec<Record>, Violation> {
    let mut out = Vec::new();
    while out.len() < expected {
        let batch = reader
            .next_batch(max, ARRIVAL_WAIT)
            .await
            .map_err(|e| violation(check, format!("next_batch on {}: {e}", reader.shard_id())))?;
        ensure(check, !batch.is_empty(), || {
            format!(
                "{} returned {} of {expected} stored records, then nothing for {ARRIVAL_WAIT:?}",
                reader.shard_id(),
                out.len()
            )
        })?;
        ensure(check, batch.len() <= max, || {
            format!("next_batch({max}) returned {} records", batch.len())
        })?;
        out.extend(batch);
    }
    ensure(check, out.len() == expected, || {
        format!(
            "{} returned {} records, {expected} were stored",
            reader.shard_id(),
            out.len()
        )
    })?;
    Ok(out)
}

/// Reads every shard with `consumer`, expecting `per_shard[shard]` records
/// from each.
async fn read_shards(
    check: &'static str,
    h: &dyn Harness,
    consumer: &str,
    stored: &[(String, SeqNo)],
) -> Result<BTreeMap<String, Vec<Record>>, Violation> {
    let shard_ids = h.shard_ids();
    let mut out = BTreeMap::new();
    for shard in &shard_ids {
        let expected = stored.iter().filter(|(s, _)| s == shard).count();
        let mut reader = open_reader(check, h, shard, consumer).await?;
        let records = read_n(check, reader.as_mut(), expected, 1000).await?;
        out.insert(shard.clone(), records);
    }
    for (shard, _) in stored {
        ensure(check, shard_ids.contains(shard), || {
            format!("a record was stored in {shard}, which is not among the shards {shard_ids:?}")
        })?;
    }
    Ok(out)
}

async fn open_reader(
    check: &'static str,
    h: &dyn Harness,
    shard: &str,
    consumer: &str,
) -> Result<Box<dyn ShardReader>, Violation> {
    h.reader(shard, consumer)
        .await
        .map_err(|e| violation(check, format!("opening a reader of {shard}: {e}")))
}

/// Every record put is read back once, from the shard and with the sequence
/// number its outcome named, by a consumer that started after the puts.
pub async fn round_trip(h: &dyn Harness) -> Result<(), Violation> {
    const CHECK: &str = "round_trip";
    let records: Vec<PutRecord> = (0..20)
        .map(|i| record(&format!("rt-{}", i % 5), i))
        .collect();
    let stored = put_all(CHECK, h, records.clone()).await?;
    let read = read_shards(CHECK, h, "round-trip", &stored).await?;
    for (put, (shard, seq)) in records.iter().zip(&stored) {
        let found = read[shard].iter().find(|r| r.seq == *seq).ok_or_else(|| {
            violation(
                CHECK,
                format!("record stored as {shard}/{seq} was not read back"),
            )
        })?;
        ensure(
            CHECK,
            found.partition_key == put.partition_key && found.data == put.data,
            || format!("{shard}/{seq} came back as {:?}, not as put", found.data),
        )?;
        ensure(CHECK, found.arrival_ms > 0, || {
            format!("{shard}/{seq} has no arrival time")
        })?;
    }
    Ok(())
}

/// A key's records come back in put order, all from one shard, across put
/// calls and with other keys interleaved.
pub async fn order_per_partition_key(h: &dyn Harness) -> Result<(), Violation> {
    const CHECK: &str = "order_per_partition_key";
    let mut stored = Vec::new();
    let mut next = [0usize; 8];
    for _call in 0..3 {
        let mut records = Vec::new();
        for _round in 0..4 {
            for (k, n) in next.iter_mut().enumerate() {
                records.push(record(&format!("order-{k}"), *n));
                *n += 1;
            }
        }
        stored.extend(put_all(CHECK, h, records).await?);
    }
    let read = read_shards(CHECK, h, "order", &stored).await?;
    let mut seen: BTreeMap<String, (String, usize)> = BTreeMap::new();
    for (shard, records) in &read {
        for r in records {
            let n = number_of(CHECK, r)?;
            let expected = match seen.get(&r.partition_key) {
                Some((first_shard, last)) => {
                    ensure(CHECK, first_shard == shard, || {
                        format!(
                            "key {} is in both {first_shard} and {shard}",
                            r.partition_key
                        )
                    })?;
                    last + 1
                }
                None => 0,
            };
            ensure(CHECK, n == expected, || {
                format!(
                    "key {}: record {n} came where {expected} belongs",
                    r.partition_key
                )
            })?;
            seen.insert(r.partition_key.clone(), (shard.clone(), n));
        }
    }
    ensure(
        CHECK,
        seen.values().all(|(_, last)| *last + 1 == next[0]),
        || format!("some keys came back short: {seen:?}"),
    )
}

/// Sequence numbers increase strictly in read order, and a key's outcomes
/// name increasing sequence numbers.
pub async fn sequence_increases_per_shard(h: &dyn Harness) -> Result<(), Violation> {
    const CHECK: &str = "sequence_increases_per_shard";
    let mut stored = Vec::new();
    for call in 0..2 {
        let records: Vec<PutRecord> = (0..12)
            .map(|i| record(&format!("seq-{}", i % 3), call * 12 + i))
            .collect();
        stored.extend(put_all(CHECK, h, records).await?);
    }
    for key in 0..3 {
        let seqs: Vec<&(String, SeqNo)> = stored.iter().skip(key).step_by(3).collect();
        ensure(
            CHECK,
            seqs.windows(2).all(|w| w[0].0 == w[1].0 && w[0].1 < w[1].1),
            || format!("key seq-{key} was stored at {seqs:?}"),
        )?;
    }
    let read = read_shards(CHECK, h, "sequence", &stored).await?;
    for (shard, records) in &read {
        ensure(
            CHECK,
            records.windows(2).all(|w| w[0].seq < w[1].seq),
            || {
                let seqs: Vec<SeqNo> = records.iter().map(|r| r.seq).collect();
                format!("{shard} returned sequence numbers {seqs:?}")
            },
        )?;
    }
    Ok(())
}

/// Checkpoints `reader` at `seq` and drops it, as a consumer that stops.
async fn checkpoint_and_close(
    check: &'static str,
    mut reader: Box<dyn ShardReader>,
    seq: SeqNo,
) -> Result<(), Violation> {
    reader
        .checkpoint(seq)
        .await
        .map_err(|e| violation(check, format!("checkpoint: {e}")))
}

/// A new reader for a consumer resumes right after its checkpoint; another
/// consumer starts from the beginning; a checkpoint at the end leaves
/// nothing to read.
pub async fn checkpoint_resume(h: &dyn Harness) -> Result<(), Violation> {
    const CHECK: &str = "checkpoint_resume";
    let records: Vec<PutRecord> = (0..10).map(|i| record("ckpt", i)).collect();
    let stored = put_all(CHECK, h, records).await?;
    let shard = stored[0].0.clone();

    let mut first = open_reader(CHECK, h, &shard, "ckpt-a").await?;
    let head = read_n(CHECK, first.as_mut(), 4, 4).await?;
    checkpoint_and_close(CHECK, first, head[3].seq).await?;

    let mut resumed = open_reader(CHECK, h, &shard, "ckpt-a").await?;
    let rest = read_n(CHECK, resumed.as_mut(), 6, 100).await?;
    ensure(CHECK, rest[0].seq == stored[4].1, || {
        format!(
            "resumed at {}, not after the checkpoint at {}",
            rest[0].seq, head[3].seq
        )
    })?;
    checkpoint_and_close(CHECK, resumed, rest[5].seq).await?;

    let mut other = open_reader(CHECK, h, &shard, "ckpt-b").await?;
    let all = read_n(CHECK, other.as_mut(), 10, 100).await?;
    ensure(CHECK, all[0].seq == stored[0].1, || {
        "another consumer did not start at the first record".to_owned()
    })?;

    let mut done = open_reader(CHECK, h, &shard, "ckpt-a").await?;
    let more = done
        .next_batch(100, Duration::from_millis(200))
        .await
        .map_err(|e| violation(CHECK, format!("next_batch: {e}")))?;
    ensure(CHECK, more.is_empty(), || {
        format!(
            "after a checkpoint at the end, {} records came back",
            more.len()
        )
    })
}

/// A batch never exceeds `max`, and consecutive batches neither skip nor
/// repeat records.
pub async fn batch_limits(h: &dyn Harness) -> Result<(), Violation> {
    const CHECK: &str = "batch_limits";
    let records: Vec<PutRecord> = (0..10).map(|i| record("batch", i)).collect();
    let stored = put_all(CHECK, h, records).await?;
    let mut reader = open_reader(CHECK, h, &stored[0].0, "batch").await?;
    let mut read = Vec::new();
    for max in [1, 3, 3, 100] {
        let batch = reader
            .next_batch(max, ARRIVAL_WAIT)
            .await
            .map_err(|e| violation(CHECK, format!("next_batch: {e}")))?;
        ensure(CHECK, !batch.is_empty() && batch.len() <= max, || {
            format!(
                "next_batch({max}) returned {} records with more stored",
                batch.len()
            )
        })?;
        read.extend(batch);
        if read.len() >= 10 {
            break;
        }
    }
    if read.len() < 10 {
        let rest = read_n(CHECK, reader.as_mut(), 10 - read.len(), 100).await?;
        read.extend(rest);
    }
    let seqs: Vec<SeqNo> = read.iter().map(|r| r.seq).collect();
    let expected: Vec<SeqNo> = stored.iter().map(|(_, s)| *s).collect();
    ensure(CHECK, seqs == expected, || {
        format!("batches returned {seqs:?}, stored were {expected:?}")
    })
}

/// With nothing to read, `next_batch` waits out `wait` and returns an empty
/// batch, both on an empty shard and after reading everything.
pub async fn wait_returns_empty_on_timeout(h: &dyn Harness) -> Result<(), Violation> {
    const CHECK: &str = "wait_returns_empty_on_timeout";
    let wait = Duration::from_millis(150);
    let stored = put_all(CHECK, h, vec![record("idle", 0)]).await?;
    for (shard, after_read) in [(stored[0].0.clone(), true)].into_iter().chain(
        h.shard_ids()
            .into_iter()
            .filter(|s| *s != stored[0].0)
            .map(|s| (s, false)),
    ) {
        let mut reader = open_reader(CHECK, h, &shard, "idle").await?;
        if after_read {
            read_n(CHECK, reader.as_mut(), 1, 10).await?;
        }
        let started = Instant::now();
        let batch = reader
            .next_batch(10, wait)
            .await
            .map_err(|e| violation(CHECK, format!("next_batch: {e}")))?;
        let waited = started.elapsed();
        ensure(CHECK, batch.is_empty(), || {
            format!("{shard} returned records nobody put")
        })?;
        ensure(CHECK, waited >= wait, || {
            format!("{shard} returned an empty batch after {waited:?}, before the {wait:?} wait")
        })?;
    }
    Ok(())
}

/// A reader waiting in `next_batch` returns a record put while it waits,
/// long before its wait runs out.
pub async fn waiting_reader_wakes_on_put(h: &dyn Harness) -> Result<(), Violation> {
    const CHECK: &str = "waiting_reader_wakes_on_put";
    // Learn the key's shard from a first record, then wait for a second.
    let stored = put_all(CHECK, h, vec![record("wake", 0)]).await?;
    let mut reader = open_reader(CHECK, h, &stored[0].0, "wake").await?;
    read_n(CHECK, reader.as_mut(), 1, 10).await?;
    let long_wait = ARRIVAL_WAIT * 6;
    let waiting = tokio::spawn(async move {
        let started = Instant::now();
        let batch = reader.next_batch(10, long_wait).await;
        (batch, started.elapsed())
    });
    put_all(CHECK, h, vec![record("wake", 1)]).await?;
    let (batch, waited) = tokio::time::timeout(ARRIVAL_WAIT * 2, waiting)
        .await
        .map_err(|_| violation(CHECK, "the waiting reader did not return after a put"))?
        .map_err(|e| violation(CHECK, format!("the reader task failed: {e}")))?;
    let batch = batch.map_err(|e| violation(CHECK, format!("next_batch: {e}")))?;
    ensure(CHECK, batch.len() == 1 && batch[0].data == "wake/1", || {
        format!("the woken reader returned {} records", batch.len())
    })?;
    ensure(CHECK, waited < long_wait, || {
        "the reader waited out its whole wait".to_owned()
    })
}

/// Many tasks putting at once: every record is stored once, sequence numbers
/// are unique per shard, and each task's key stays in order.
pub async fn concurrent_putters(h: &dyn Harness) -> Result<(), Violation> {
    const CHECK: &str = "concurrent_putters";
    const TASKS: usize = 16;
    const PER_TASK: usize = 25;
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let producer = h.producer();
        tasks.push(tokio::spawn(async move {
            let mut stored = Vec::new();
            for n in 0..PER_TASK {
                let outcome = producer.put(vec![record(&format!("conc-{t}"), n)]).await;
                stored.push(outcome);
            }
            stored
        }));
    }
    let mut stored = Vec::new();
    for task in tasks {
        let outcomes = task
            .await
            .map_err(|e| violation(CHECK, format!("a putter task failed: {e}")))?;
        for outcome in outcomes {
            let outcome = outcome.map_err(|e| violation(CHECK, format!("put failed: {e}")))?;
            match outcome.as_slice() {
                [PutOutcome::Stored { shard, seq }] => stored.push((shard.clone(), *seq)),
                other => {
                    return Err(violation(
                        CHECK,
                        format!("a single-record put returned {other:?}"),
                    ));
                }
            }
        }
    }
    let unique: HashSet<&(String, SeqNo)> = stored.iter().collect();
    ensure(CHECK, unique.len() == stored.len(), || {
        "two records were given the same shard and sequence number".to_owned()
    })?;
    let read = read_shards(CHECK, h, "concurrent", &stored).await?;
    let mut last: BTreeMap<String, usize> = BTreeMap::new();
    for records in read.values() {
        for r in records {
            let n = number_of(CHECK, r)?;
            let expected = last.get(&r.partition_key).map_or(0, |l| l + 1);
            ensure(CHECK, n == expected, || {
                format!(
                    "key {}: record {n} came where {expected} belongs",
                    r.partition_key
                )
            })?;
            last.insert(r.partition_key.clone(), n);
        }
    }
    ensure(
        CHECK,
        last.len() == TASKS && last.values().all(|l| l + 1 == PER_TASK),
        || format!("records are missing: {last:?}"),
    )
}
