//! `iotpipe up`'s settings: a TOML file for every setting, flags on top
//! ([`Overrides`]).
//!
//! Every section denies unknown keys, so a typo in a config file is an error
//! that names it rather than a setting silently left at its default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

mod alerts;
mod overrides;
mod retention;
pub use alerts::AlertsConfig;
pub use overrides::Overrides;
pub use retention::{Keep, RetentionSetting};

/// The whole configuration. `Config::default()` is what `iotpipe up` runs
/// with when given nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the stream, the rollup store and the checkpoints live.
    pub data_dir: PathBuf,
    pub mqtt: MqttConfig,
    pub broker: BrokerConfig,
    pub http: HttpConfig,
    pub stream: StreamConfig,
    pub aggregate: AggregateSettings,
    pub processor: ProcessorSettings,
    pub backend: BackendConfig,
    pub log: LogConfig,
    pub alerts: AlertsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./iotpipe-data"),
            mqtt: MqttConfig::default(),
            broker: BrokerConfig::default(),
            http: HttpConfig::default(),
            stream: StreamConfig::default(),
            aggregate: AggregateSettings::default(),
            processor: ProcessorSettings::default(),
            backend: BackendConfig::default(),
            log: LogConfig::default(),
            alerts: AlertsConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// The MQTT endpoint's address. Loopback unless told otherwise: exposing
    /// it is a decision, see README's "Exposing iotpipe".
    pub listen: SocketAddr,
    /// Connections served at once.
    pub max_connections: usize,
    /// QoS 1 publishes a connection may have waiting for durability.
    pub max_inflight: usize,
    /// The least time between two durable writes; zero writes whenever the
    /// stream can take another.
    #[serde(with = "duration_text")]
    pub commit_interval: Duration,
    /// `commit_interval` holds only while at least this many connections
    /// are open (see `ingest::GroupCommit`).
    pub commit_interval_min_connections: u64,
    /// Serve plain MQTT on `listen`; off, only the TLS listener runs.
    pub plain: bool,
    /// MQTT over TLS, with `tls_cert` and `tls_key`.
    pub tls_listen: Option<SocketAddr>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// CA certificates that client certificates must chain to; a verified
    /// certificate's subject CN is the device's identity.
    pub tls_client_ca: Option<PathBuf>,
    /// Refuse TLS clients without a certificate.
    pub tls_require_client_cert: bool,
    /// Usernames and salted password hashes (`iotpipe users add`): with it,
    /// a client must log in, and may publish only as its own device.
    pub users_file: Option<PathBuf>,
    /// Append a presence record when a device connects, disconnects, or
    /// loses a connection it left a Last Will for: what `offline` is. With
    /// a broker in front, the bridge reads the devices' status topics
    /// (`ingest::bridge::presence`) instead.
    pub presence: bool,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            max_connections: 100_000,
            max_inflight: 1000,
            commit_interval: Duration::from_millis(5),
            commit_interval_min_connections: 100,
            plain: true,
            tls_listen: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            tls_require_client_cert: false,
            users_file: None,
            presence: true,
        }
    }
}

/// An external MQTT broker to take telemetry from, instead of (or beside)
/// devices connecting to iotpipe directly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// `mqtt://HOST:PORT` or `mqtts://HOST:PORT`; unset, no bridge runs.
    pub url: Option<String>,
    /// The bridge's client id. Its persistent session at the broker holds
    /// what iotpipe has not yet stored, so keep it stable.
    pub client_id: String,
    pub username: Option<String>,
    /// A file holding the password, so that it is not on the command line.
    pub password_file: Option<PathBuf>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            url: None,
            client_id: "iotpipe-bridge".into(),
            username: None,
            password_file: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// The query API's address.
    pub listen: SocketAddr,
    /// A file of bearer tokens (`TOKEN [read|admin]` per line). Unset, the API
    /// answers anyone who can reach it, which is why it binds to loopback.
    pub token_file: Option<PathBuf>,
    /// Requests served at once; more are answered 503 at once.
    pub max_concurrent: usize,
    /// The longest a request may take.
    #[serde(with = "duration_text")]
    pub timeout: Duration,
    /// A device that sent no reading for this long is `stale`.
    #[serde(with = "duration_text")]
    pub stale_after: Duration,
    /// A fleet's own `stale_after`, by fleet id.
    pub stale_after_fleets: BTreeMap<String, humantime_serde::Serde<Duration>>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            token_file: None,
            max_concurrent: 256,
            timeout: Duration::from_secs(10),
            stale_after: Duration::from_secs(300),
            stale_after_fleets: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamConfig {
    /// Shards of the embedded log, fixed when the data directory is created.
    pub shards: u32,
    /// How long the stream keeps records once every consumer has read them.
    #[serde(with = "duration_text")]
    pub retention: Duration,
    /// The most bytes the embedded log's segments may hold. Over it, the
    /// oldest are deleted even if unread; what is lost is counted, reported by
    /// `/healthz` and dead-lettered. Unset: no budget, and unread records are
    /// kept however long the processors stall.
    pub max_bytes: Option<u64>,
    /// Sync appends to disk before acknowledging them (off: an acknowledged
    /// reading survives a crash of iotpipe but not of the machine).
    pub sync: bool,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            shards: 4,
            retention: Duration::from_secs(24 * 3600),
            max_bytes: None,
            sync: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AggregateSettings {
    /// Stored window lengths, finest first; each a multiple of the finest.
    pub resolutions: Vec<String>,
    /// How long after its end a window still takes readings.
    #[serde(with = "duration_text")]
    pub allowed_lateness: Duration,
    /// How long windows are kept after their end, per resolution.
    pub retention: RetentionSetting,
    /// How long refused messages are kept for inspection.
    #[serde(with = "duration_text")]
    pub dead_letter_retention: Duration,
    /// At most this many dead letters are kept per reason.
    pub dead_letters_per_reason: usize,
    /// How far out of arrival order records may reach the processors.
    #[serde(with = "duration_text")]
    pub watermark_slack: Duration,
    /// How much of a device's finest windows one span item holds: `auto`
    /// or a duration (`1m`).
    pub span: String,
}

impl Default for AggregateSettings {
    fn default() -> Self {
        let d = rollup::AggregateConfig::default();
        AggregateSettings {
            resolutions: d.resolutions.iter().map(|r| r.to_string()).collect(),
            allowed_lateness: ms(d.allowed_lateness_ms),
            retention: RetentionSetting::Named(rollup::config::format_retention(
                &d.resolutions,
                &d.retention_ms,
            )),
            dead_letter_retention: ms(d.dead_letter_retention_ms),
            dead_letters_per_reason: 10_000,
            watermark_slack: ms(d.watermark_slack_ms),
            span: "auto".into(),
        }
    }
}

/// Durations in a config file: read as humantime reads them (`90days`,
/// `1h 30m`), written in the largest unit that divides them (`90d`, `90m`).
/// humantime's own output counts months of 30.44 days, which turns a file's
/// `90days` into `2months 29days 2h 52m 48s` in `iotpipe config check`.
pub(crate) mod duration_text {
    use std::time::Duration;

    use serde::{Deserializer, Serializer};

    const UNITS: [(&str, u128); 6] = [
        ("d", 86_400_000_000_000),
        ("h", 3_600_000_000_000),
        ("m", 60_000_000_000),
        ("s", 1_000_000_000),
        ("ms", 1_000_000),
        ("us", 1_000),
    ];

    pub fn format(d: Duration) -> String {
        let ns = d.as_nanos();
        if ns == 0 {
            return "0s".into();
        }
        for (unit, size) in UNITS {
            if ns.is_multiple_of(size) {
                return format!("{}{unit}", ns / size);
            }
        }
        format!("{ns}ns")
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        humantime_serde::deserialize(d)
    }
}

fn ms(v: i64) -> Duration {
    Duration::from_millis(u64::try_from(v).unwrap_or(0))
}

fn to_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessorSettings {
    /// Most stream records folded into the store in one batch.
    pub batch_max_records: usize,
    /// How often applied batches are written to disk and checkpointed. Longer
    /// means fewer writes (a window that changed several times is written
    /// once per interval) and a longer replay after a crash; queries see
    /// applied readings at once either way.
    #[serde(with = "duration_text")]
    pub flush_interval: Duration,
    /// Flush before the interval is up once this many changed items wait:
    /// bounds the memory they hold and how long one flush takes.
    pub flush_max_dirty_items: usize,
}

impl Default for ProcessorSettings {
    fn default() -> Self {
        ProcessorSettings {
            batch_max_records: 10_000,
            flush_interval: Duration::from_secs(10),
            flush_max_dirty_items: 500_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StreamKind {
    /// The durable local log in the data directory.
    Embedded,
    /// An Amazon Kinesis data stream.
    Kinesis,
    /// A NATS JetStream stream (`nats_url`).
    Nats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// SQLite in the data directory.
    Sqlite,
    /// An Amazon DynamoDB table.
    Dynamodb,
    /// A PostgreSQL database (`backend.postgres_url`).
    Postgres,
}

/// Where the stream and the store live. The AWS backends use the SDK's
/// usual configuration (environment, profile); `endpoint_url` points them at
/// a wire-compatible server instead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    pub stream: StreamKind,
    pub store: StoreKind,
    pub endpoint_url: Option<String>,
    pub region: Option<String>,
    /// The Kinesis or JetStream stream, created with `stream.shards` shards
    /// if missing.
    pub stream_name: String,
    /// The NATS server of the `nats` stream, or a cluster's servers,
    /// comma-separated.
    pub nats_url: String,
    /// Copies JetStream keeps of a new `nats` stream, one per cluster node
    /// (at most 5): an append is acknowledged once a majority has stored it.
    pub nats_replicas: usize,
    /// The DynamoDB table where Kinesis consumers keep their shard leases
    /// and checkpoints.
    pub lease_table: String,
    /// How long a process's shard leases outlive its last renewal: how long
    /// a dead process's shards wait before another takes them.
    #[serde(with = "duration_text")]
    pub lease_duration: Duration,
    /// The DynamoDB table of rollups, created on demand if missing.
    pub table_name: String,
    /// The PostgreSQL database of rollups (`store = "postgres"`), as a URL
    /// or `key=value` pairs; iotpipe creates and migrates its tables.
    pub postgres_url: Option<String>,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            stream: StreamKind::Embedded,
            store: StoreKind::Sqlite,
            endpoint_url: None,
            region: None,
            stream_name: "iotpipe-telemetry".into(),
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_replicas: 1,
            lease_table: "iotpipe-leases".into(),
            lease_duration: Duration::from_secs(10),
            table_name: "iotpipe-rollups".into(),
            postgres_url: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable on a terminal, JSON otherwise.
    Auto,
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Auto,
        }
    }
}

impl Config {
    /// Reads a config file; unknown keys and bad values are errors.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let config: Config = toml::from_str(&text)
            .with_context(|| format!("config file {} is invalid", path.display()))?;
        config.alerts()?;
        Ok(config)
    }

    /// The alert loop's settings, validated; `None` without rules.
    pub fn alerts(&self) -> anyhow::Result<Option<processors::alerts::AlertsSetup>> {
        self.alerts.setup(&self.aggregate()?)
    }

    /// The processors' view, validated.
    pub fn aggregate(&self) -> anyhow::Result<rollup::AggregateConfig> {
        let resolutions = self
            .aggregate
            .resolutions
            .iter()
            .map(|r| r.parse::<schemas::Resolution>().map_err(anyhow::Error::msg))
            .collect::<anyhow::Result<Vec<_>>>()
            .context("aggregate.resolutions")?;
        let retention_ms = self
            .aggregate
            .retention
            .resolve(&resolutions)
            .map_err(anyhow::Error::msg)
            .context("aggregate.retention")?;
        let cfg = rollup::AggregateConfig {
            resolutions,
            allowed_lateness_ms: to_ms(self.aggregate.allowed_lateness),
            retention_ms,
            stream_retention_ms: to_ms(self.stream.retention),
            dead_letter_retention_ms: to_ms(self.aggregate.dead_letter_retention),
            watermark_slack_ms: to_ms(self.aggregate.watermark_slack),
            span: self.span_ms().context("aggregate.span")?,
            ..rollup::AggregateConfig::default()
        };
        cfg.validate()
            .map_err(anyhow::Error::msg)
            .context("aggregate settings")?;
        Ok(cfg)
    }

    /// `aggregate.span`: `None` for `auto`.
    fn span_ms(&self) -> anyhow::Result<Option<i64>> {
        match self.aggregate.span.trim() {
            "auto" => Ok(None),
            text => humantime::parse_duration(text)
                .map(|d| Some(to_ms(d)))
                .map_err(|e| anyhow::anyhow!("`{text}` is neither auto nor a duration: {e}")),
        }
    }
}

/// `iotpipe config default`: every setting, its default and why it exists.
pub const DEFAULT_TOML: &str = include_str!("config/default.toml");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_printed_default_is_the_default() {
        let parsed: Config = toml::from_str(DEFAULT_TOML).unwrap();
        assert_eq!(parsed, Config::default());
        parsed.aggregate().unwrap();
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = toml::from_str::<Config>("[mqtt]\nlisten_addr = \"0.0.0.0:1\"\n").unwrap_err();
        assert!(err.to_string().contains("listen_addr"), "{err}");
    }

    #[test]
    fn durations_print_in_their_largest_whole_unit() {
        let file = "[stream]\nretention = \"36h\"\n[aggregate]\nallowed_lateness = \"90min\"\nretention = [\"7days\", \"90days\", \"1098days\"]\n[processor]\nflush_interval = \"1500ms\"\n";
        let parsed: Config = toml::from_str(file).unwrap();
        let printed = toml::to_string_pretty(&parsed).unwrap();
        for line in [
            r#"retention = "36h""#,
            r#"allowed_lateness = "90m""#,
            // `to_string_pretty` puts each element of an array on a line.
            "\"7d\",\n",
            "\"90d\",\n",
            "\"1098d\",\n",
            r#"flush_interval = "1500ms""#,
            r#"commit_interval = "5ms""#,
        ] {
            assert!(printed.contains(line), "no `{line}` in:\n{printed}");
        }
        assert_eq!(toml::from_str::<Config>(&printed).unwrap(), parsed);
        assert_eq!(duration_text::format(Duration::from_nanos(1_500)), "1500ns");
    }

    #[test]
    fn bad_resolutions_are_errors() {
        let mut c = Config::default();
        c.aggregate.resolutions = vec!["1m".into(), "90s".into()];
        c.aggregate.retention = RetentionSetting::List(vec![Keep(None); 2]);
        let err = c.aggregate().unwrap_err();
        assert!(format!("{err:#}").contains("90s"), "{err:#}");
    }

    #[test]
    fn the_span_is_auto_or_a_duration_that_fits_the_resolutions() {
        let span = |text: &str| {
            let c: Config = toml::from_str(&format!("[aggregate]\nspan = \"{text}\"\n")).unwrap();
            c.aggregate().map(|a| (a.span, a.span_ms()))
        };
        assert_eq!(span("auto").unwrap(), (None, 600_000));
        assert_eq!(span("1m").unwrap(), (Some(60_000), 60_000));
        for (text, why) in [
            ("7m", "does not divide resolution 1h"),
            ("20m", "not one to 10 finest windows"),
            ("soon", "neither auto nor a duration"),
        ] {
            let err = format!("{:#}", span(text).unwrap_err());
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn retention_is_named_per_resolution_or_listed() {
        let read = |text: &str| {
            let c: Config = toml::from_str(&format!("[aggregate]\n{text}\n")).unwrap();
            c.aggregate()
                .map(|a| a.retention_ms)
                .map_err(|e| format!("{e:#}"))
        };
        const DAY: i64 = 86_400_000;
        assert_eq!(
            read(r#"retention = "1m=30d,1h=400d,1d=forever""#),
            Ok(vec![Some(30 * DAY), Some(400 * DAY), None])
        );
        assert_eq!(
            read(r#"retention = ["30days", "forever", "3y"]"#).map(|r| r[..2].to_vec()),
            Ok(vec![Some(30 * DAY), None])
        );
        let err = read(r#"retention = "1m=30d,5m=1d""#).unwrap_err();
        assert!(
            err.contains("aggregate.retention") && err.contains("5m"),
            "{err}"
        );
        let err = toml::from_str::<Config>("[aggregate]\nretention = [\"always\"]\n").unwrap_err();
        assert!(err.to_string().contains("retention"), "{err}");
    }
}
