//! `iotpipe up`'s flags that override a setting of the config file.
//!
//! Each flag is optional: unset, the file's value (or the default) stands.
//! [`Overrides::apply`] is the one place that maps a flag onto its setting,
//! one line per flag.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::{Config, LogFormat, StoreKind, StreamKind};

/// The flags of `iotpipe up` that override the config file.
#[derive(Debug, Default, Clone, PartialEq, clap::Args)]
pub struct Overrides {
    /// Where the stream, rollups and checkpoints live [default: ./iotpipe-data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// MQTT endpoint address [default: 127.0.0.1:1883].
    #[arg(long)]
    pub mqtt_listen: Option<SocketAddr>,
    /// Query API address [default: 127.0.0.1:8080].
    #[arg(long)]
    pub http_listen: Option<SocketAddr>,
    /// Shards of a new stream [default: 4].
    #[arg(long)]
    pub shards: Option<u32>,
    /// How long after its end a window still takes readings, e.g. 1h, 30m [default: 1h].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub allowed_lateness: Option<Duration>,
    /// How long windows are kept after their end, per resolution, e.g.
    /// 1m=30d,1h=400d,1d=forever [default: 1m=7d,1h=90d,1d=1098d].
    #[arg(long)]
    pub retention: Option<String>,
    /// How much of a device's finest windows one stored span holds: auto,
    /// or a duration such as 1m for devices that publish every second
    /// [default: auto]. A store keeps the span it was first written with.
    #[arg(long)]
    pub span: Option<String>,
    /// A device that sent no reading for this long is listed `stale`, e.g.
    /// 5m, 90s [default: 5m]; a fleet may have its own (`http.stale_after_fleets`).
    #[arg(long, value_parser = processors::api::StaleAfter::parse)]
    pub stale_after: Option<Duration>,
    /// Take telemetry from an external MQTT broker (mqtt://HOST:PORT): a
    /// persistent QoS 1 subscription, each message acknowledged once durable.
    #[arg(long)]
    pub broker: Option<String>,
    /// The bridge's client id at the broker [default: iotpipe-bridge].
    #[arg(long)]
    pub broker_client_id: Option<String>,
    #[arg(long)]
    pub broker_username: Option<String>,
    /// A file holding the broker password.
    #[arg(long)]
    pub broker_password_file: Option<PathBuf>,
    /// Usernames and salted password hashes (`iotpipe users add`); with it,
    /// each client may publish only as its own device.
    #[arg(long)]
    pub users_file: Option<PathBuf>,
    /// A file of API bearer tokens, one `TOKEN [read|admin]` per line; without
    /// it the API answers anyone who can reach it.
    #[arg(long)]
    pub api_token_file: Option<PathBuf>,
    /// The stream: the embedded durable log, Amazon Kinesis or NATS
    /// JetStream [default: embedded].
    #[arg(long, value_enum)]
    pub stream: Option<StreamKind>,
    /// The rollup store: SQLite, Amazon DynamoDB or PostgreSQL [default: sqlite].
    #[arg(long, value_enum)]
    pub store: Option<StoreKind>,
    /// A wire-compatible AWS endpoint (e.g. http://127.0.0.1:5000 for moto)
    /// for the Kinesis and DynamoDB backends.
    #[arg(long)]
    pub endpoint_url: Option<String>,
    /// AWS region for the Kinesis and DynamoDB backends [default: from the environment].
    #[arg(long)]
    pub region: Option<String>,
    /// The Kinesis or JetStream stream [default: iotpipe-telemetry].
    #[arg(long)]
    pub stream_name: Option<String>,
    /// The NATS server of the `nats` stream [default: nats://127.0.0.1:4222].
    #[arg(long)]
    pub nats_url: Option<String>,
    /// The DynamoDB table of rollups [default: iotpipe-rollups].
    #[arg(long)]
    pub table_name: Option<String>,
    /// The PostgreSQL database for `--store postgres`, as a URL
    /// (postgresql://USER@HOST/DATABASE) or key=value pairs.
    #[arg(long)]
    pub postgres_url: Option<String>,
    /// Log format [default: auto: text on a terminal, JSON otherwise].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
}

impl Overrides {
    /// Sets every setting whose flag was given, and leaves the rest.
    pub fn apply(self, c: &mut Config) {
        set(&mut c.data_dir, self.data_dir);
        set(&mut c.mqtt.listen, self.mqtt_listen);
        set(&mut c.http.listen, self.http_listen);
        set(&mut c.stream.shards, self.shards);
        set(&mut c.aggregate.allowed_lateness, self.allowed_lateness);
        set(
            &mut c.aggregate.retention,
            self.retention.map(super::RetentionSetting::Named),
        );
        set(&mut c.aggregate.span, self.span);
        set(&mut c.http.stale_after, self.stale_after);
        set_some(&mut c.broker.url, self.broker);
        set(&mut c.broker.client_id, self.broker_client_id);
        set_some(&mut c.broker.username, self.broker_username);
        set_some(&mut c.broker.password_file, self.broker_password_file);
        set_some(&mut c.mqtt.users_file, self.users_file);
        set_some(&mut c.http.token_file, self.api_token_file);
        set(&mut c.backend.stream, self.stream);
        set(&mut c.backend.store, self.store);
        set_some(&mut c.backend.endpoint_url, self.endpoint_url);
        set_some(&mut c.backend.region, self.region);
        set(&mut c.backend.stream_name, self.stream_name);
        set(&mut c.backend.nats_url, self.nats_url);
        set(&mut c.backend.table_name, self.table_name);
        set_some(&mut c.backend.postgres_url, self.postgres_url);
        set(&mut c.log.format, self.log_format);
    }
}

/// A setting that always has a value.
fn set<T>(setting: &mut T, flag: Option<T>) {
    if let Some(v) = flag {
        *setting = v;
    }
}

/// A setting that may be unset: a flag sets it, no flag keeps the file's.
fn set_some<T>(setting: &mut Option<T>, flag: Option<T>) {
    if flag.is_some() {
        *setting = flag;
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        overrides: Overrides,
    }

    fn parse(args: &[&str]) -> Overrides {
        let argv = std::iter::once("iotpipe").chain(args.iter().copied());
        Flags::try_parse_from(argv).unwrap().overrides
    }

    #[test]
    fn no_flag_changes_nothing() {
        let mut config = Config {
            data_dir: "/from-the-file".into(),
            ..Config::default()
        };
        config.broker.url = Some("mqtt://from-the-file:1883".into());
        let before = config.clone();
        parse(&[]).apply(&mut config);
        assert_eq!(config, before);
    }

    #[test]
    fn every_flag_sets_its_setting() {
        let mut config = Config::default();
        parse(&[
            "--data-dir=/d",
            "--mqtt-listen=0.0.0.0:1",
            "--http-listen=0.0.0.0:2",
            "--shards=7",
            "--allowed-lateness=5m",
            "--span=1m",
            "--broker=mqtt://b:1883",
            "--broker-client-id=cid",
            "--broker-username=u",
            "--broker-password-file=/p",
            "--users-file=/users",
            "--api-token-file=/tokens",
            "--stream=kinesis",
            "--store=dynamodb",
            "--endpoint-url=http://127.0.0.1:5000",
            "--region=eu-west-1",
            "--stream-name=s",
            "--nats-url=nats://n:4222",
            "--table-name=t",
            "--postgres-url=host=/run/postgresql dbname=iotpipe",
            "--log-format=json",
        ])
        .apply(&mut config);
        let mut want = Config {
            data_dir: "/d".into(),
            ..Config::default()
        };
        want.mqtt.listen = "0.0.0.0:1".parse().unwrap();
        want.http.listen = "0.0.0.0:2".parse().unwrap();
        want.stream.shards = 7;
        want.aggregate.allowed_lateness = Duration::from_secs(300);
        want.aggregate.span = "1m".into();
        want.broker.url = Some("mqtt://b:1883".into());
        want.broker.client_id = "cid".into();
        want.broker.username = Some("u".into());
        want.broker.password_file = Some("/p".into());
        want.mqtt.users_file = Some("/users".into());
        want.http.token_file = Some("/tokens".into());
        want.backend.stream = StreamKind::Kinesis;
        want.backend.store = StoreKind::Dynamodb;
        want.backend.endpoint_url = Some("http://127.0.0.1:5000".into());
        want.backend.region = Some("eu-west-1".into());
        want.backend.stream_name = "s".into();
        want.backend.nats_url = "nats://n:4222".into();
        want.backend.table_name = "t".into();
        want.backend.postgres_url = Some("host=/run/postgresql dbname=iotpipe".into());
        want.log.format = LogFormat::Json;
        assert_eq!(config, want);
    }
}
