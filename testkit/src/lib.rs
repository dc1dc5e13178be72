//! Test support for the iotpipe workspace: a dev-only crate (`publish =
//! false`, only ever a `[dev-dependencies]` entry), so that nothing here is
//! compiled into a release library.
//!
//! - Contracts every backend runs: [`stream_conformance`] (producers and
//!   shard readers), [`lease_conformance`] (shard leases, on every leased
//!   stream) and [`store_conformance`] (rollup stores).
//! - Fault injection: [`stream_fault`] (any producer or reader) and
//!   [`store_fault`] (any rollup store), from one kind of seeded dice.
//! - Stand-ins: [`MemoryProducer`], an in-memory stream producer a test can
//!   hold or fail; [`MemoryLeaseStore`], a lease table in memory;
//!   [`standin`], an in-memory pipeline behind MQTT and the
//!   query API, for the simulator's own tests.
//! - Launchers, one per external service: [`moto`] (Kinesis and DynamoDB),
//!   [`mosquitto`], [`nats`] (a JetStream server that a test can kill and
//!   restart), [`rumqttd`] (in process), [`chromium`], [`postgres`] (a
//!   server per test binary, a database per test), and [`up`] (`iotpipe
//!   up` as a child process a test can kill).
//! - [`batches`]: a busy shard's batches, for the core's benchmarks.
//! - [`lambda`]: Kinesis events as the event source mapping writes them.
//! - [`Pki`]: a test CA with server and client certificates.
//! - [`now_ms`]: the wall clock, for tests that must stamp real times.
//! - [`eventually`]: polls a condition that has no notification of its own.
//! - [`numbers_close`]: JSON numbers equal to 1e-9 relative, for sums that
//!   may add in another order.
//!
//! It depends on the crates whose contracts it carries (`stream`,
//! `processors`, `ingest`). A unit test inside one of those crates that
//! needs this crate's types would see two copies of its own crate's types,
//! so such tests live under that crate's `tests/` instead.

pub mod batches;
pub mod chromium;
pub mod lambda;
pub mod lease_conformance;
mod memory_lease;
mod memory_producer;
pub mod mosquitto;
pub mod moto;
pub mod nats;
mod pki;
pub mod postgres;
pub mod rumqttd;
pub mod standin;
pub mod store_conformance;
pub mod store_fault;
pub mod stream_conformance;
pub mod stream_fault;
pub mod up;

pub use memory_lease::MemoryLeaseStore;
pub use memory_producer::{MemoryProducer, Timeout};
pub use pki::{ClientCert, Pki, TlsListener, transport};

/// Milliseconds since the Unix epoch: what the endpoint stamps as a
/// message's `received_at`, for tests that publish readings near now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Polls `condition` until it holds, for state with no notification of
/// its own (metrics, counters); an error after `within`.
pub async fn eventually(
    what: &str,
    within: std::time::Duration,
    mut condition: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    while !condition() {
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    Ok(())
}

/// A name no other test of any test binary uses against the same server
/// (moto keeps every stream and table until it stops; a PostgreSQL server
/// every database): `PREFIX-PID-NANOS-N`.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether two JSON numbers are equal to 1e-9 relative: sums over the same
/// readings may add in another order (other batches, another backend).
pub fn numbers_close(a: &serde_json::Number, b: &serde_json::Number) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y || (x - y).abs() <= 1e-9 * x.abs().max(y.abs()),
        _ => a == b,
    }
}
