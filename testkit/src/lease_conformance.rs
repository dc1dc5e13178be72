//! The contract of shard leases ([`LeaseStore`], [`LeasedStream`]), as
//! async checks that every leased backend (Kinesis with its DynamoDB table,
//! NATS with its KV bucket) runs against itself.
//!
//! A backend's test implements [`LeaseHarness`] over a fresh stream of four
//! shards and calls each check. Time is an argument of every tick, so expiry
//! is tested without waiting for it.
//!
//! - [`two_processes_split_the_shards_and_a_dead_ones_move_after_the_expiry`]:
//!   two processes share the shards, every record is consumed once, and when
//!   one stops renewing the other takes its shards after the lease duration,
//!   resumes after its checkpoints, and the stopped one can no longer
//!   checkpoint.
//! - [`of_racing_takes_one_wins`]: two takes of one lease at once, fresh and
//!   after a release: exactly one succeeds, and the loser can neither renew,
//!   release nor checkpoint it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use async_trait::async_trait;
use bytes::Bytes;
use stream::lease::{Checkpoint, LeaseConfig, LeaseKeeper, LeaseStore, LeasedStream};
use stream::{PutRecord, ReadError, ShardReader};

use crate::stream_conformance::record;

/// The consumer name the checks share.
pub const LEASED: &str = "processors";
/// The lease duration of the checks' processes.
pub const LEASE_MS: i64 = 10_000;

/// A fresh stream of four shards, as a check needs it.
#[async_trait]
pub trait LeaseHarness: Send + Sync {
    /// The stream as a new process sees it: with clients of its own.
    async fn connect(&self) -> Result<Arc<dyn LeasedStream>>;

    /// Puts `records`, all stored, in one call.
    async fn put(&self, records: Vec<PutRecord>) -> Result<()>;
}

/// One consumer process: its own clients, its leases, and a reader per
/// shard it holds.
struct Process {
    stream: Arc<dyn LeasedStream>,
    keeper: LeaseKeeper,
    readers: BTreeMap<String, Box<dyn ShardReader>>,
    consumed: Vec<Bytes>,
}

impl Process {
    async fn new(h: &dyn LeaseHarness, owner: &str) -> Result<Self> {
        let stream = h.connect().await?;
        let config = LeaseConfig {
            lease_duration: Duration::from_millis(LEASE_MS as u64),
            ..LeaseConfig::default()
        };
        let keeper = LeaseKeeper::new(stream.lease_store(), LEASED, owner, &config);
        Ok(Process {
            stream,
            keeper,
            readers: BTreeMap::new(),
            consumed: Vec::new(),
        })
    }

    /// Renews and takes leases at `now_ms`; starts and stops readers to
    /// match. Returns the shards gained.
    async fn tick(&mut self, now_ms: i64) -> Result<Vec<String>> {
        let shards = self.stream.lease_shards().await?;
        let changes = self.keeper.tick(&shards, now_ms).await?;
        for shard in &changes.lost {
            self.readers.remove(shard);
        }
        for shard in &changes.gained {
            let reader = self
                .stream
                .leased_shard_reader(shard, LEASED, self.keeper.owner())
                .await?;
            self.readers.insert(shard.clone(), reader);
        }
        Ok(changes.gained)
    }

    fn held(&self) -> Vec<String> {
        self.keeper.held().map(str::to_owned).collect()
    }

    /// Reads every shard it holds to its current end, checkpointing each
    /// batch.
    async fn drain(&mut self) -> Result<()> {
        for reader in self.readers.values_mut() {
            let read = drain_reader(reader.as_mut(), 500, Duration::from_millis(500)).await?;
            self.consumed.extend(read);
        }
        Ok(())
    }
}

/// Reads `reader` to its current end in batches of up to `max`, waiting up
/// to `wait` for each, and checkpoints every batch: the records' data.
pub async fn drain_reader(
    reader: &mut (impl ShardReader + ?Sized),
    max: usize,
    wait: Duration,
) -> Result<Vec<Bytes>> {
    let mut read = Vec::new();
    loop {
        let batch = reader.next_batch(max, wait).await?;
        let Some(last) = batch.last().map(|r| r.seq) else {
            return Ok(read);
        };
        read.extend(batch.into_iter().map(|r| r.data));
        reader.checkpoint(last).await?;
    }
}

/// Puts `n` records numbered from `from`, over 40 keys: their data.
async fn put_numbered(h: &dyn LeaseHarness, from: usize, n: usize) -> Result<Vec<Bytes>> {
    let records: Vec<PutRecord> = (from..from + n)
        .map(|i| record(&format!("dev-{}", i % 40), i))
        .collect();
    let expected = records.iter().map(|r| r.data.clone()).collect();
    h.put(records).await?;
    Ok(expected)
}

fn sorted(mut v: Vec<Bytes>) -> Vec<Bytes> {
    v.sort();
    v
}

/// See the module docs.
pub async fn two_processes_split_the_shards_and_a_dead_ones_move_after_the_expiry(
    h: &dyn LeaseHarness,
) -> Result<()> {
    let mut a = Process::new(h, "process-a").await?;
    let mut b = Process::new(h, "process-b").await?;

    // a starts alone and takes all four; b sees them alive and takes none;
    // a, seeing b, gives up its excess; b takes what a gave up.
    ensure!(a.tick(0).await?.len() == 4, "a alone took fewer than 4");
    ensure!(b.tick(0).await?.is_empty(), "b took a live lease");
    a.tick(0).await?;
    ensure!(b.tick(0).await?.len() == 2, "b did not take a's excess");
    a.tick(0).await?;
    let (held_a, held_b) = (a.held(), b.held());
    ensure!(
        (held_a.len(), held_b.len()) == (2, 2),
        "not split evenly: {held_a:?} {held_b:?}"
    );
    ensure!(
        held_a.iter().all(|s| !held_b.contains(s)),
        "a shard held twice: {held_a:?} {held_b:?}"
    );

    // Every record is consumed once, by whichever process holds its shard.
    let mut expected = put_numbered(h, 0, 200).await?;
    a.drain().await?;
    b.drain().await?;
    ensure!(
        !a.consumed.is_empty() && !b.consumed.is_empty(),
        "one process read nothing"
    );
    let both = [a.consumed.clone(), b.consumed.clone()].concat();
    ensure!(
        sorted(both) == sorted(expected.clone()),
        "records lost or read twice"
    );

    // a stops renewing. Its leases expire a lease duration after b first
    // saw their last counters, on b's clock; until then b takes nothing, and
    // then it takes a's shards and resumes after a's checkpoints.
    expected.extend(put_numbered(h, 200, 100).await?);
    let seen = 1_000;
    ensure!(b.tick(seen).await?.is_empty(), "b took a live lease");
    ensure!(
        b.tick(seen + LEASE_MS - 1).await?.is_empty(),
        "b took a lease before it expired"
    );
    let mut moved = b.tick(seen + LEASE_MS).await?;
    moved.sort();
    ensure!(
        moved == held_a,
        "b took {moved:?}, not a's {held_a:?}, at the expiry"
    );
    ensure!(b.held().len() == 4, "b holds {:?}", b.held());
    b.drain().await?;
    let both = [a.consumed.clone(), b.consumed.clone()].concat();
    ensure!(
        sorted(both) == sorted(expected),
        "records lost or read twice after the move"
    );

    // a, waking up, may still read its old shards but cannot checkpoint them.
    let shard = held_a[0].clone();
    let reader = a.readers.get_mut(&shard).context("a's reader")?;
    let stale = reader.next_batch(500, Duration::from_secs(2)).await?;
    let last = stale.last().context("new records in a's old shard")?.seq;
    let lost = reader.checkpoint(last).await;
    ensure!(
        matches!(lost, Err(ReadError::LeaseLost(_))),
        "a checkpointed a shard it lost: {lost:?}"
    );
    let lease = h.connect().await?.lease_store().snapshot(LEASED).await?;
    let owners: Vec<_> = lease.leases.iter().map(|l| l.owner.as_deref()).collect();
    ensure!(
        owners == [Some("process-b"); 4],
        "owners after the move: {owners:?}"
    );
    Ok(())
}

/// Two takes of `shard` at once, each from its own client, both having seen
/// `seen`: the owner that won.
async fn race(
    a: &Arc<dyn LeaseStore>,
    b: &Arc<dyn LeaseStore>,
    shard: &str,
    seen: Option<u64>,
) -> Result<&'static str> {
    let (took_a, took_b) = tokio::join!(
        a.take(LEASED, shard, "racer-a", seen),
        b.take(LEASED, shard, "racer-b", seen)
    );
    match (took_a?, took_b?) {
        (true, false) => Ok("racer-a"),
        (false, true) => Ok("racer-b"),
        both => anyhow::bail!("two racing takes of {shard} ended {both:?}, not one winner"),
    }
}

/// The lease of `shard` in the table.
async fn lease_of(store: &Arc<dyn LeaseStore>, shard: &str) -> Result<stream::lease::Lease> {
    store
        .snapshot(LEASED)
        .await?
        .leases
        .into_iter()
        .find(|l| l.shard == shard)
        .with_context(|| format!("no lease of {shard}"))
}

/// See the module docs.
pub async fn of_racing_takes_one_wins(h: &dyn LeaseHarness) -> Result<()> {
    let (a, b) = (h.connect().await?, h.connect().await?);
    let shard = a.lease_shards().await?.remove(0);
    let (sa, sb) = (a.lease_store(), b.lease_store());

    // A lease that does not exist yet.
    let winner = race(&sa, &sb, &shard, None).await?;
    let (winner_store, loser_store, loser) = match winner {
        "racer-a" => (&sa, &sb, "racer-b"),
        _ => (&sb, &sa, "racer-a"),
    };
    let lease = lease_of(&sa, &shard).await?;
    ensure!(lease.owner.as_deref() == Some(winner), "{lease:?}");

    // The loser holds nothing: it can neither renew, nor release, nor
    // checkpoint, nor take with the counter it saw before the winner moved.
    ensure!(
        !loser_store.renew(LEASED, &shard, loser).await?,
        "loser renewed"
    );
    ensure!(
        !loser_store.release(LEASED, &shard, loser).await?,
        "loser released"
    );
    let checkpoint = Checkpoint::At("1".into());
    let set = loser_store
        .set(LEASED, &shard, Some(loser), None, &checkpoint)
        .await;
    ensure!(
        matches!(set, Err(ReadError::LeaseLost(_))),
        "the loser checkpointed: {set:?}"
    );
    ensure!(winner_store.renew(LEASED, &shard, winner).await?);
    ensure!(
        !loser_store
            .take(LEASED, &shard, loser, Some(lease.counter))
            .await?,
        "a take with a stale counter won"
    );

    // A released lease, both seeing the same counter.
    ensure!(winner_store.release(LEASED, &shard, winner).await?);
    let freed = lease_of(&sa, &shard).await?;
    ensure!(freed.owner.is_none(), "{freed:?}");
    let second = race(&sa, &sb, &shard, Some(freed.counter)).await?;
    let lease = lease_of(&sb, &shard).await?;
    ensure!(lease.owner.as_deref() == Some(second), "{lease:?}");
    Ok(())
}
