//! A run spread over several simulator processes (`--processes N`).
//!
//! One process holds one connection per device, so the open-files limit
//! bounds the devices it can run (20,000 here). A larger fleet is spread
//! over worker processes, while the run stays one run: one plan, one ledger
//! entry, one summary and one verify.
//!
//! - The parent plans the run as usual, then starts its own executable
//!   `N` times with the same arguments and `--worker i/N`.
//! - Each worker makes the same plan (it follows from the arguments and the
//!   ledger, which nobody has written yet) and connects only its
//!   [`Slot`]'s devices, every `N`th from `i`. It says [`ToParent::Connected`]
//!   on stdout.
//! - Once every worker is connected, the parent records the run's start
//!   in the ledger and sends every worker the same start time on stdin
//!   ([`Start`]), so the fleet keeps one schedule.
//! - Each worker publishes its devices' schedules and sends back what they
//!   did ([`ToParent::Done`]): counters, lateness exceptions, PUBACK
//!   latencies and lags as histograms, freshness samples, its own CPU and
//!   memory. The parent adds them up and carries on as one process would:
//!   the ledger's finish line, the summary, verify.
//!
//! Percentiles are taken over the merged histograms and samples, never
//! averaged over workers.

use std::path::PathBuf;

use anyhow::{Context, bail, ensure};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::freshness::Tally;
use crate::lateness::Exceptions;
use crate::publish::AckBucket;
use crate::publish::device::DeviceCounters;
use crate::resources::Usage;

/// The devices one worker of a spread run connects: those whose index is
/// `index` modulo `of`, so every worker gets a share of every fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub index: u32,
    pub of: u32,
}

impl Slot {
    pub fn holds(&self, device: u32) -> bool {
        device % self.of == self.index
    }

    /// `i/N`, as `--worker` takes it.
    pub fn parse(s: &str) -> anyhow::Result<Slot> {
        let (i, n) = s
            .split_once('/')
            .with_context(|| format!("`{s}` is not INDEX/COUNT"))?;
        let slot = Slot {
            index: i
                .trim()
                .parse()
                .with_context(|| format!("`{s}`: bad index"))?,
            of: n
                .trim()
                .parse()
                .with_context(|| format!("`{s}`: bad count"))?,
        };
        ensure!(
            slot.index < slot.of,
            "`{s}`: the index must be below the count"
        );
        Ok(slot)
    }
}

/// How the parent of a spread run starts its workers.
#[derive(Debug, Clone, PartialEq)]
pub struct Processes {
    /// Workers, 2 or more.
    pub count: u32,
    /// The simulator's executable.
    pub exe: PathBuf,
    /// The run's arguments, for every worker (see [`worker_args`]).
    pub args: Vec<String>,
}

/// A command line's arguments as a worker takes them: without
/// `--processes`, and without what only the parent does (the JSON report,
/// the metrics endpoint). A worker's stdout is a pipe, so it draws no
/// progress line.
pub fn worker_args(args: &[String]) -> anyhow::Result<Vec<String>> {
    // Each with the values it takes after a space.
    const PARENT_ONLY: [(&str, usize); 3] =
        [("--processes", 1), ("--report", 2), ("--metrics-listen", 1)];
    let mut out = Vec::with_capacity(args.len());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let name = a.split_once('=').map_or(a.as_str(), |(n, _)| n);
        if name == "--worker" {
            bail!("--worker is set by the parent of a spread run, not on the command line");
        }
        if let Some((_, values)) = PARENT_ONLY.iter().find(|(n, _)| *n == name) {
            let after = if a.contains('=') { values - 1 } else { *values };
            for _ in 0..after {
                it.next();
            }
            continue;
        }
        out.push(a.clone());
    }
    Ok(out)
}

/// What a worker says to its parent, one JSON line each on stdout.
#[derive(Debug, Serialize, Deserialize)]
pub enum ToParent {
    /// Its devices are connected (or gave up), and it waits for [`Start`].
    Connected {
        connect_ms: u64,
        rss_before_mib: f64,
        rss_connected_mib: f64,
    },
    /// Its devices are done.
    Done(Box<WorkerReport>),
}

/// The parent's word to start the schedule, one JSON line on stdin.
#[derive(Debug, Serialize, Deserialize)]
pub struct Start {
    pub run_start_ms: i64,
}

/// What one worker's devices did, fleet by fleet in plan order.
#[derive(Debug, Serialize, Deserialize)]
pub struct WorkerReport {
    pub fleets: Vec<FleetReport>,
    pub freshness: Option<Tally>,
    pub usage: Usage,
}

/// One fleet's share of a worker: its devices' outcomes added up.
#[derive(Debug, Serialize, Deserialize)]
pub struct FleetReport {
    pub counters: DeviceCounters,
    pub exceptions: Exceptions,
    /// Wall-clock µs since the epoch: the first telemetry write and the
    /// last acknowledgement, where the achieved rate's time starts and ends.
    pub first_publish_us: Option<i64>,
    pub last_done_us: Option<i64>,
    pub elapsed_us: u64,
    pub not_connected: u32,
    pub latency: Recorded,
    pub lag: Recorded,
    pub timeline: Vec<AckBucket>,
}

/// A histogram as (value, count) pairs of its recorded buckets.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Recorded(pub Vec<(u64, u64)>);

impl Recorded {
    pub fn of(h: &Histogram<u64>) -> Recorded {
        Recorded(
            h.iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        )
    }

    /// The histogram again, with the simulator's bounds.
    pub fn histogram(&self) -> anyhow::Result<Histogram<u64>> {
        let mut h = Histogram::new_with_bounds(1, 3_600_000_000, 3)?;
        for &(value, count) in &self.0 {
            h.record_n(value.clamp(1, 3_600_000_000), count)?;
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn slots_share_out_every_device_once() {
        let slots: Vec<Slot> = (0..3).map(|i| Slot { index: i, of: 3 }).collect();
        for d in 0..100 {
            assert_eq!(slots.iter().filter(|s| s.holds(d)).count(), 1, "{d}");
        }
        assert_eq!(Slot::parse("2/3").unwrap(), slots[2]);
        for bad in ["3/3", "1", "a/2", "1/0"] {
            assert!(Slot::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn workers_get_the_run_without_what_only_the_parent_does() {
        let args = strings(&[
            "--devices",
            "30",
            "--processes",
            "3",
            "--report",
            "json",
            "/tmp/r.json",
            "--metrics-listen",
            "127.0.0.1:0",
            "--verify",
            "http://x",
        ]);
        assert_eq!(
            worker_args(&args).unwrap(),
            strings(&["--devices", "30", "--verify", "http://x"])
        );
        assert!(worker_args(&strings(&["--worker", "0/2"])).is_err());
    }

    #[test]
    fn a_histogram_crosses_intact() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        for v in [1, 10, 10, 999, 123_456, 3_000_000] {
            h.record(v).unwrap();
        }
        let back = Recorded::of(&h).histogram().unwrap();
        assert_eq!(back.len(), h.len());
        for q in [0.5, 0.9, 0.99, 1.0] {
            assert_eq!(back.value_at_quantile(q), h.value_at_quantile(q), "{q}");
        }
    }
}
