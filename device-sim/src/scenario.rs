//! Scenario files: mixed fleets and stages run in order.
//!
//! ```toml
//! seed = 7
//! connect_rate = 2000          # optional, new connections per second
//!
//! [[fleets]]
//! name = "meters"
//! devices = 800
//! rate = 1.0                   # per device; or total_rate for the fleet
//! metrics = ["temperature", "humidity"]
//! signals = { humidity = "random-walk" }
//! readings_per_message = 1
//! qos = 1
//!
//! [[stages]]
//! type = "ramp"                # devices start one after another
//! duration = "20s"
//! [[stages]]
//! type = "burst"               # the rate times `multiplier`
//! duration = "10s"
//! multiplier = 3.0
//! [[stages]]
//! type = "reconnect-storm"     # `fraction` of devices drop at once and reconnect
//! fraction = 0.5
//! duration = "10s"             # steady publishing after the storm
//! [[stages]]
//! type = "offline-then-backfill"
//! fraction = 0.2               # these devices go offline for `duration`,
//! duration = "90s"             # then send the backlog in batches
//! batch = 50
//! [[stages]]
//! type = "steady"
//! duration = "30s"
//! ```
//!
//! Every stage becomes part of each fleet's [`RunPlan`] (segments, offline
//! windows, storms), so the ledger records it and verify regenerates it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde::{Deserialize, Deserializer};

use crate::plan::{OfflineWindow, Segment, Storm};
use crate::signal::Signal;

/// A scenario file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Seed for values and draws; the command line's `--seed` otherwise.
    #[serde(default)]
    pub seed: Option<u64>,
    /// New connections per second; the command line's otherwise.
    #[serde(default)]
    pub connect_rate: Option<f64>,
    pub fleets: Vec<FleetSpec>,
    pub stages: Vec<Stage>,
}

/// One fleet of a scenario.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSpec {
    pub name: String,
    pub devices: u32,
    /// Messages per second per device (default 1).
    #[serde(default)]
    pub rate: Option<f64>,
    /// Messages per second for the whole fleet, instead of `rate`.
    #[serde(default)]
    pub total_rate: Option<f64>,
    #[serde(default = "default_metrics")]
    pub metrics: Vec<String>,
    #[serde(default)]
    pub signals: BTreeMap<String, Signal>,
    #[serde(default = "one")]
    pub readings_per_message: u32,
    #[serde(default = "one_u8")]
    pub qos: u8,
    /// Device ids are `{prefix}{index:05}`; default `{name}-d`.
    #[serde(default)]
    pub prefix: Option<String>,
}

fn default_metrics() -> Vec<String> {
    vec!["temperature".into(), "humidity".into()]
}

fn one() -> u32 {
    1
}

fn one_u8() -> u8 {
    1
}

/// One stage; stages run one after another.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Stage {
    /// Devices start publishing one after another across `duration`: the
    /// fleet's rate climbs linearly from 0 to its target.
    Ramp {
        #[serde(deserialize_with = "duration")]
        duration: Duration,
    },
    Steady {
        #[serde(deserialize_with = "duration")]
        duration: Duration,
    },
    /// The rate times `multiplier` for `duration`.
    Burst {
        #[serde(deserialize_with = "duration")]
        duration: Duration,
        multiplier: f64,
    },
    /// `fraction` of the devices drop their connections at the stage's
    /// start and reconnect at once; publishing goes on steadily for
    /// `duration`.
    ReconnectStorm {
        fraction: f64,
        #[serde(default, deserialize_with = "duration")]
        duration: Duration,
    },
    /// `fraction` of the devices go offline for `duration`, keep taking
    /// readings, and then send the backlog in messages of `batch` readings
    /// with the original timestamps. The others publish steadily.
    OfflineThenBackfill {
        fraction: f64,
        #[serde(deserialize_with = "duration")]
        duration: Duration,
        #[serde(default = "default_batch")]
        batch: u32,
    },
}

fn default_batch() -> u32 {
    100
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    crate::config::parse_duration(&s).map_err(serde::de::Error::custom)
}

/// A fleet's schedule from the stages.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Schedule {
    pub segments: Vec<Segment>,
    pub offline: Vec<OfflineWindow>,
    pub storms: Vec<Storm>,
}

impl Scenario {
    pub fn load(path: &Path) -> anyhow::Result<Scenario> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading scenario {}", path.display()))?;
        let s: Scenario =
            toml::from_str(&text).with_context(|| format!("scenario {}", path.display()))?;
        s.validate()?;
        Ok(s)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            !self.fleets.is_empty(),
            "a scenario needs at least one fleet"
        );
        ensure!(
            !self.stages.is_empty(),
            "a scenario needs at least one stage"
        );
        let mut names: Vec<&str> = self.fleets.iter().map(|f| f.name.as_str()).collect();
        names.sort_unstable();
        ensure!(
            names.windows(2).all(|w| w[0] != w[1]),
            "two fleets share a name"
        );
        for f in &self.fleets {
            ensure!(
                !(f.rate.is_some() && f.total_rate.is_some()),
                "fleet {}: give rate or total_rate, not both",
                f.name
            );
            for m in f.signals.keys() {
                ensure!(
                    f.metrics.contains(m),
                    "fleet {}: a signal names `{m}`, which is not among its metrics",
                    f.name
                );
            }
        }
        for (i, st) in self.stages.iter().enumerate() {
            let n = i + 1;
            match st {
                Stage::Ramp { duration } | Stage::Steady { duration } => {
                    ensure!(!duration.is_zero(), "stage {n}: duration must be positive")
                }
                Stage::Burst {
                    duration,
                    multiplier,
                } => {
                    ensure!(!duration.is_zero(), "stage {n}: duration must be positive");
                    ensure!(
                        multiplier.is_finite() && *multiplier > 0.0,
                        "stage {n}: multiplier must be positive"
                    );
                }
                Stage::ReconnectStorm { fraction, .. } => check_fraction(n, *fraction)?,
                Stage::OfflineThenBackfill {
                    fraction,
                    duration,
                    batch,
                } => {
                    check_fraction(n, *fraction)?;
                    ensure!(!duration.is_zero(), "stage {n}: duration must be positive");
                    ensure!(
                        (1..=1000).contains(batch),
                        "stage {n}: batch must be 1..=1000 readings"
                    );
                }
            }
        }
        if self.length().is_zero() {
            bail!("the stages last no time at all");
        }
        Ok(())
    }

    /// How long the stages last together.
    pub fn length(&self) -> Duration {
        self.stages
            .iter()
            .map(|s| match s {
                Stage::Ramp { duration }
                | Stage::Steady { duration }
                | Stage::Burst { duration, .. }
                | Stage::ReconnectStorm { duration, .. }
                | Stage::OfflineThenBackfill { duration, .. } => *duration,
            })
            .sum()
    }

    /// The highest rate multiplier any stage applies.
    pub fn peak_multiplier(&self) -> f64 {
        self.stages
            .iter()
            .map(|s| match s {
                Stage::Burst { multiplier, .. } => *multiplier,
                _ => 1.0,
            })
            .fold(1.0, f64::max)
    }

    /// The schedule of a fleet whose devices publish every `period_us`.
    pub fn schedule(&self, period_us: u64) -> Schedule {
        let mut s = Schedule::default();
        let mut t = 0u64;
        for (i, stage) in self.stages.iter().enumerate() {
            let salt = i as u64 + 1;
            let (len, period, ramp) = match stage {
                Stage::Ramp { duration } => (*duration, period_us, true),
                Stage::Steady { duration } => (*duration, period_us, false),
                Stage::Burst {
                    duration,
                    multiplier,
                } => (
                    *duration,
                    ((period_us as f64 / multiplier).round() as u64).max(1),
                    false,
                ),
                Stage::ReconnectStorm { fraction, duration } => {
                    s.storms.push(Storm {
                        at_us: t,
                        fraction: *fraction,
                        salt,
                    });
                    (*duration, period_us, false)
                }
                Stage::OfflineThenBackfill {
                    fraction,
                    duration,
                    batch,
                } => {
                    s.offline.push(OfflineWindow {
                        start_us: t,
                        end_us: t + duration.as_micros() as u64,
                        fraction: *fraction,
                        batch: *batch,
                        salt,
                    });
                    (*duration, period_us, false)
                }
            };
            let len = len.as_micros() as u64;
            if len > 0 {
                s.segments.push(Segment {
                    start_us: t,
                    end_us: t + len,
                    period_us: period,
                    ramp,
                });
            }
            t += len;
        }
        s
    }
}

fn check_fraction(stage: usize, f: f64) -> anyhow::Result<()> {
    ensure!(
        (0.0..=1.0).contains(&f),
        "stage {stage}: fraction must lie in 0..=1"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
        seed = 3
        [[fleets]]
        name = "meters"
        devices = 10
        rate = 2.0
        signals = { humidity = "random-walk" }
        [[fleets]]
        name = "trackers"
        devices = 4
        total_rate = 2.0
        metrics = ["speed"]
        readings_per_message = 5
        qos = 0
        [[stages]]
        type = "ramp"
        duration = "10s"
        [[stages]]
        type = "burst"
        duration = "5s"
        multiplier = 4
        [[stages]]
        type = "reconnect-storm"
        fraction = 0.5
        [[stages]]
        type = "offline-then-backfill"
        fraction = 0.25
        duration = "1m"
        batch = 20
    "#;

    #[test]
    fn parses_fleets_and_stages_into_a_schedule() {
        let s: Scenario = toml::from_str(EXAMPLE).unwrap();
        s.validate().unwrap();
        assert_eq!(s.fleets[1].qos, 0);
        assert_eq!(s.fleets[0].metrics, ["temperature", "humidity"]);
        assert_eq!(s.fleets[0].signals["humidity"], Signal::RandomWalk);
        assert_eq!(s.length(), Duration::from_secs(75));
        assert_eq!(s.peak_multiplier(), 4.0);
        let sch = s.schedule(500_000);
        let periods: Vec<(u64, u64, bool)> = sch
            .segments
            .iter()
            .map(|g| (g.start_us / 1_000_000, g.period_us, g.ramp))
            .collect();
        assert_eq!(
            periods,
            [
                (0, 500_000, true),
                (10, 125_000, false),
                (15, 500_000, false)
            ]
        );
        assert_eq!(sch.storms[0].at_us, 15_000_000);
        assert_eq!(sch.offline[0].end_us, 75_000_000);
        assert_eq!(sch.offline[0].batch, 20);
    }

    #[test]
    fn the_example_files_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Scenario::load(&path).unwrap();
                n += 1;
            }
        }
        assert!(n >= 2, "{n} example scenarios");
    }

    #[test]
    fn refuses_what_cannot_run() {
        for bad in [
            EXAMPLE.replace("multiplier = 4", "multiplier = 0"),
            EXAMPLE.replace("fraction = 0.5", "fraction = 1.5"),
            EXAMPLE.replace("batch = 20", "batch = 0"),
            EXAMPLE.replace("name = \"trackers\"", "name = \"meters\""),
            EXAMPLE.replace("rate = 2.0\n", "rate = 2.0\ntotal_rate = 9.0\n"),
        ] {
            let parsed: Result<Scenario, _> = toml::from_str(&bad);
            assert!(
                parsed.map(|s| s.validate().is_err()).unwrap_or(true),
                "{bad}"
            );
        }
        let typo = EXAMPLE.replace("type = \"ramp\"", "type = \"rmap\"");
        assert!(toml::from_str::<Scenario>(&typo).is_err());
    }
}
