//! The command line, mapped onto [`SimConfig`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use clap::{ArgGroup, Parser};

use crate::config::{BrokerAddr, Rate, SimConfig, Stop, parse_duration};
use crate::freshness::FreshnessSample;
use crate::plan::FaultConfig;
use crate::publish::codec::Protocol;
use crate::publish::transport::{ClientCert, TlsOptions};
use crate::scenario::Scenario;
use crate::signal::{MetricSpec, Signal};

const AFTER_HELP: &str = "\
RATE
  --rate R is messages per second per device: device i publishes its k-th
  message at run_start + phase_i + k/R, phases spreading the fleet evenly over
  one period. --total-rate T is messages per second for the whole fleet
  (T / devices per device). Each message carries --readings-per-message K
  readings, so readings/s = messages/s * K; the readings of a message are
  spaced over its period and it is sent when its last reading is taken.
  Publishing never runs ahead of the schedule. The summary reports achieved
  against target rates and a verdict: on schedule, or which side fell behind:
  the broker (publishes waited for PUBACKs: a full --max-inflight window) or
  the simulator itself (publishes late with no window to blame: CPU).
  AWS IoT Core allows 100 publishes/s per connection; a higher per-device
  rate draws a warning.

SCALE
  Each device is one task with one MQTT connection and a few KB of state.
  The simulator raises its open-files limit up to the hard limit and refuses
  to start when the fleet cannot fit. Connections to a loopback broker are
  spread over 127.0.0.1, 127.0.0.2, ... when one address runs out of
  ephemeral ports (--source-addrs to choose); --connect-rate ramps the
  connections. The summary gives the time to connect every device.

TLS
  mqtts://HOST[:PORT] (default port 8883) connects over TLS (rustls). --ca
  FILE trusts those CAs instead of the Mozilla roots; --cert/--key present one
  client certificate for all devices, --cert-dir DIR one per device
  (DIR/<device_id>.crt and .key). AWS IoT Core: mqtts://xxx-ats.iot.REGION.amazonaws.com
  with client certificates, or port 443, where ALPN x-amzn-mqtt-ca is offered.

SCENARIOS (--scenario FILE.toml)
  Several fleets, each with its devices, rate, metrics, signals, readings
  per message and QoS, run through stages in order: ramp, steady, burst,
  reconnect-storm and offline-then-backfill. See device-sim/scenarios/. The
  ledger records every stage, and verify accounts for all of it.

FRESHNESS (--freshness-sample auto|N|off, with --verify)
  One telemetry publish in N (auto: about 5,000 a run, spread over devices
  and time) is followed until GET /v1/devices/{id} shows a latest ts at or
  after the reading's: the time from the PUBLISH being written. A sample not
  seen within --verify-timeout is a miss and ranks above every time, so the
  p99 reads `missed` when more than 1 % missed.

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
  pipeline's. Behind a broker (iotpipe up --broker) the PUBACK is the
  broker's: give --arrival-slack for how long its queue may hold a message.
  A message never acknowledged may or may not have been stored. A window
  holding such a reading, or a too-late decision too close to call, is
  uncertain: held to what holds whichever way those readings went (count and
  sum between its certain readings and all of them, min, max, quantiles and
  late_count within bounds). More than 1 % uncertain windows fail the run.

FLEET AND RUN
  Without --fleet each run publishes as a fresh fleet, sim-XXXXXX (devices
  sim-XXXXXX-d00000, ...), so verify compares exactly what this run sent even
  against a pipeline that holds earlier runs. --fleet NAME keeps a name; a
  second run of the same fleet against the same store finds the first run's
  readings in its windows and fails, unless both ran with --ledger FILE (then
  verify expects their union). With --ledger the default fleet is `sim`.
  After the summary, with --verify, two curl lines query what the run wrote.

EXIT STATUS
  0 when every message was acknowledged and (with --verify) verify passed;
  1 otherwise.";

/// A fleet of simulated MQTT devices for iotpipe, with end-to-end verification.
#[derive(Debug, Parser)]
#[command(name = "device-sim", version, about, after_long_help = AFTER_HELP)]
#[command(group(ArgGroup::new("stop").args(["duration", "count"])))]
#[command(group(ArgGroup::new("pace").args(["rate", "total_rate"])))]
pub struct Args {
    /// MQTT broker, mqtt://HOST:PORT or mqtts://HOST:PORT for TLS (`iotpipe up`'s default endpoint unless told);
    /// several, comma-separated, spread the devices over them round-robin.
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    pub broker: String,
    /// MQTT protocol version: 3.1.1 or 5.
    #[arg(long, default_value = "3.1.1")]
    pub protocol: Protocol,
    /// Scenario file (TOML): fleets and stages; replaces --devices, --rate, --metrics, --duration and the like.
    #[arg(long)]
    pub scenario: Option<PathBuf>,
    /// CA certificates (PEM) to trust for TLS, instead of the Mozilla roots.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) every device presents (with --key).
    #[arg(long, requires = "key", conflicts_with = "cert_dir")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// A directory of per-device client certificates: <device_id>.crt and <device_id>.key.
    #[arg(long)]
    pub cert_dir: Option<PathBuf>,
    /// ALPN protocol to offer over TLS (repeatable); port 443 offers x-amzn-mqtt-ca unless told.
    #[arg(long)]
    pub alpn: Vec<String>,
    /// Source addresses to connect from, comma-separated (127.0.0.1,127.0.0.2), or a count N for 127.0.0.1..N.
    #[arg(long)]
    pub source_addrs: Option<String>,
    /// MQTT keep alive.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub keep_alive: Duration,
    /// QoS 1 publishes a device keeps unacknowledged at most; more wait their turn.
    #[arg(long, default_value_t = 256)]
    pub max_inflight: usize,
    /// MQTT username; {device} becomes the device id.
    #[arg(long)]
    pub username: Option<String>,
    /// MQTT password; {device} becomes the device id.
    #[arg(long)]
    pub password: Option<String>,
    /// Publish `online` on dt/{fleet}/{device}/status after connecting and
    /// `offline` before a DISCONNECT, the convention iotpipe's bridge reads
    /// presence from when a broker such as Mosquitto is in front (iotpipe's
    /// own endpoint sees connects itself, and refuses those topics).
    #[arg(long)]
    pub presence_topic: bool,
    /// Keep each device connected once it has published everything and has
    /// its PUBACKs, until every device (of this process, with --processes)
    /// has, then disconnect all: a fleet that stays connected, with the
    /// DISCONNECTs after the measured window instead of in its last second.
    #[arg(long)]
    pub hold_connections: bool,
    /// With --verify: measure freshness on one telemetry publish in N;
    /// `auto`: about 5,000 samples a run; 0 or `off`: not at all.
    #[arg(long, default_value = "auto")]
    pub freshness_sample: FreshnessSample,
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
    /// Fleet name: the topic's second level, dt/{fleet}/{device}/telemetry. Default: a fresh sim-XXXXXX per run, or `sim` with --ledger.
    #[arg(long)]
    pub fleet: Option<String>,
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
    /// How long to wait for every device to connect (default 10s), plus devices / --connect-rate, or 1s per 1000 devices without it.
    #[arg(long, value_parser = parse_duration)]
    pub connect_timeout: Option<Duration>,
    /// How long to wait for PUBACKs after the last publish.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub ack_timeout: Duration,
    /// The pipeline's allowed lateness (must match it).
    #[arg(long, value_parser = parse_duration, default_value = "1h")]
    pub allowed_lateness: Duration,
    /// How far the pipeline's clock may be from this machine's.
    #[arg(long, value_parser = parse_duration, default_value = "250ms")]
    pub clock_skew: Duration,
    /// How much later than its PUBACK a message may reach iotpipe. Give it
    /// when a broker sits in front (`iotpipe up --broker`): the broker's
    /// PUBACK means only that the broker has the message, and its queue may
    /// hold it; lateness decisions within the slack become uncertain.
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    pub arrival_slack: Duration,
    /// The pipeline's watermark slack (must match it): a window is final once
    /// its end plus the allowed lateness is this far behind what the
    /// pipeline has applied, so verify allows either answer within it.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub watermark_slack: Duration,
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
    /// Spread the devices over N simulator processes, each holding its share
    /// of the connections (one process holds at most its open-files limit of
    /// them). The run stays one run: one schedule, one ledger entry, one
    /// summary, one verify.
    #[arg(long, value_name = "N")]
    pub processes: Option<u32>,
    /// Set by the parent of a spread run: run devices I, I+N, I+2N... and
    /// answer the parent on stdin and stdout.
    #[arg(long, value_name = "I/N", hide = true)]
    pub worker: Option<String>,
    /// With --verify: an iotpipe config file whose `[[alerts.rules]]` verify
    /// checks: every 1-minute window it found exact fired exactly when it
    /// crosses its rule's threshold, at the revision the API shows.
    #[arg(long, value_name = "FILE")]
    pub alert_rules: Option<PathBuf>,
    /// Serve Prometheus metrics on http://ADDR/metrics while the run goes on
    /// (e.g. 127.0.0.1:9464; port 0 picks one and prints it).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Replay a recorded file (CSV with a header `device,ts[,fleet],METRIC...`,
    /// or JSON lines `{"device","ts","fleet"?,"metrics"}`) instead of seeded
    /// devices; the whole file unless --count or --duration cut it short.
    #[arg(long, value_name = "FILE")]
    pub replay: Option<PathBuf>,
    /// The replay's pace: a factor of the recorded pace (1, 10, 0.5) or `max`.
    #[arg(long, default_value = "1")]
    pub replay_speed: crate::replay::Speed,
    /// The replayed timestamps: `shift` (the first reading is taken when the
    /// run starts) or `keep` (as recorded: for files within the pipeline's
    /// allowed lateness).
    #[arg(long, value_enum, default_value = "shift")]
    pub replay_time: crate::replay::TimeMode,
    /// Shape the payload: a JSON template inline (starting with `{`) or a
    /// file, with {{seq}}, {{ts}}, {{metrics}}, {{metric:NAME}}, {{device}}
    /// and {{fleet}}.
    #[arg(long, value_name = "TEMPLATE")]
    pub payload_template: Option<String>,
    #[command(flatten)]
    pub liveness: crate::liveness::LivenessArgs,
    /// The query API's bearer token (verify reads with it).
    #[arg(long, env = "IOTPIPE_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
}

impl Args {
    /// TLS options, for an `mqtts://` broker only.
    fn tls(&self) -> anyhow::Result<Option<TlsOptions>> {
        let client_cert = match (&self.cert, &self.key, &self.cert_dir) {
            (Some(cert), Some(key), _) => ClientCert::Shared {
                cert: cert.clone(),
                key: key.clone(),
            },
            (_, _, Some(dir)) => ClientCert::PerDevice(dir.clone()),
            _ => ClientCert::None,
        };
        let tls_asked =
            self.ca.is_some() || client_cert != ClientCert::None || !self.alpn.is_empty();
        let tls = if BrokerAddr::is_tls_url(&self.broker) {
            Some(TlsOptions {
                ca: self.ca.clone(),
                client_cert,
                alpn: self.alpn.clone(),
            })
        } else {
            ensure!(
                !tls_asked,
                "--ca, --cert, --cert-dir and --alpn need a TLS broker: mqtts://HOST:PORT"
            );
            None
        };
        Ok(tls)
    }

    /// Each metric with its signal profile (`--signal METRIC=PROFILE`).
    fn metric_specs(&self) -> anyhow::Result<Vec<MetricSpec>> {
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
        Ok(self
            .metrics
            .iter()
            .map(|name| MetricSpec {
                name: name.clone(),
                signal: signals.get(name).copied().unwrap_or_default(),
            })
            .collect())
    }

    /// `--report json FILE`.
    fn report_json(&self) -> anyhow::Result<Option<PathBuf>> {
        Ok(match self.report.as_slice() {
            [] => None,
            [format, file] if format == "json" => Some(PathBuf::from(file)),
            [format, _] => bail!("--report supports json, not `{format}`"),
            _ => bail!("--report takes a format and a file: --report json FILE"),
        })
    }

    /// The run these arguments ask for. `terminal`: whether stdout is one.
    pub fn into_config(self, terminal: bool) -> anyhow::Result<SimConfig> {
        let mut brokers = self
            .broker
            .split(',')
            .map(|b| b.trim().parse::<BrokerAddr>().map_err(anyhow::Error::msg));
        let broker = brokers.next().context("--broker names no broker")??;
        let more_brokers = brokers.collect::<anyhow::Result<Vec<_>>>()?;
        let tls = self.tls()?;
        let source_addrs = match &self.source_addrs {
            None => Vec::new(),
            Some(s) => parse_source_addrs(s)?,
        };
        let scenario = match &self.scenario {
            Some(path) => Some(Scenario::load(path)?),
            None => None,
        };
        let rate = match (self.rate, self.total_rate) {
            (_, Some(t)) => Rate::Total(t),
            (r, None) => Rate::PerDevice(r.unwrap_or(1.0)),
        };
        let stop = match (self.duration, self.count) {
            (Some(d), _) => Stop::After(d),
            (None, Some(c)) => Stop::Count(c),
            (None, None) if scenario.is_some() => Stop::Count(0),
            (None, None) if self.replay.is_some() => Stop::Count(u64::MAX),
            (None, None) => bail!("give --duration or --count (or --scenario)"),
        };
        let metrics = self.metric_specs()?;
        let payload_template = match &self.payload_template {
            Some(t) => Some(crate::template::Template::load(t)?),
            None => None,
        };
        let report_json = self.report_json()?;
        let processes = self.processes()?;
        Ok(SimConfig {
            broker,
            more_brokers,
            devices: self.devices,
            rate,
            stop,
            qos: self.qos,
            fleet: self.fleet.unwrap_or_else(|| {
                default_fleet(self.ledger.is_some(), crate::now_us().unsigned_abs())
            }),
            metrics,
            seed: self.seed,
            readings_per_message: self.readings_per_message,
            device_prefix: self.device_prefix,
            verify: self.verify,
            verify_timeout: self.verify_timeout,
            verify_concurrency: self.verify_concurrency,
            ledger: self.ledger,
            connect_rate: self.connect_rate,
            connect_timeout: self.connect_timeout,
            ack_timeout: self.ack_timeout,
            allowed_lateness: self.allowed_lateness,
            clock_skew: self.clock_skew,
            arrival_slack: self.arrival_slack,
            watermark_slack: self.watermark_slack,
            faults: FaultConfig {
                duplicate_rate: self.duplicate_rate,
                reorder_rate: self.reorder_rate,
                late_rate: self.late_rate,
                late_by_ms: self.late_by.map(|d| d.as_millis() as i64).unwrap_or(0),
                malformed_rate: self.malformed_rate,
            },
            report_json,
            progress: terminal && !self.quiet,
            protocol: self.protocol,
            tls,
            source_addrs,
            keep_alive: self.keep_alive,
            max_inflight: self.max_inflight,
            username: self.username,
            password: self.password,
            presence_topic: self.presence_topic,
            hold_connections: self.hold_connections,
            freshness_sample: self.freshness_sample,
            scenario,
            metrics_listen: self.metrics_listen,
            live: None,
            replay: self.replay.map(|file| crate::replay::ReplayConfig {
                file,
                speed: self.replay_speed,
                time: self.replay_time,
            }),
            payload_template,
            processes,
            worker: self
                .worker
                .as_deref()
                .map(crate::processes::Slot::parse)
                .transpose()?,
            alert_rules: match &self.alert_rules {
                Some(path) => crate::verify::alerts::load_rules(path)?,
                None => Vec::new(),
            },
            liveness: self.liveness.config(),
            api_token: self.api_token,
        })
    }
}

impl Args {
    /// `--processes`: its workers run this executable; the caller knows the
    /// command line they get (see `main`).
    fn processes(&self) -> anyhow::Result<Option<crate::processes::Processes>> {
        let Some(count) = self.processes else {
            return Ok(None);
        };
        Ok(Some(crate::processes::Processes {
            count,
            exe: std::env::current_exe().context("finding the simulator's executable")?,
            args: Vec::new(),
        }))
    }
}

/// The fleet a run publishes as when `--fleet` is not given: a fresh name
/// per run (from `run_key`, e.g. the start time in µs), so that running
/// again against the same pipeline verifies only the new run; with a ledger,
/// `sim`, the fleet the ledger's runs continue.
pub fn default_fleet(ledger: bool, run_key: u64) -> String {
    if ledger {
        return "sim".into();
    }
    format!("sim-{:06x}", crate::signal::mix(run_key, 0) & 0xff_ffff)
}

/// Ready-to-run queries of what the run wrote, for after the summary: its
/// fleet's first metric at 1m, and its first device. `None` without an API
/// URL, or for a scenario (whose fleets have their own names).
pub fn query_lines(cfg: &SimConfig) -> Option<String> {
    let api = cfg.verify.as_deref()?.trim_end_matches('/');
    if cfg.scenario.is_some() || cfg.replay.is_some() || cfg.devices == 0 {
        return None;
    }
    let metric = cfg
        .metrics
        .first()
        .map_or("temperature", |m| m.name.as_str());
    Some(format!(
        "query: curl -s '{api}/v1/fleets/{}/metrics/{metric}?res=1m'\nquery: curl -s '{api}/v1/devices/{}{:05}'\n",
        cfg.fleet,
        cfg.prefix(),
        0
    ))
}

/// `127.0.0.1,127.0.0.2` or a count `N` for 127.0.0.1 ..= 127.0.0.N.
pub fn parse_source_addrs(s: &str) -> anyhow::Result<Vec<IpAddr>> {
    if let Ok(n) = s.trim().parse::<u8>() {
        ensure!(n >= 1, "--source-addrs count must be at least 1");
        return Ok((1..=n).map(|i| IpAddr::from([127, 0, 0, i])).collect());
    }
    s.split(',')
        .map(|a| {
            a.trim()
                .parse::<IpAddr>()
                .map_err(|e| anyhow::anyhow!("--source-addrs: `{a}`: {e}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &str) -> anyhow::Result<SimConfig> {
        let argv = std::iter::once("device-sim").chain(args.split_whitespace());
        Args::try_parse_from(argv)?.into_config(false)
    }

    #[test]
    fn a_broker_list_spreads_the_fleet_over_every_broker() {
        let c = parse("--broker mqtt://127.0.0.1:1884,mqtt://127.0.0.1:1885 --count 1").unwrap();
        assert_eq!(c.broker.port, 1884);
        let more: Vec<u16> = c.more_brokers.iter().map(|b| b.port).collect();
        assert_eq!(more, [1885]);
        assert!(
            parse("--broker mqtt://127.0.0.1:1884 --count 1")
                .unwrap()
                .more_brokers
                .is_empty()
        );
        assert!(parse("--broker mqtt://127.0.0.1:1884,x:1 --count 1").is_err());
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
        assert!(c.tls.is_none());
        assert_eq!(c.protocol, Protocol::V4);
    }

    #[test]
    fn parses_protocol_tls_and_sources() {
        let c = parse(
            "--broker mqtts://abc-ats.iot.eu-west-1.amazonaws.com --count 1 --protocol 5 \
             --ca /ca.pem --cert /c.pem --key /k.pem --source-addrs 3",
        )
        .unwrap();
        assert_eq!(c.protocol, Protocol::V5);
        assert_eq!(c.broker.port, 8883);
        assert!(c.broker.is_iot_core());
        let tls = c.tls.unwrap();
        assert_eq!(tls.ca, Some(PathBuf::from("/ca.pem")));
        assert!(matches!(tls.client_cert, ClientCert::Shared { .. }));
        assert_eq!(c.source_addrs.len(), 3);
        assert_eq!(c.source_addrs[2], IpAddr::from([127, 0, 0, 3]));
        let c = parse(
            "--broker mqtts://h:443 --count 1 --cert-dir /certs --source-addrs 127.0.0.5,::1",
        )
        .unwrap();
        assert!(matches!(
            c.tls.unwrap().client_cert,
            ClientCert::PerDevice(_)
        ));
        assert_eq!(c.source_addrs.len(), 2);
        let fast =
            parse("--broker mqtts://abc.iot.us-east-1.amazonaws.com --count 1 --rate 150").unwrap();
        assert!(
            fast.warnings()[0].contains("100 publishes/s"),
            "{:?}",
            fast.warnings()
        );
        assert!(parse("--count 1 --rate 50").unwrap().warnings().is_empty());
    }

    #[test]
    fn each_run_is_a_fresh_fleet_unless_named_or_continued() {
        let a = parse("--count 1").unwrap();
        assert!(
            a.fleet.starts_with("sim-") && a.fleet.len() == 10,
            "{}",
            a.fleet
        );
        assert_eq!(a.prefix(), format!("{}-d", a.fleet));
        assert!(a.validate().is_ok());
        assert_ne!(default_fleet(false, 1), default_fleet(false, 2));
        assert_eq!(default_fleet(false, 7), default_fleet(false, 7));
        assert_eq!(parse("--count 1 --fleet f1").unwrap().fleet, "f1");
        assert_eq!(
            parse("--count 1 --ledger /tmp/l.jsonl").unwrap().fleet,
            "sim"
        );
        let with_api = parse("--count 1 --fleet f1 --verify http://127.0.0.1:8080/").unwrap();
        assert_eq!(
            query_lines(&with_api).unwrap(),
            "query: curl -s 'http://127.0.0.1:8080/v1/fleets/f1/metrics/temperature?res=1m'\n\
             query: curl -s 'http://127.0.0.1:8080/v1/devices/f1-d00000'\n"
        );
        assert_eq!(query_lines(&a), None, "no API to query");
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
            "--broker mqtt://x:1 --count 1 --ca /ca.pem",
            "--broker mqtt://x:1 --count 1 --protocol 6",
            "--broker mqtts://x:1 --count 1 --cert /c.pem",
            "--broker mqtt://x:1 --count 1 --source-addrs 0",
            "--broker mqtt://x:1 --count 1 --source-addrs 127.0.0.1,nope",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
