//! The processors: everything between the stream and the query API.
//!
//! - `aggregate`: the pure core. A batch of stream records and the items it
//!   touches in, conditional store writes out; no I/O, no clock.
//! - `config`: resolutions, lateness and retention.
//! - `keys`: the one logical table's keys, shared by every store.
//! - `store`: the [`store::RollupStore`] and [`store::RollupQuery`] roles and
//!   their backends (`sqlite`, `memory`).
//! - `run`: the local loop, one task per shard, around
//!   [`run::process_batch`], the function the Lambda handler calls too.
//! - `api`: the query API router.
//! - `lambda`: the Lambda functions' handlers (binaries in `src/bin/`).
//! - `metrics`: what the processors count for `/metrics`.
//!
//! **Architecture Invariant:** the core imports no tokio, no AWS SDK and no
//! clock; time reaches it as each record's `received_at`.

pub mod aggregate;
pub mod api;
pub mod config;
pub mod keys;
pub mod lambda;
pub mod metrics;
pub mod run;
pub mod store;

pub use config::AggregateConfig;
