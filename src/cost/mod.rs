//! `iotpipe cost`: what a load profile costs a month on the AWS deployment
//! (`deploy/`): IoT Core, its rule, Kinesis, the aggregate Lambda function
//! and DynamoDB on demand.
//!
//! The model follows the services' metering, not a flat rate per message:
//! IoT Core meters messages and rules in 5 KB increments (Basic Ingest skips
//! the messaging charge), Kinesis on demand rounds each record up to 1 KB,
//! and DynamoDB charges a write unit per KB written and a read unit per
//! 4 KB read strongly consistent (half that eventually consistent), per
//! item or, for a Query, per call on the items' total size.
//!
//! The store's side follows its items ([`writes`]): per Lambda batch, each
//! device writes one span item per span its readings fall in (every metric
//! of a run of finest windows, and the span's dedup set), reads its device
//! item, and writes that only when its list of open coarse windows changes;
//! each hour and day of a device is written once, when compacted; fleet
//! windows, counters and the watermark are written per batch and shared by
//! its readings. So a quiet device's reading costs about one small write,
//! and less when a long batching window puts several of its readings in one
//! span write. A batch covers the batching window, or less when the batch
//! size fills first; devices are taken to report evenly, the worst case for
//! sharing a write. Item sizes, and so the units, are a rough model of the
//! encoding.
//!
//! `scripts/bench`, or a run against DynamoDB (moto) at fleet shape,
//! measures the store items written per reading that this models; pass a
//! measured figure with `--write-amplification` to price it (the modelled
//! mix of items and sizes is kept). The bill also prices the naive design,
//! one raw item per message written without a read, for comparison.
//!
//! Prices come from a dated table ([`Prices`]); the default is
//! `src/cost/prices.toml`, compiled in.
//!
//! - `prices`: the price table and its tiers.
//! - `model`: the load [`Profile`] and the bill it makes, line by line
//!   ([`estimate`]).
//! - [`writes`]: the store's items read and written per reading.
//! - `presence`: what connects and disconnects cost (`--reconnects-per-day`).
//! - `report`: the bill as text ([`render`]).

mod model;
mod presence;
mod prices;
mod report;
mod writes;

pub use model::{Estimate, KinesisMode, Line, Profile, estimate};
pub use prices::{
    DEFAULT_PRICES, DynamoPrices, IotCorePrices, KinesisPrices, LambdaPrices, Prices, Tier,
};
pub use report::render;
pub use writes::{BatchShape, ItemCost, Retention, StoreShape, WritePattern};

/// Hours in AWS's billing month.
const HOURS_PER_MONTH: f64 = 730.0;
const SECONDS_PER_MONTH: f64 = HOURS_PER_MONTH * 3600.0;
const MILLION: f64 = 1e6;
const GB: f64 = 1024.0 * 1024.0 * 1024.0;

#[cfg(test)]
mod tests;
