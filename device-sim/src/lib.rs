//! device-sim: a fleet of simulated MQTT devices that publishes deterministic
//! telemetry to iotpipe and then verifies, window by window, that the query
//! API reports exactly what was sent.
//!
//! It shares no code with the pipeline: its payloads and its expected
//! windows come from its own simple arithmetic, so that a bug in the pipeline
//! cannot hide itself in both places.
//!
//! - [`config`]: [`SimConfig`], what a run is asked to do.
//! - [`cli`]: the command line, mapped onto [`SimConfig`].
//! - [`scenario`]: scenario files (mixed fleets, stages in order).
//! - [`plan`]: the deterministic schedule (who sends what, when; faults,
//!   stages).
//! - [`signal`]: deterministic values per (seed, device, metric, seq).
//! - [`payload`]: payload v1 JSON.
//! - [`replay`]: a recorded file's rows as a fleet's schedule and values.
//! - [`template`]: payloads shaped by a template, and what payload v1 makes
//!   of them.
//! - [`lateness`]: late and too-late decisions with honest uncertainty.
//! - [`liveness`]: devices that stop or leave with a Last Will mid-run, and
//!   the check that the API lists exactly them `stale` and `offline`.
//! - [`publish`]: one lean MQTT connection per device (3.1.1 or 5, TCP or
//!   TLS), PUBACK tracking, retries.
//! - [`freshness`]: how soon a published reading shows in the API.
//! - [`ledger`]: the record of runs that lets runs continue and verify their union.
//! - [`expect`]: expected windows, regenerated one device at a time.
//! - [`verify`]: reads the API and compares.
//! - [`resources`]: open-files limit, the simulator's memory and CPU.
//! - [`processes`]: a run spread over several simulator processes, one
//!   plan and one verify.
//! - [`summary`]: the run's numbers.
//! - [`exporter`]: the run's figures as Prometheus metrics while it goes on.
//! - `run`: [`run`], in named steps (plan, connect, publish, record, tally,
//!   verify), and the verdict on the schedule.
//!
//! Library use: `device_sim::run(SimConfig { .. }).await?` returns a
//! [`Summary`] whose `verify` field holds the verdict.

pub mod cli;
pub mod config;
pub mod expect;
pub mod exporter;
pub mod freshness;
pub mod lateness;
pub mod ledger;
pub mod liveness;
pub mod payload;
pub mod plan;
pub mod processes;
pub mod publish;
pub mod replay;
pub mod resources;
mod run;
pub mod scenario;
pub mod signal;
pub mod summary;
pub mod template;
pub mod verify;

use std::time::{SystemTime, UNIX_EPOCH};

pub use config::{BrokerAddr, Rate, SimConfig, Stop};
pub use run::{run, serve_worker};
pub use summary::Summary;
pub use verify::VerifyReport;
pub use verify::stats::stats_expectation;

/// Wall-clock ms since the epoch: the clock the pipeline stamps arrivals with.
pub fn now_ms() -> i64 {
    now_us().div_euclid(1000)
}

/// Wall-clock µs since the epoch.
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
