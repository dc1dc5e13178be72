//! The processors on a stream shared with other `iotpipe` processes (Kinesis
//! or NATS JetStream): a shard is processed only while this process holds
//! its lease.
//!
//! A loop ticks the [`LeaseKeeper`] every renew interval, starts a shard
//! processor for every lease gained and stops the one of every lease lost.
//! On shutdown it stops them all, lets them drain and checkpoint, and gives
//! the leases up so that the other processes take the shards at once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use stream::lease::{LeaseConfig, LeaseKeeper, LeasedStream};
use stream::{ReadError, ShardReader};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Starts one shard's processor, which stops when its token is cancelled.
pub type SpawnShard = Arc<
    dyn Fn(Box<dyn ShardReader>, CancellationToken) -> JoinHandle<Result<(), ReadError>>
        + Send
        + Sync,
>;

/// A shard processor and the token that stops it, a child of the loop's.
type Running = (CancellationToken, JoinHandle<Result<(), ReadError>>);

/// A name for this process in the lease table, unique across machines and
/// restarts: host, process id and start time.
pub fn owner_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "iotpipe".to_string());
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("{host}-{}-{started}", std::process::id())
}

/// Runs [`run`] as a task, as a process `owner_id()` with leases of
/// `lease_duration` renewed every third of it; a failure before `stop` is
/// cancelled goes to `failed`.
pub fn spawn(
    stream: Arc<dyn LeasedStream>,
    consumer: &'static str,
    lease_duration: Duration,
    spawn_shard: SpawnShard,
    stop: CancellationToken,
    failed: impl FnOnce(String) + Send + 'static,
    now_ms: fn() -> i64,
) -> JoinHandle<Result<(), ReadError>> {
    let owner = owner_id();
    let config = LeaseConfig {
        lease_duration,
        renew_interval: lease_duration / 3,
    };
    let keeper = LeaseKeeper::new(stream.lease_store(), consumer, &owner, &config);
    tracing::info!(owner, "Sharing the stream's shards by leases.");
    tokio::spawn(async move {
        let result = run(
            stream,
            keeper,
            consumer,
            config.renew_interval,
            spawn_shard,
            stop.clone(),
            now_ms,
        )
        .await;
        if let Err(e) = &result
            && !stop.is_cancelled()
        {
            failed(format!("the shard lease loop failed: {e}"));
        }
        result
    })
}

/// Runs until `stop` is cancelled; see the module docs.
pub async fn run(
    stream: Arc<dyn LeasedStream>,
    mut keeper: LeaseKeeper,
    consumer: &str,
    renew_every: Duration,
    spawn: SpawnShard,
    stop: CancellationToken,
    now_ms: fn() -> i64,
) -> Result<(), ReadError> {
    let mut running: BTreeMap<String, Running> = BTreeMap::new();
    let mut stopped: Vec<JoinHandle<Result<(), ReadError>>> = Vec::new();
    let mut tick = tokio::time::interval(renew_every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => break,
        }
        let changes = match stream.lease_shards().await {
            Ok(shards) => keeper.tick(&shards, now_ms()).await,
            Err(e) => Err(e),
        };
        let changes = match changes {
            Ok(changes) => changes,
            Err(e) => {
                // The leases outlive a few failed renewals; past that, the
                // readers' checkpoints fail and their shards stop.
                tracing::warn!(error = %e, "Renewing shard leases failed; will retry.");
                continue;
            }
        };
        for shard in changes.lost {
            if let Some((switch, task)) = running.remove(&shard) {
                tracing::info!(shard, "Lost a shard's lease; its processor stops.");
                switch.cancel();
                stopped.push(task);
            }
        }
        for shard in changes.gained {
            match stream
                .leased_shard_reader(&shard, consumer, keeper.owner())
                .await
            {
                Ok(reader) => {
                    let switch = stop.child_token();
                    let task = spawn(reader, switch.clone());
                    running.insert(shard, (switch, task));
                }
                Err(e) => {
                    tracing::warn!(shard, error = %e, "Cannot read a leased shard; giving its lease up.");
                    if let Err(e) = keeper.release(&shard).await {
                        tracing::warn!(shard, error = %e, "Giving a lease up failed; it will expire.");
                    }
                }
            }
        }
    }
    for (switch, task) in running.into_values() {
        switch.cancel();
        stopped.push(task);
    }
    let mut first_error = None;
    for task in stopped {
        match task.await {
            Ok(Ok(())) | Ok(Err(ReadError::LeaseLost(_))) => {}
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(ReadError::Io(format!("processor task: {e}")));
            }
        }
    }
    keeper.release_all().await?;
    first_error.map_or(Ok(()), Err)
}
