//! The processors: the shells around the aggregation core (the `rollup`
//! crate), everything between the stream and the query API that does I/O.
//!
//! - `store`: the [`store::RollupStore`] and [`store::RollupQuery`] roles and
//!   their backends (`sqlite`, `memory`).
//! - `run`: the local loop, one task per shard, around
//!   [`run::process_batch`], the function the Lambda handler calls too.
//! - `api`: the query API router.
//! - `alerts`: alert rules evaluated on the windows the API reads, and
//!   their webhook notifications.
//! - `lambda`: the Lambda functions' handlers (binaries in `src/bin/`).
//! - `metrics`: what the processors count for `/metrics`.

pub mod alerts;
pub mod api;
pub mod lambda;
pub mod metrics;
pub mod run;
pub mod store;
