//! What a simulation run is asked to do.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, ensure};

use crate::freshness::FreshnessSample;
use crate::plan::FaultConfig;
use crate::publish::codec::Protocol;
use crate::publish::transport::TlsOptions;
use crate::scenario::Scenario;
use crate::signal::MetricSpec;

/// AWS IoT Core's limit on publishes per second per connection.
pub const IOT_CORE_PUBLISHES_PER_SEC: f64 = 100.0;

/// An MQTT broker address, `mqtt://HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    pub host: String,
    pub port: u16,
}

impl BrokerAddr {
    /// Whether a broker URL asks for TLS (`mqtts://`, `ssl://`, `tls://`).
    pub fn is_tls_url(s: &str) -> bool {
        ["mqtts://", "ssl://", "tls://"]
            .iter()
            .any(|p| s.starts_with(p))
    }

    /// Whether the host is an AWS IoT Core data endpoint.
    pub fn is_iot_core(&self) -> bool {
        self.host.ends_with(".amazonaws.com") && self.host.contains(".iot.")
    }
}

impl FromStr for BrokerAddr {
    type Err = String;

    /// `mqtt://HOST[:PORT]` (default 1883) or, for TLS, `mqtts://HOST[:PORT]`
    /// (default 8883); see [`BrokerAddr::is_tls_url`].
    fn from_str(s: &str) -> Result<Self, String> {
        let (rest, default_port) = if let Some(r) = s
            .strip_prefix("mqtt://")
            .or_else(|| s.strip_prefix("tcp://"))
        {
            (r, 1883)
        } else if let Some(r) = ["mqtts://", "ssl://", "tls://"]
            .iter()
            .find_map(|p| s.strip_prefix(p))
        {
            (r, 8883)
        } else {
            return Err(format!(
                "broker `{s}` must look like mqtt://HOST:PORT or mqtts://HOST:PORT"
            ));
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse()
                    .map_err(|_| format!("broker `{s}` has a bad port `{p}`"))?,
            ),
            None => (rest, default_port),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("broker `{s}` has no host"));
        }
        Ok(BrokerAddr {
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for BrokerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "mqtt://{}:{}", self.host, self.port)
    }
}

/// How fast the fleet publishes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    /// Messages per second per device.
    PerDevice(f64),
    /// Messages per second for the whole fleet, spread evenly over devices.
    Total(f64),
}

/// When each device stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Every message due before this much time has passed.
    After(Duration),
    /// This many messages per device.
    Count(u64),
}

/// A simulation run. [`SimConfig::default`] is a small, quick run against
/// `mqtt://127.0.0.1:1883`; set what differs.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub broker: BrokerAddr,
    /// Further brokers with the same settings (`--broker A,B,…`), to spread
    /// the fleet over several endpoints: device `i` connects to the
    /// `i % n`-th of `broker` followed by these.
    pub more_brokers: Vec<BrokerAddr>,
    pub devices: u32,
    pub rate: Rate,
    pub stop: Stop,
    /// 0 or 1.
    pub qos: u8,
    pub fleet: String,
    pub metrics: Vec<MetricSpec>,
    pub seed: u64,
    pub readings_per_message: u32,
    /// Device ids are `{prefix}{index:05}`; `None`: `{fleet}-d`.
    pub device_prefix: Option<String>,
    /// Base URL of the query API; `None`: no verification.
    pub verify: Option<String>,
    /// How long verify waits for the API to catch up (and mismatches to heal).
    pub verify_timeout: Duration,
    /// Queries verify keeps in flight.
    pub verify_concurrency: usize,
    /// Append-only record of runs, for continuing seqs and verifying their union.
    pub ledger: Option<PathBuf>,
    /// New MQTT connections per second; `None`: unthrottled.
    pub connect_rate: Option<f64>,
    /// How long to wait for the fleet to connect (`None`: 10 s), plus
    /// devices / `connect_rate`, or 1 s per 1000 devices without one.
    pub connect_timeout: Option<Duration>,
    /// How long to wait for PUBACKs after a device's last send.
    pub ack_timeout: Duration,
    /// Must match the pipeline's allowed lateness.
    pub allowed_lateness: Duration,
    /// How far the pipeline's clock may be from ours.
    pub clock_skew: Duration,
    /// How much later than its PUBACK a message may reach the pipeline: with
    /// a broker in front (`iotpipe up --broker`) the PUBACK is the broker's,
    /// and its queue may hold the message for a while.
    pub arrival_slack: Duration,
    /// Must match the pipeline's watermark slack.
    pub watermark_slack: Duration,
    pub faults: FaultConfig,
    /// Write a JSON report (counts, rates, PUBACK latency percentiles) here.
    pub report_json: Option<PathBuf>,
    /// Show a live progress line on stdout.
    pub progress: bool,
    pub protocol: Protocol,
    /// `None`: plain TCP.
    pub tls: Option<TlsOptions>,
    /// Source addresses to spread connections over (each has its own
    /// ephemeral ports); empty: automatic for a loopback broker.
    pub source_addrs: Vec<IpAddr>,
    pub keep_alive: Duration,
    /// QoS 1 publishes a device keeps unacknowledged at most; more wait.
    pub max_inflight: usize,
    /// MQTT username and password; `{device}` becomes the device id.
    pub username: Option<String>,
    pub password: Option<String>,
    /// Say `online` and `offline` on each device's status topic, for a
    /// broker in front of iotpipe (see [`crate::publish::PublishConfig::presence_topic`]).
    pub presence_topic: bool,
    /// Devices that are done stay connected until every device is (see
    /// [`crate::publish::finishing`]).
    pub hold_connections: bool,
    /// Which telemetry publishes to follow until the API shows them (with
    /// `verify`).
    pub freshness_sample: FreshnessSample,
    /// Mixed fleets and stages; replaces the single fleet's devices, rate,
    /// metrics, readings per message, QoS and stop.
    pub scenario: Option<Scenario>,
    /// Serve Prometheus metrics here while the run goes on (port 0: any;
    /// the bound address is printed on stderr).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Figures the run keeps up to date as it goes, for an endpoint the
    /// caller serves itself (see [`crate::exporter::serve`]).
    pub live: Option<std::sync::Arc<crate::exporter::Live>>,
    /// Replay a recorded file instead of the seed's fleet: its devices,
    /// timestamps and values (see [`crate::replay`]).
    pub replay: Option<crate::replay::ReplayConfig>,
    /// Shape every payload with this template (see [`crate::template`]).
    pub payload_template: Option<crate::template::Template>,
    /// Spread the devices over worker processes (see [`crate::processes`]);
    /// `None`: this process runs them all.
    pub processes: Option<crate::processes::Processes>,
    /// This process is a worker of a spread run: it runs these devices and
    /// answers its parent (see [`crate::processes`]).
    pub worker: Option<crate::processes::Slot>,
    /// With `verify`: alert rules whose alerts are checked against the
    /// windows found exact (see [`crate::verify::alerts`]).
    pub alert_rules: Vec<crate::verify::alerts::RuleSpec>,
    /// Devices that stop or leave with a Last Will mid-run, and verify's
    /// check of their status (see [`crate::liveness`]).
    pub liveness: Option<crate::liveness::LivenessConfig>,
    /// The query API's bearer token, for verify's reads.
    pub api_token: Option<String>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            broker: BrokerAddr {
                host: "127.0.0.1".into(),
                port: 1883,
            },
            more_brokers: Vec::new(),
            devices: 10,
            rate: Rate::PerDevice(1.0),
            stop: Stop::Count(10),
            qos: 1,
            fleet: "sim".into(),
            metrics: ["temperature", "humidity"]
                .into_iter()
                .map(|name| MetricSpec {
                    name: name.into(),
                    signal: Default::default(),
                })
                .collect(),
            seed: 1,
            readings_per_message: 1,
            device_prefix: None,
            verify: None,
            verify_timeout: Duration::from_secs(60),
            verify_concurrency: 32,
            ledger: None,
            connect_rate: None,
            connect_timeout: None,
            ack_timeout: Duration::from_secs(30),
            allowed_lateness: Duration::from_secs(3600),
            clock_skew: Duration::from_millis(250),
            arrival_slack: Duration::ZERO,
            watermark_slack: Duration::from_secs(10),
            faults: FaultConfig::default(),
            report_json: None,
            progress: false,
            protocol: Protocol::V4,
            tls: None,
            source_addrs: Vec::new(),
            keep_alive: Duration::from_secs(60),
            max_inflight: 256,
            username: None,
            password: None,
            presence_topic: false,
            hold_connections: false,
            freshness_sample: FreshnessSample::Off,
            scenario: None,
            metrics_listen: None,
            live: None,
            replay: None,
            payload_template: None,
            processes: None,
            worker: None,
            alert_rules: Vec::new(),
            liveness: None,
            api_token: None,
        }
    }
}

impl SimConfig {
    pub fn prefix(&self) -> String {
        self.device_prefix
            .clone()
            .unwrap_or_else(|| format!("{}-d", self.fleet))
    }

    /// Time between two messages of one device, in µs.
    pub fn period_us(&self) -> anyhow::Result<u64> {
        let per_device = match self.rate {
            Rate::PerDevice(r) => r,
            Rate::Total(r) => r / f64::from(self.devices.max(1)),
        };
        ensure!(
            per_device.is_finite() && per_device > 0.0,
            "the rate must be a positive number of messages per second"
        );
        let period = (1e6 / per_device).round();
        ensure!(
            (1.0..=86_400e6).contains(&period),
            "a device's message period must lie between 1 µs and 1 day, got {period} µs"
        );
        Ok(period as u64)
    }

    /// What deserves a warning before the run: rates AWS IoT Core would
    /// throttle.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let per_device = match &self.scenario {
            Some(s) => {
                s.fleets
                    .iter()
                    .map(|f| match (f.rate, f.total_rate) {
                        (_, Some(t)) => t / f64::from(f.devices.max(1)),
                        (r, None) => r.unwrap_or(1.0),
                    })
                    .fold(0.0, f64::max)
                    * s.peak_multiplier()
            }
            None => match self.rate {
                Rate::PerDevice(r) => r,
                Rate::Total(t) => t / f64::from(self.devices.max(1)),
            },
        };
        // Duplicates and malformed messages are publishes too.
        let per_device =
            per_device * (1.0 + self.faults.duplicate_rate + self.faults.malformed_rate);
        if per_device > IOT_CORE_PUBLISHES_PER_SEC {
            let whose = if self.broker.is_iot_core() {
                "this AWS IoT Core endpoint will throttle it"
            } else {
                "AWS IoT Core would throttle it"
            };
            out.push(format!(
                "a device publishes up to {per_device:.0} messages/s, above IoT Core's {IOT_CORE_PUBLISHES_PER_SEC:.0} publishes/s per connection: {whose}"
            ));
        }
        if self.broker.is_iot_core() && self.tls.is_none() {
            out.push("AWS IoT Core accepts MQTT only over TLS: use mqtts://".into());
        }
        out
    }

    /// What a replay cannot be combined with.
    fn validate_replay(&self) -> anyhow::Result<()> {
        ensure!(
            self.scenario.is_none() || self.replay.is_none(),
            "give --scenario or --replay, not both"
        );
        if self.replay.is_some() {
            ensure!(
                self.liveness.is_none(),
                "a replay follows its recording: --stop-fraction and --will-fraction do not apply"
            );
            ensure!(
                self.readings_per_message == 1,
                "a replay sends each recorded row as one message: leave --readings-per-message at 1"
            );
            ensure!(
                self.faults.late_rate == 0.0,
                "a replay's readings are late as recorded: --late-rate does not apply"
            );
        }
        Ok(())
    }

    /// The liveness scenario, and what a run spread over processes cannot
    /// be combined with.
    fn validate_processes(&self) -> anyhow::Result<()> {
        if let Some(l) = &self.liveness {
            l.validate()?;
        }
        ensure!(
            self.alert_rules.is_empty() || self.verify.is_some(),
            "--alert-rules are checked by verify: give --verify too"
        );
        if let Some(p) = &self.processes {
            ensure!(p.count >= 2, "--processes takes 2 or more");
            ensure!(
                self.metrics_listen.is_none() && self.live.is_none(),
                "--metrics-listen serves one process's figures: it cannot be combined with --processes"
            );
            ensure!(
                self.worker.is_none(),
                "a worker cannot spread its devices again"
            );
            ensure!(
                self.liveness.is_none(),
                "the liveness scenario checks one process's devices: it cannot be combined with --processes"
            );
        }
        Ok(())
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        self.validate_replay()?;
        self.validate_processes()?;
        if let Some(s) = &self.scenario {
            s.validate()?;
            for f in &s.fleets {
                let one = SimConfig {
                    devices: f.devices,
                    fleet: f.name.clone(),
                    device_prefix: f.prefix.clone(),
                    readings_per_message: f.readings_per_message,
                    qos: f.qos,
                    rate: match (f.rate, f.total_rate) {
                        (_, Some(t)) => Rate::Total(t),
                        (r, None) => Rate::PerDevice(r.unwrap_or(1.0)),
                    },
                    metrics: f
                        .metrics
                        .iter()
                        .map(|m| MetricSpec {
                            name: m.clone(),
                            signal: Default::default(),
                        })
                        .collect(),
                    scenario: None,
                    ..self.clone()
                };
                one.validate()
                    .map_err(|e| e.context(format!("scenario fleet {}", f.name)))?;
            }
            for st in &s.stages {
                if let crate::scenario::Stage::OfflineThenBackfill { batch, .. } = st {
                    for f in &s.fleets {
                        let size = *batch as usize * (40 + f.metrics.len() * 80);
                        ensure!(
                            size <= 128 * 1024,
                            "fleet {}: backfill batches of {batch} readings may exceed 128 KiB",
                            f.name
                        );
                    }
                }
            }
            return Ok(());
        }
        ensure!(self.devices >= 1, "--devices must be at least 1");
        ensure!(
            (1..=1000).contains(&self.readings_per_message),
            "--readings-per-message must be 1..=1000"
        );
        ensure!(self.qos <= 1, "--qos must be 0 or 1");
        ensure!(
            (1..=100).contains(&self.metrics.len()),
            "give 1..=100 metrics"
        );
        check_id("fleet", &self.fleet)?;
        check_id(
            "device id",
            &format!("{}{:05}", self.prefix(), self.devices - 1),
        )?;
        for m in &self.metrics {
            let ok = !m.name.is_empty()
                && m.name.len() <= 64
                && m.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
            ensure!(
                ok,
                "metric name `{}` must be 1..=64 of [A-Za-z0-9_.-]",
                m.name
            );
        }
        let mut names: Vec<&str> = self.metrics.iter().map(|m| m.name.as_str()).collect();
        names.sort_unstable();
        ensure!(
            names.windows(2).all(|w| w[0] != w[1]),
            "a metric is listed twice"
        );
        self.period_us()?;
        for (name, p) in [
            ("--duplicate-rate", self.faults.duplicate_rate),
            ("--reorder-rate", self.faults.reorder_rate),
            ("--late-rate", self.faults.late_rate),
            ("--malformed-rate", self.faults.malformed_rate),
        ] {
            ensure!((0.0..=1.0).contains(&p), "{name} is a probability in 0..=1");
        }
        ensure!(
            self.faults.late_rate == 0.0 || self.faults.late_by_ms > 0,
            "--late-rate needs --late-by"
        );
        // A rough worst case of the JSON, against the pipeline's 128 KiB.
        let size = self.readings_per_message as usize * (40 + self.metrics.len() * 80);
        if size > 128 * 1024 {
            bail!(
                "messages of {} readings with {} metrics may exceed 128 KiB; send fewer per message",
                self.readings_per_message,
                self.metrics.len()
            );
        }
        Ok(())
    }
}

/// A fleet or device id as the topic takes it (checked here, not by the
/// pipeline's own code, so that a bug there cannot hide).
pub(crate) fn check_id(what: &str, id: &str) -> anyhow::Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-'));
    ensure!(ok, "{what} `{id}` must be 1..=64 of [A-Za-z0-9_.:-]");
    Ok(())
}

/// Parses `500ms`, `30s`, `10m`, `1h`, `2d`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 500ms, 30s, 10m, 1h or 2d"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        _ => return Err(format!("`{s}` has an unknown unit; use ms, s, m, h or d")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("`{s}`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_brokers() {
        let b: BrokerAddr = "mqtt://127.0.0.1:18830".parse().unwrap();
        assert_eq!((b.host.as_str(), b.port), ("127.0.0.1", 18830));
        assert_eq!("mqtt://broker".parse::<BrokerAddr>().unwrap().port, 1883);
        assert_eq!("mqtt://[::1]:1".parse::<BrokerAddr>().unwrap().host, "::1");
        for bad in ["127.0.0.1:1883", "http://x:1", "mqtt://:1", "mqtt://x:port"] {
            assert!(bad.parse::<BrokerAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("1.5m").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("1d").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        for bad in ["", "s", "1w", "-1s", "1e400s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rates_become_periods() {
        let mut c = SimConfig {
            rate: Rate::PerDevice(5.0),
            ..SimConfig::default()
        };
        assert_eq!(c.period_us().unwrap(), 200_000);
        c.rate = Rate::Total(1000.0);
        c.devices = 200;
        assert_eq!(c.period_us().unwrap(), 200_000);
        c.rate = Rate::PerDevice(0.0);
        assert!(c.period_us().is_err());
    }

    #[test]
    fn validates() {
        assert!(SimConfig::default().validate().is_ok());
        let bad = [
            SimConfig {
                devices: 0,
                ..SimConfig::default()
            },
            SimConfig {
                qos: 2,
                ..SimConfig::default()
            },
            SimConfig {
                fleet: "a/b".into(),
                ..SimConfig::default()
            },
            SimConfig {
                device_prefix: Some("x".repeat(60)),
                ..SimConfig::default()
            },
            SimConfig {
                readings_per_message: 1001,
                ..SimConfig::default()
            },
        ];
        for c in bad {
            assert!(c.validate().is_err(), "{c:?}");
        }
    }
}
