//! The command line, mapped onto [`SimConfig`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, ensure};
use clap::{ArgGroup, Parser};

use crate::config::{BrokerAddr, Rate, SimConfig, Stop, parse_duration};
use crate::plan::FaultConfig;
use crate::signal::{MetricSpec, Signal};

const AFTER_HELP: &str = "\
RATE
  --rate R is messages per second per device: device i publishes its k-th
  message at run_start + phase_i + k/R, phases spreading the fleet evenly over
  one period. --total-rate T is messages per second for the whole fleet
  (T / devices per device). Each message carries --readings-per-message K
  readings, so readings/s = messages/s * K; the readings of a message are
  spaced over its period and it is sent when its last reading is taken.
  Publishing never runs ahead of the schedule; if it falls behind, the summary
  says by how much and reports achieved against target rates.

VALUES
  Each value is a function of (seed, device index, metric, seq) following the
  metric's signal (sine by default), rounded to 3 decimals. The same flags and
  seed publish the same values.

LEDGER (--ledger FILE)
  A JSON-lines file with a `start` and a `finish` line per run: the run's
  parameters (seed, fleet, prefix, devices, rate, readings per message,
  metrics, faults, run_start) and each device's first seq and message count,
  then the lateness exceptions the run observed. A run with --ledger continues
  each device's seq after the last one the ledger knows, and its verify
  expects the union of every run of the fleet in the ledger, regenerated from
  those parameters. A run that started but never finished makes the fleet
  unverifiable; start a new ledger (or a new fleet) after one.

LATENESS
  The pipeline judges lateness by its own clock at arrival. The simulator
  knows arrival only within [publish - skew, PUBACK + skew]; a decision whose
  boundary falls inside that interval is uncertain, and verify accepts either
  outcome for it (late_count as a range). --allowed-lateness must match the
  pipeline's.

EXIT STATUS
  0 when every message was acknowledged and (with --verify) verify passed;
  1 otherwise.";

/// A fleet of simulated MQTT devices for iotpipe, with end-to-end verification.
#[derive(Debug, Parser)]
#[command(name = "device-sim", version, about, after_long_help = AFTER_HELP)]
#[command(group(ArgGroup::new("stop").required(true).args(["duration", "count"])))]
#[command(group(ArgGroup::new("pace").args(["rate", "total_rate"])))]
pub struct Args {
    /// MQTT broker, mqtt://HOST:PORT (`iotpipe up`'s default endpoint unless told).
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    pub broker: String,
    /// Number of devices, one MQTT connection each.
    #[arg(long, default_value_t = 10)]
    pub devices: u32,
    /// Messages per second per device (default 1).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Messages per second for the whole fleet, instead of --rate.
    #[arg(long)]
    pub total_rate: Option<f64>,
    /// Publish every message due within this time (e.g. 30s, 10m).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Messages per device.
    #[arg(long)]
    pub count: Option<u64>,
    /// MQTT QoS, 0 or 1. At QoS 1 PUBACK latencies are measured.
    #[arg(long, default_value_t = 1)]
    pub qos: u8,
    /// Fleet name: the topic's second level, dt/{fleet}/{device}/telemetry.
    #[arg(long, default_value = "sim")]
    pub fleet: String,
    /// Metrics every reading carries, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "temperature,humidity")]
    pub metrics: Vec<String>,
    /// Signal per metric: METRIC=sine|random-walk|step|spike|constant, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub signal: Vec<String>,
    /// Seed for values and fault draws.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Readings per message (K > 1 sends {"readings": [...]}).
    #[arg(long, default_value_t = 1)]
    pub readings_per_message: u32,
    /// Device id prefix; ids are {prefix}{index:05}. Default: {fleet}-d.
    #[arg(long)]
    pub device_prefix: Option<String>,
    /// Query API base URL (http://HOST:PORT): verify every window after publishing.
    #[arg(long)]
    pub verify: Option<String>,
    /// How long verify waits for the API to catch up.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub verify_timeout: Duration,
    /// API requests verify keeps in flight.
    #[arg(long, default_value_t = 32)]
    pub verify_concurrency: usize,
    /// Ledger file (JSON lines): continue seqs and verify the union of runs.
    #[arg(long)]
    pub ledger: Option<PathBuf>,
    /// New connections per second (default: unthrottled).
    #[arg(long)]
    pub connect_rate: Option<f64>,
    /// How long to wait for PUBACKs after the last publish.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub ack_timeout: Duration,
    /// The pipeline's allowed lateness (must match it).
    #[arg(long, value_parser = parse_duration, default_value = "1h")]
    pub allowed_lateness: Duration,
    /// How far the pipeline's clock may be from this machine's.
    #[arg(long, value_parser = parse_duration, default_value = "250ms")]
    pub clock_skew: Duration,
    /// Probability per message of publishing it twice (must count once).
    #[arg(long, default_value_t = 0.0)]
    pub duplicate_rate: f64,
    /// Probability per message of holding it back until after the next one.
    #[arg(long, default_value_t = 0.0)]
    pub reorder_rate: f64,
    /// Probability per message of moving one reading --late-by into the past.
    #[arg(long, default_value_t = 0.0)]
    pub late_rate: f64,
    /// How far late readings lie in the past (e.g. 5m; beyond the allowed lateness: too_late).
    #[arg(long, value_parser = parse_duration)]
    pub late_by: Option<Duration>,
    /// Probability per message of first publishing invalid JSON.
    #[arg(long, default_value_t = 0.0)]
    pub malformed_rate: f64,
    /// Write a report: `--report json FILE` (counts, rates, PUBACK percentiles, verify).
    #[arg(long, num_args = 2, value_names = ["FORMAT", "FILE"])]
    pub report: Vec<String>,
    /// Never show the live progress line (it shows only when stdout is a terminal).
    #[arg(long)]
    pub quiet: bool,
}

impl Args {
    /// The run these arguments ask for. `terminal`: whether stdout is one.
    pub fn into_config(self, terminal: bool) -> anyhow::Result<SimConfig> {
        let broker: BrokerAddr = self.broker.parse().map_err(anyhow::Error::msg)?;
        let rate = match (self.rate, self.total_rate) {
            (_, Some(t)) => Rate::Total(t),
            (r, None) => Rate::PerDevice(r.unwrap_or(1.0)),
        };
        let stop = match (self.duration, self.count) {
            (Some(d), _) => Stop::After(d),
            (None, Some(c)) => Stop::Count(c),
            (None, None) => bail!("give --duration or --count"),
        };
        let mut signals: HashMap<String, Signal> = HashMap::new();
        for s in &self.signal {
            let Some((metric, profile)) = s.split_once('=') else {
                bail!("--signal `{s}` must look like METRIC=PROFILE");
            };
            ensure!(
                self.metrics.iter().any(|m| m == metric),
                "--signal names `{metric}`, which is not in --metrics"
            );
            signals.insert(
                metric.to_string(),
                profile.parse().map_err(anyhow::Error::msg)?,
            );
        }
        let metrics = self
            .metrics
            .iter()
            .map(|name| MetricSpec {
                name: name.clone(),
                signal: signals.get(name).copied().unwrap_or_default(),
            })
            .collect();
        let report_json = match self.report.as_slice() {
            [] => None,
            [format, file] if format == "json" => Some(PathBuf::from(file)),
            [format, _] => bail!("--report supports json, not `{format}`"),
            _ => bail!("--report takes a format and a file: --report json FILE"),
        };
        Ok(SimConfig {
            broker,
            devices: self.devices,
            rate,
            stop,
            qos: self.qos,
            fleet: self.fleet,
            metrics,
            seed: self.seed,
            readings_per_message: self.readings_per_message,
            device_prefix: self.device_prefix,
            verify: self.verify,
            verify_timeout: self.verify_timeout,
            verify_concurrency: self.verify_concurrency,
            ledger: self.ledger,
            connect_rate: self.connect_rate,
            ack_timeout: self.ack_timeout,
            allowed_lateness: self.allowed_lateness,
            clock_skew: self.clock_skew,
            faults: FaultConfig {
                duplicate_rate: self.duplicate_rate,
                reorder_rate: self.reorder_rate,
                late_rate: self.late_rate,
                late_by_ms: self.late_by.map(|d| d.as_millis() as i64).unwrap_or(0),
                malformed_rate: self.malformed_rate,
            },
            report_json,
            progress: terminal && !self.quiet,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &str) -> anyhow::Result<SimConfig> {
        let argv = std::iter::once("device-sim").chain(args.split_whitespace());
        Args::try_parse_from(argv)?.into_config(false)
    }

    #[test]
    fn parses_the_documented_flags() {
        let c = parse(
            "--broker mqtt://127.0.0.1:1884 --devices 200 --rate 5 --duration 10s --qos 1 \
             --fleet f1 --metrics temperature,humidity --seed 9 --readings-per-message 2 \
             --signal humidity=random-walk --verify http://127.0.0.1:8080 --verify-timeout 90s \
             --ledger /tmp/l.jsonl --connect-rate 500 --report json /tmp/r.json",
        )
        .unwrap();
        assert_eq!(c.broker.port, 1884);
        assert_eq!((c.devices, c.rate), (200, Rate::PerDevice(5.0)));
        assert_eq!(c.stop, Stop::After(Duration::from_secs(10)));
        assert_eq!(c.metrics[1].signal, Signal::RandomWalk);
        assert_eq!(c.metrics[0].signal, Signal::Sine);
        assert_eq!(c.prefix(), "f1-d");
        assert_eq!(c.verify_timeout, Duration::from_secs(90));
        assert_eq!(c.report_json, Some(PathBuf::from("/tmp/r.json")));
        assert!(c.validate().is_ok());
    }

    #[test]
    fn refuses_contradictions() {
        for bad in [
            "--rate 1",
            "--broker mqtt://x:1 --count 1 --duration 1s",
            "--broker mqtt://x:1 --count 1 --rate 1 --total-rate 5",
            "--broker mqtt://x:1 --count 1 --signal pressure=sine",
            "--broker mqtt://x:1 --count 1 --signal temperature=square",
            "--broker mqtt://x:1 --count 1 --report csv x",
            "--broker x:1 --count 1",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
