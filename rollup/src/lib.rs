//! The aggregation core: a batch of stream records and the items it touches
//! in, the conditional writes that fold it into the rollups out.
//!
//! - `aggregate`: [`aggregate::plan`] lists the items a batch may touch,
//!   [`aggregate::Plan::receive`] takes each round of loaded items and lists
//!   the next (device items, then what compaction needs), and
//!   [`aggregate::apply`] folds the batch into them as loaded.
//! - `span`: a device's coarser windows from its span items, shared by the
//!   compaction and the query API.
//! - `sweep`: compacting the pending windows of a device that stopped
//!   publishing, for a shell's periodic sweep.
//! - `commit`: what the core hands a store: loaded items ([`LoadedItem`]) and
//!   conditional writes ([`Commit`]).
//! - `config`: resolutions, lateness and retention.
//! - `lateness`: the rule that makes a window final and a reading `too_late`
//!   or `in_future`, which the endpoint asks too.
//! - `keys`: the one logical table's keys, shared by every store.
//! - `liveness`: a device's status (online, offline, stale) from its member
//!   row, its latest reading and the time the caller gives.
//! - `alerts`: alert rules on windows and [`alerts::evaluate`], which windows
//!   fire them at a watermark, for the shell's evaluator.
//!
//! The shells (the local loop, the Lambda handler) load, call the core and
//! commit; the store roles and their I/O error type live with them, in
//! `processors::store`.
//!
//! **Architecture Invariant:** the core does no I/O and reads no clock; time
//! reaches it as each record's `received_at`. Its dependency list holds no
//! async runtime, no AWS SDK, no SQLite and no HTTP, so the compiler refuses
//! code that reaches for them.

pub mod aggregate;
pub mod alerts;
pub mod commit;
pub mod config;
pub mod keys;
pub mod lateness;
pub mod liveness;
pub mod span;
pub mod sweep;

pub use aggregate::{ApplyError, BatchStats};
pub use commit::{Commit, Condition, LoadedItem, Write};
pub use config::AggregateConfig;
pub use lateness::LatenessConfig;
