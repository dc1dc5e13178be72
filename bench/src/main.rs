//! `iotpipe-bench`: the end-to-end benchmark. The highest rate iotpipe
//! sustains, verified exactly, beside a broker-only baseline measured the
//! same way in the same run (`scripts/bench` builds and runs it).
//!
//! For each configuration (embedded endpoint or Mosquitto in front, QoS 0
//! or 1, 1 or 20 readings per message) it raises the simulator's total rate
//! by `--step` until a step fails, then bisects. A pipeline step passes only
//! when:
//!
//! - the simulator acknowledged at least 95 % of the offered rate (over the
//!   real time from the first publish to the last PUBACK), its publishes ran
//!   at most 1 s behind schedule at the p99, and no publish failed;
//! - freshness p99 over every sample is at most 1 s (a sample that never
//!   became visible ranks above every time);
//! - verify finds every window exact and every reading sent was accepted;
//! - the pipeline's own rate agrees: `/v1/stats`' accepted readings, sampled
//!   during the step, rose at a rate within 10 % of the simulator's.
//!
//! The baseline is the simulator publishing into a broker alone with a
//! subscriber that only counts; a baseline step passes when the subscriber
//! received every acknowledged message at the offered rate.
//!
//! Fleet shape (`--fleet-rates`): many quiet devices, one step per
//! per-device rate instead of a ramp, the pipeline (on its embedded log and
//! SQLite, then on NATS JetStream and PostgreSQL) and Mosquitto alone (no
//! subscriber) at the same shape, each with its CPU µs per message.
//!
//! On NATS and PostgreSQL the CPU and disk figures add the servers' own
//! processes to iotpipe's; the test kit runs PostgreSQL with `fsync=off`,
//! so its commits cost no sync that the embedded store pays.
//!
//! The processes are launched by the test kit's launchers ([`testkit::up`],
//! [`testkit::mosquitto`]), the same the end-to-end tests use.

mod ramp;
mod report;
mod sample;
mod steps;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use serde_json::{Value, json};

use ramp::{Ramp, RampPlan};
use steps::{Backend, Bench, Binaries, Broker, Load, Step};

#[derive(Debug, Parser)]
#[command(
    name = "iotpipe-bench",
    about = "End-to-end benchmark: the highest verified rate against a broker-only baseline"
)]
struct Args {
    /// Seconds of publishing per step.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    #[arg(long, default_value_t = 200)]
    devices: u32,
    /// First total rate, msgs/s.
    #[arg(long, default_value_t = 10_000.0)]
    start: f64,
    /// Rate factor between steps.
    #[arg(long, default_value_t = 1.5)]
    step: f64,
    #[arg(long, default_value_t = 2_000_000.0)]
    max: f64,
    /// Bisection steps after the first failure.
    #[arg(long, default_value_t = 2)]
    refine: u32,
    /// Configurations to run, e.g. embedded-q1-r1,baseline-mosquitto-q1 (all by default).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Write every step's figures here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Devices connecting per second (fleet shape: 2000).
    #[arg(long)]
    connect_rate: Option<f64>,
    /// Fleet shape instead of the ramps: per-device rates, one step each,
    /// e.g. 1,2,5 (with --devices 19000 --connect-rate 2000).
    #[arg(long, value_delimiter = ',')]
    fleet_rates: Vec<f64>,
    /// Readings per message at fleet shape, e.g. 1,20.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    fleet_readings: Vec<u32>,
    /// A config file for every `iotpipe up` (see `iotpipe config default`).
    #[arg(long)]
    iotpipe_config: Option<PathBuf>,
    /// Simulated devices stay connected until the whole fleet has published
    /// (`device-sim --hold-connections`), for every configuration, baselines
    /// included: the run's closes come after the measured window.
    #[arg(long)]
    hold_connections: bool,
}

/// One configuration's steps, and the last that passed.
struct Outcome {
    name: String,
    sustained: Option<Value>,
    steps: Vec<Value>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let bench = Bench {
        bins: binaries()?,
        devices: args.devices,
        duration_s: args.duration,
        connect_rate: args.connect_rate,
        iotpipe_config: args.iotpipe_config.clone(),
        hold_connections: args.hold_connections,
        http: reqwest::Client::new(),
    };
    let outcomes = if args.fleet_rates.is_empty() {
        let outcomes = ramps(&args, &bench).await?;
        print_summary(&outcomes);
        outcomes
    } else {
        fleet(&args, &bench).await?
    };
    if let Some(path) = &args.json {
        let results: Vec<Value> = outcomes
            .iter()
            .map(|o| json!({"name": o.name, "sustained": o.sustained, "steps": o.steps}))
            .collect();
        let out = json!({"args": format!("{args:?}"), "results": results});
        std::fs::write(path, serde_json::to_vec_pretty(&out)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The binaries sit beside this one in the release target directory.
fn binaries() -> Result<Binaries> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("no directory for this binary")?;
    let bins = Binaries {
        iotpipe: dir.join("iotpipe"),
        device_sim: dir.join("device-sim"),
        baseline: dir.join("examples").join("baseline"),
    };
    for bin in [&bins.iotpipe, &bins.device_sim, &bins.baseline] {
        anyhow::ensure!(
            bin.is_file(),
            "{} is not built; run scripts/bench, which builds it",
            bin.display()
        );
    }
    Ok(bins)
}

/// A configuration of the ramps: its name and how one step runs.
#[derive(Debug, Clone, Copy)]
struct Config {
    baseline: bool,
    broker: Broker,
    backend: Backend,
    qos: u8,
    readings: u32,
}

impl Config {
    fn name(&self) -> String {
        let broker = match (self.broker, self.backend) {
            (Broker::Embedded, Backend::Embedded) => "embedded",
            (Broker::Mosquitto, Backend::Embedded) => "mosquitto",
            (Broker::Embedded, Backend::NatsPostgres) => NATS_POSTGRES,
            (Broker::Mosquitto, Backend::NatsPostgres) => "mosquitto-nats-postgres",
        };
        if self.baseline {
            format!("baseline-{broker}-q{}", self.qos)
        } else {
            format!("{broker}-q{}-r{}", self.qos, self.readings)
        }
    }

    async fn step(&self, bench: &Bench, rate: f64) -> Result<Step> {
        let load = Load {
            qos: self.qos,
            readings: self.readings,
            rate,
        };
        if self.baseline {
            bench.baseline_step(self.broker, load).await
        } else {
            bench.pipeline_step(self.broker, self.backend, load).await
        }
    }
}

/// The name part of the endpoint on NATS JetStream and PostgreSQL.
const NATS_POSTGRES: &str = "nats-postgres";

/// Every configuration, baseline first, in the order they run. The
/// pipeline on NATS and PostgreSQL is measured behind its own endpoint at
/// QoS 1, against the same baseline as the embedded default.
fn configs() -> Vec<Config> {
    let mut all = vec![];
    for broker in [Broker::Embedded, Broker::Mosquitto] {
        for qos in [1, 0] {
            let config = |baseline, readings| Config {
                baseline,
                broker,
                backend: Backend::Embedded,
                qos,
                readings,
            };
            all.extend([config(true, 1), config(false, 1), config(false, 20)]);
        }
    }
    all.extend([1, 20].map(|readings| Config {
        baseline: false,
        broker: Broker::Embedded,
        backend: Backend::NatsPostgres,
        qos: 1,
        readings,
    }));
    all
}

async fn ramps(args: &Args, bench: &Bench) -> Result<Vec<Outcome>> {
    let plan = RampPlan {
        start: args.start,
        factor: args.step,
        max: args.max,
        refine: args.refine,
    };
    let mut outcomes = vec![];
    for config in configs() {
        let name = config.name();
        if !args.only.is_empty() && !args.only.contains(&name) {
            continue;
        }
        if config.broker == Broker::Mosquitto
            && testkit::mosquitto::require("mosquitto", "").is_err()
        {
            println!("{name}: skipped, no mosquitto on PATH");
            continue;
        }
        println!("{name}");
        let mut ramp = Ramp::new(plan);
        let mut outcome = Outcome {
            name: name.clone(),
            sustained: None,
            steps: vec![],
        };
        while let Some(rate) = ramp.next_rate() {
            let step = config.step(bench, rate).await?;
            println!("  {name} @ {rate:.0} msgs/s: {}", line(&step));
            ramp.record(step.pass);
            let figures = with_pass(step);
            if ramp.best() == Some(rate) {
                outcome.sustained = Some(figures.clone());
            }
            outcome.steps.push(figures);
        }
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

/// Fleet shape: one step per per-device rate, Mosquitto alone and the
/// pipeline at the same shape in the same run.
async fn fleet(args: &Args, bench: &Bench) -> Result<Vec<Outcome>> {
    let mut outcomes = vec![];
    for &per_device in &args.fleet_rates {
        let rate = per_device * f64::from(args.devices);
        for &readings in &args.fleet_readings {
            let load = Load {
                qos: 1,
                readings,
                rate,
            };
            for backend in [None, Some(Backend::Embedded), Some(Backend::NatsPostgres)] {
                let config = match backend {
                    None => format!("fleet-baseline-mosquitto-q1-r{readings}"),
                    Some(Backend::Embedded) => format!("fleet-embedded-q1-r{readings}"),
                    Some(Backend::NatsPostgres) => format!("fleet-{NATS_POSTGRES}-q1-r{readings}"),
                };
                if !args.only.is_empty() && !args.only.contains(&config) {
                    continue;
                }
                let step = match backend {
                    None => bench.fleet_baseline_step(load).await?,
                    Some(b) => bench.pipeline_step(Broker::Embedded, b, load).await?,
                };
                let name = format!("{config}@{per_device}");
                println!(
                    "  {name} ({} devices, {rate:.0} msgs/s): {}",
                    args.devices,
                    line(&step)
                );
                let figures = with_pass(step);
                outcomes.push(Outcome {
                    name,
                    sustained: figures["pass"]
                        .as_bool()
                        .unwrap_or(false)
                        .then(|| figures.clone()),
                    steps: vec![figures],
                });
            }
        }
    }
    Ok(outcomes)
}

fn line(step: &Step) -> String {
    let verdict = if step.pass { "pass" } else { "FAIL" };
    format!("{verdict} {}", step.figures)
}

fn with_pass(step: Step) -> Value {
    let mut figures = step.figures;
    figures["pass"] = Value::Bool(step.pass);
    figures
}

/// The sustained rate of each configuration, and each pipeline's ratio to
/// the baseline of its broker and QoS.
fn print_summary(outcomes: &[Outcome]) {
    println!("\nsustained (last passing step):");
    let baseline = |name: &str| {
        outcomes
            .iter()
            .find(|o| o.name == name)
            .and_then(|o| o.sustained.as_ref())
            .and_then(|s| s["msgs_per_s"].as_f64())
    };
    for o in outcomes {
        let Some(s) = &o.sustained else {
            println!("  {:<26} no passing step", o.name);
            continue;
        };
        let f = |key: &str| s[key].as_f64().unwrap_or(f64::NAN);
        let mut out = format!("  {:<26} {:>10.0} msgs/s", o.name, f("msgs_per_s"));
        if s.get("readings_per_s").is_some() {
            out += &format!(
                " {:>11.0} readings/s (pipeline {:.0})  freshness p99 {:.0} ms  writes/reading {:.4} (SQLite {:.4})",
                f("readings_per_s"),
                f("pipeline_readings_per_s"),
                f("freshness_p99_ms"),
                f("write_amplification"),
                f("sqlite_writes_per_reading"),
            );
            // The NATS and PostgreSQL pipeline is behind the embedded endpoint.
            let name = o.name.replace(NATS_POSTGRES, "embedded");
            let mut parts = name.split('-');
            let (broker, qos) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            if let Some(b) =
                baseline(&format!("baseline-{broker}-{qos}")).filter(|_| o.name.ends_with("-r1"))
            {
                out += &format!("  = {:.2} x baseline", f("msgs_per_s") / b);
            }
        }
        println!("{out}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configurations_keep_the_names_the_results_are_filed_under() {
        let names: Vec<String> = configs().iter().map(Config::name).collect();
        assert_eq!(
            names,
            [
                "baseline-embedded-q1",
                "embedded-q1-r1",
                "embedded-q1-r20",
                "baseline-embedded-q0",
                "embedded-q0-r1",
                "embedded-q0-r20",
                "baseline-mosquitto-q1",
                "mosquitto-q1-r1",
                "mosquitto-q1-r20",
                "baseline-mosquitto-q0",
                "mosquitto-q0-r1",
                "mosquitto-q0-r20",
                "nats-postgres-q1-r1",
                "nats-postgres-q1-r20",
            ]
        );
    }

    #[test]
    fn the_command_line_takes_lists_separated_by_commas() {
        let args =
            Args::try_parse_from(["iotpipe-bench", "--fleet-rates", "1,2.5", "--only", "a,b"])
                .unwrap();
        assert_eq!(args.fleet_rates, [1.0, 2.5]);
        assert_eq!(args.fleet_readings, [1]);
        assert_eq!(args.only, ["a", "b"]);
        assert!(Args::try_parse_from(["iotpipe-bench", "--fleet-rates", "x"]).is_err());
    }
}
