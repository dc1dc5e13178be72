//! `iotpipe cost`: what a load profile costs a month on the AWS deployment
//! (`deploy/`): IoT Core, its rule, Kinesis, the aggregate Lambda function
//! and DynamoDB on demand.
//!
//! The model follows the services' metering, not a flat rate per message:
//! IoT Core meters messages and rules in 5 KB increments (Basic Ingest skips
//! the messaging charge), Kinesis on demand rounds each record up to 1 KB,
//! and DynamoDB is charged per item write. Items written per batch follow
//! the core's keys: each device in a batch writes its windows (metrics x
//! resolutions) and its dedup item, each fleet its windows, each batch its
//! counters and applied mark, however many readings the batch holds. So
//! pre-aggregation pays when a batch holds several readings per device, and
//! not at all when devices report once a minute. `scripts/bench` measures
//! the same figure end to end (docs/BENCHMARKS.md); `--write-amplification`
//! overrides the model with a measured one.
//!
//! Prices come from a dated table ([`Prices`]); the default is
//! `src/prices.toml`, compiled in.

use std::fmt::Write as _;

use serde::Deserialize;

/// The price table compiled into the binary.
pub const DEFAULT_PRICES: &str = include_str!("prices.toml");

/// Hours in AWS's billing month.
const HOURS_PER_MONTH: f64 = 730.0;
const SECONDS_PER_MONTH: f64 = HOURS_PER_MONTH * 3600.0;
const MILLION: f64 = 1e6;
const GB: f64 = 1024.0 * 1024.0 * 1024.0;

/// A fleet's load and the deployment's settings.
#[derive(Debug, Clone)]
pub struct Profile {
    pub devices: u64,
    /// Messages each device publishes per second (0.0167 is one a minute).
    pub msgs_per_device_per_s: f64,
    /// MQTT payload bytes of one message.
    pub payload_bytes: u64,
    /// Topic bytes, metered with the payload (`dt/fleet/device/telemetry`).
    pub topic_bytes: u64,
    pub readings_per_message: u64,
    /// Publish to `$aws/rules/...` topics, which IoT Core does not charge
    /// as messaging.
    pub basic_ingest: bool,
    /// Rollup store writes per reading accepted; `None` computes it from
    /// the batch shape (see the module comment).
    pub write_amplification: Option<f64>,
    pub metrics_per_reading: u64,
    /// Stored resolutions (1m, 1h, 1d by default).
    pub resolutions: u64,
    pub fleets: u64,
    /// Write units per item write: rollup items with quantile sketches can
    /// pass 1 KB.
    pub write_units_per_write: f64,
    pub kinesis: KinesisMode,
    /// Most records per Lambda invocation (the event source's BatchSize).
    pub batch_size: u64,
    /// How long the event source gathers records before invoking
    /// (MaximumBatchingWindowInSeconds; at least 1 s between polls of a
    /// shard). Longer windows mean fewer rewrites of the same windows.
    pub batching_window_s: f64,
    pub lambda_memory_mb: u64,
    /// Billed duration of one invocation: a fixed part (startup of the
    /// handler, the load round trip) ...
    pub lambda_base_ms: f64,
    /// ... plus this much per store write (writes go out 16 at a time).
    pub lambda_ms_per_write: f64,
    /// Rollup items kept (windows times series); storage is billed on it.
    pub stored_items: u64,
    pub item_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KinesisMode {
    OnDemand,
    Provisioned,
}

/// A dated price table; see `src/prices.toml` for units.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prices {
    pub as_of: String,
    pub region: String,
    pub sources: Vec<String>,
    pub iot_core: IotCorePrices,
    pub kinesis: KinesisPrices,
    pub lambda: LambdaPrices,
    pub dynamodb: DynamoPrices,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IotCorePrices {
    pub connectivity_per_million_minutes: f64,
    pub messaging_tiers: Vec<Tier>,
    pub rules_triggered_per_million: f64,
    pub actions_executed_per_million: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    pub up_to_millions: f64,
    pub usd_per_million: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KinesisPrices {
    pub on_demand_stream_hour: f64,
    pub on_demand_ingest_per_gb: f64,
    pub on_demand_retrieval_per_gb: f64,
    pub shard_hour: f64,
    pub put_payload_units_per_million: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LambdaPrices {
    pub per_gb_second: f64,
    pub per_million_requests: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DynamoPrices {
    pub per_million_write_units: f64,
    pub per_million_read_units: f64,
    pub storage_per_gb_month: f64,
}

impl Prices {
    pub fn parse(text: &str) -> anyhow::Result<Prices> {
        let prices: Prices = toml::from_str(text)?;
        let tiers = &prices.iot_core.messaging_tiers;
        anyhow::ensure!(!tiers.is_empty(), "messaging_tiers is empty");
        anyhow::ensure!(
            tiers
                .windows(2)
                .all(|w| w[0].up_to_millions < w[1].up_to_millions),
            "messaging_tiers must rise"
        );
        anyhow::ensure!(
            tiers.last().is_some_and(|t| t.up_to_millions.is_infinite()),
            "the last messaging tier must be `up_to_millions = inf`"
        );
        Ok(prices)
    }

    pub fn default_table() -> anyhow::Result<Prices> {
        Prices::parse(DEFAULT_PRICES)
    }
}

/// One charge of the bill.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub service: &'static str,
    pub item: &'static str,
    /// Billed units a month, in `unit`.
    pub quantity: f64,
    pub unit: &'static str,
    pub usd: f64,
}

impl Line {
    /// A line billed at `unit_price` per unit.
    fn priced(
        service: &'static str,
        item: &'static str,
        quantity: f64,
        unit: &'static str,
        unit_price: f64,
    ) -> Line {
        Line {
            service,
            item,
            quantity,
            unit,
            usd: quantity * unit_price,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Estimate {
    pub lines: Vec<Line>,
    /// Readings a month, to price one reading.
    pub readings: f64,
    /// Store writes per reading, given or modelled.
    pub write_amplification: f64,
}

impl Estimate {
    pub fn total(&self) -> f64 {
        self.lines.iter().map(|l| l.usd).sum()
    }

    pub fn service(&self, service: &str) -> f64 {
        self.lines
            .iter()
            .filter(|l| l.service == service)
            .map(|l| l.usd)
            .sum()
    }
}

/// Units of `size` bytes needed for `bytes`, at least one.
fn units(bytes: u64, size: u64) -> f64 {
    bytes.div_ceil(size).max(1) as f64
}

fn tiered(millions: f64, tiers: &[Tier]) -> f64 {
    let mut usd = 0.0;
    let mut floor = 0.0;
    for t in tiers {
        let n = (millions.min(t.up_to_millions) - floor).max(0.0);
        usd += n * t.usd_per_million;
        floor = t.up_to_millions;
        if millions <= floor {
            break;
        }
    }
    usd
}

pub fn estimate(p: &Profile, prices: &Prices) -> Estimate {
    let mut lines = Vec::new();
    let msgs_per_s = p.devices as f64 * p.msgs_per_device_per_s;
    let msgs = msgs_per_s * SECONDS_PER_MONTH;
    let readings = msgs * p.readings_per_message as f64;
    let metered = p.payload_bytes + p.topic_bytes;
    let iot = &prices.iot_core;

    // IoT Core.
    let minutes = p.devices as f64 * HOURS_PER_MONTH * 60.0;
    lines.push(Line::priced(
        "IoT Core",
        "connectivity",
        minutes / MILLION,
        "M connection-minutes",
        iot.connectivity_per_million_minutes,
    ));
    let five_kb = units(metered, 5 * 1024);
    if !p.basic_ingest {
        let m = msgs * five_kb / MILLION;
        lines.push(Line {
            service: "IoT Core",
            item: "messaging (5 KB units)",
            quantity: m,
            unit: "M messages",
            usd: tiered(m, &iot.messaging_tiers),
        });
    }
    let rules = msgs * five_kb / MILLION;
    lines.push(Line::priced(
        "IoT Core",
        "rules triggered",
        rules,
        "M rules",
        iot.rules_triggered_per_million,
    ));
    // One action per message: the Kinesis put.
    lines.push(Line::priced(
        "IoT Core",
        "actions executed",
        rules,
        "M actions",
        iot.actions_executed_per_million,
    ));

    // Kinesis: the rule puts each message as one record.
    let k = &prices.kinesis;
    let record_bytes_per_s = msgs_per_s * p.payload_bytes as f64;
    // A shard takes 1,000 records or 1 MB a second; on demand starts at 4.
    let shards = (msgs_per_s / 1000.0)
        .max(record_bytes_per_s / (1024.0 * 1024.0))
        .ceil()
        .max(1.0);
    let shards = match p.kinesis {
        KinesisMode::OnDemand => {
            let ingest_gb = msgs * units(p.payload_bytes, 1024) * 1024.0 / GB;
            let retrieval_gb = msgs * p.payload_bytes as f64 / GB;
            lines.push(Line::priced(
                "Kinesis",
                "on-demand stream hours",
                HOURS_PER_MONTH,
                "stream-hours",
                k.on_demand_stream_hour,
            ));
            lines.push(Line::priced(
                "Kinesis",
                "data in (1 KB units)",
                ingest_gb,
                "GB",
                k.on_demand_ingest_per_gb,
            ));
            lines.push(Line::priced(
                "Kinesis",
                "data out (aggregate function)",
                retrieval_gb,
                "GB",
                k.on_demand_retrieval_per_gb,
            ));
            shards.max(4.0)
        }
        KinesisMode::Provisioned => {
            let hours = shards * HOURS_PER_MONTH;
            lines.push(Line::priced(
                "Kinesis",
                "shard hours",
                hours,
                "shard-hours",
                k.shard_hour,
            ));
            let put_units = msgs * units(p.payload_bytes, 25 * 1024) / MILLION;
            lines.push(Line::priced(
                "Kinesis",
                "PUT payload units (25 KB)",
                put_units,
                "M units",
                k.put_payload_units_per_million,
            ));
            shards
        }
    };

    // Lambda: each shard's batch is one invocation, one per batching
    // window per shard while records flow, more when a window brings more
    // than a batch.
    let per_shard = msgs_per_s / shards;
    let window = p.batching_window_s.max(1.0);
    let invocations_per_s = if msgs_per_s > 0.0 {
        shards * (per_shard / p.batch_size.max(1) as f64).max(1.0 / window)
    } else {
        0.0
    };
    let invocations = invocations_per_s * SECONDS_PER_MONTH;
    let amplification = p.write_amplification.unwrap_or_else(|| {
        if invocations_per_s == 0.0 {
            return 0.0;
        }
        let records = msgs_per_s / invocations_per_s;
        let devices_per_shard = (p.devices as f64 / shards).max(1.0);
        // Expected distinct devices among `records` drawn from the shard's devices.
        let distinct = devices_per_shard * (1.0 - (1.0 - 1.0 / devices_per_shard).powf(records));
        let windows = (p.metrics_per_reading * p.resolutions) as f64;
        let per_batch = distinct * (windows + 1.0) + p.fleets as f64 * windows + 2.0;
        per_batch / (records * p.readings_per_message as f64)
    });
    let writes = readings * amplification;
    let writes_per_invocation = if invocations > 0.0 {
        writes / invocations
    } else {
        0.0
    };
    let billed_ms = (p.lambda_base_ms + p.lambda_ms_per_write * writes_per_invocation).ceil();
    let gb_s = invocations * billed_ms / 1000.0 * p.lambda_memory_mb as f64 / 1024.0;
    let l = &prices.lambda;
    lines.push(Line::priced(
        "Lambda",
        "requests",
        invocations / MILLION,
        "M requests",
        l.per_million_requests,
    ));
    lines.push(Line::priced(
        "Lambda",
        "duration (arm64)",
        gb_s,
        "GB-seconds",
        l.per_gb_second,
    ));

    // DynamoDB: every write is preceded by a strongly consistent read of
    // the item (its version is the write's condition).
    let d = &prices.dynamodb;
    let wru = writes * p.write_units_per_write / MILLION;
    let rru = writes * units(p.item_bytes, 4096) / MILLION;
    lines.push(Line::priced(
        "DynamoDB",
        "write request units",
        wru,
        "M WRU",
        d.per_million_write_units,
    ));
    lines.push(Line::priced(
        "DynamoDB",
        "read request units",
        rru,
        "M RRU",
        d.per_million_read_units,
    ));
    let storage_gb = p.stored_items as f64 * p.item_bytes as f64 / GB;
    lines.push(Line::priced(
        "DynamoDB",
        "storage",
        storage_gb,
        "GB-month",
        d.storage_per_gb_month,
    ));
    Estimate {
        lines,
        readings,
        write_amplification: amplification,
    }
}

/// The bill as a table, with the profile's totals and the price table's date.
pub fn render(p: &Profile, prices: &Prices, e: &Estimate) -> String {
    let mut out = String::new();
    let msgs_per_s = p.devices as f64 * p.msgs_per_device_per_s;
    let _ = writeln!(
        out,
        "{} devices, {:.0} msgs/s, {} readings/msg, {} B payload, {:.3} store writes per reading ({}){}",
        p.devices,
        msgs_per_s,
        p.readings_per_message,
        p.payload_bytes,
        e.write_amplification,
        if p.write_amplification.is_some() {
            "given"
        } else {
            "modelled from the batch shape"
        },
        if p.basic_ingest { ", Basic Ingest" } else { "" }
    );
    let _ = writeln!(
        out,
        "prices: {} list prices as of {}\n",
        prices.region, prices.as_of
    );
    let _ = writeln!(
        out,
        "{:<9} {:<30} {:>16} {:<22} {:>12}",
        "service", "item", "quantity", "unit", "USD/month"
    );
    for l in &e.lines {
        let _ = writeln!(
            out,
            "{:<9} {:<30} {:>16.3} {:<22} {:>12.2}",
            l.service, l.item, l.quantity, l.unit, l.usd
        );
    }
    let _ = writeln!(out);
    for s in ["IoT Core", "Kinesis", "Lambda", "DynamoDB"] {
        let _ = writeln!(out, "{:<9} {:>77.2}", s, e.service(s));
    }
    let total = e.total();
    let _ = writeln!(out, "{:<9} {:>77.2}", "total", total);
    if e.readings > 0.0 {
        let _ = writeln!(
            out,
            "per million readings: ${:.4}",
            total / e.readings * MILLION
        );
    }
    let _ = writeln!(out, "\nsources:");
    for s in &prices.sources {
        let _ = writeln!(out, "  {s}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> Profile {
        Profile {
            devices: 1000,
            msgs_per_device_per_s: 1.0,
            payload_bytes: 200,
            topic_bytes: 30,
            readings_per_message: 1,
            basic_ingest: false,
            write_amplification: Some(0.1),
            metrics_per_reading: 1,
            resolutions: 3,
            fleets: 1,
            write_units_per_write: 1.0,
            kinesis: KinesisMode::OnDemand,
            batch_size: 1000,
            batching_window_s: 1.0,
            lambda_memory_mb: 256,
            lambda_base_ms: 20.0,
            lambda_ms_per_write: 0.4,
            stored_items: 0,
            item_bytes: 600,
        }
    }

    fn line<'a>(e: &'a Estimate, item: &str) -> &'a Line {
        e.lines.iter().find(|l| l.item == item).unwrap()
    }

    #[test]
    fn the_default_table_parses_and_is_dated() {
        let p = Prices::default_table().unwrap();
        assert_eq!(p.as_of.len(), 10);
        assert!(!p.sources.is_empty());
    }

    #[test]
    fn messaging_is_metered_in_5_kb_units_and_tiered() {
        let prices = Prices::default_table().unwrap();
        let e = estimate(&profile(), &prices);
        // 1,000 msgs/s is 2,628 M messages a month: 1,000 M at $1, the rest at $0.80.
        let m = line(&e, "messaging (5 KB units)");
        assert!((m.quantity - 2628.0).abs() < 1e-6);
        assert!((m.usd - (1000.0 + 1628.0 * 0.8)).abs() < 1e-6);

        let mut big = profile();
        big.payload_bytes = 6000;
        let e = estimate(&big, &prices);
        assert!((line(&e, "messaging (5 KB units)").quantity - 2.0 * 2628.0).abs() < 1e-6);
        assert!((line(&e, "rules triggered").quantity - 2.0 * 2628.0).abs() < 1e-6);
    }

    #[test]
    fn basic_ingest_drops_only_the_messaging_charge() {
        let prices = Prices::default_table().unwrap();
        let plain = estimate(&profile(), &prices);
        let basic = estimate(
            &Profile {
                basic_ingest: true,
                ..profile()
            },
            &prices,
        );
        let messaging = line(&plain, "messaging (5 KB units)").usd;
        assert!((plain.total() - basic.total() - messaging).abs() < 1e-6);
    }

    #[test]
    fn dynamodb_follows_write_amplification() {
        let prices = Prices::default_table().unwrap();
        let e = estimate(&profile(), &prices);
        // 2,628 M readings at 0.1 writes each.
        assert!((line(&e, "write request units").quantity - 262.8).abs() < 1e-6);
        assert!((line(&e, "write request units").usd - 262.8 * 0.625).abs() < 1e-6);
        let e2 = estimate(
            &Profile {
                write_amplification: Some(0.2),
                ..profile()
            },
            &prices,
        );
        assert!((e2.service("DynamoDB") - 2.0 * e.service("DynamoDB")).abs() < 1e-6);
    }

    #[test]
    fn lambda_invocations_follow_shards_and_batches() {
        let prices = Prices::default_table().unwrap();
        // 1,000 msgs/s over on-demand's 4 shards: one invocation per shard a second.
        let e = estimate(&profile(), &prices);
        assert!((line(&e, "requests").quantity - 4.0 * SECONDS_PER_MONTH / MILLION).abs() < 1e-6);
        // 100,000 msgs/s: 100 shards, each 1,000 records a second = one batch.
        let e = estimate(
            &Profile {
                devices: 100_000,
                ..profile()
            },
            &prices,
        );
        assert!((line(&e, "requests").quantity - 100.0 * SECONDS_PER_MONTH / MILLION).abs() < 1e-6);
    }

    #[test]
    fn modelled_amplification_matches_the_measured_shapes() {
        let prices = Prices::default_table().unwrap();
        let modelled = |devices: u64, rate: f64| {
            estimate(
                &Profile {
                    devices,
                    msgs_per_device_per_s: rate,
                    write_amplification: None,
                    ..profile()
                },
                &prices,
            )
            .write_amplification
        };
        // One reading per device per batch: every reading writes its three
        // windows and its dedup item (scripts/bench measured 4.04).
        let once = modelled(100_000, 1.0 / 60.0);
        assert!((3.9..4.1).contains(&once), "{once}");
        // 50 devices per shard, 1,000 records per batch: 20 readings per
        // device per batch share their items.
        let busy = modelled(200, 20.0);
        assert!(busy < 0.25, "{busy}");
    }

    #[test]
    fn a_longer_batching_window_rewrites_windows_less() {
        let prices = Prices::default_table().unwrap();
        let at = |window: f64| {
            estimate(
                &Profile {
                    devices: 1000,
                    msgs_per_device_per_s: 1.0,
                    write_amplification: None,
                    batching_window_s: window,
                    batch_size: 10_000,
                    ..profile()
                },
                &prices,
            )
        };
        let (one, ten) = (at(1.0), at(10.0));
        // 250 devices per shard: each batch of 1 s writes every device's
        // items once; a batch of 10 s does so once for ten readings each.
        assert!(one.write_amplification > 5.0 * ten.write_amplification);
        assert!(one.service("DynamoDB") > 5.0 * ten.service("DynamoDB"));
    }

    #[test]
    fn bad_tables_are_refused() {
        let text = DEFAULT_PRICES.replace("up_to_millions = inf", "up_to_millions = 9000.0");
        assert!(Prices::parse(&text).is_err());
        assert!(Prices::parse("as_of = 1").is_err());
    }

    #[test]
    fn no_load_costs_only_fixed_charges() {
        let prices = Prices::default_table().unwrap();
        let e = estimate(
            &Profile {
                msgs_per_device_per_s: 0.0,
                ..profile()
            },
            &prices,
        );
        assert_eq!(e.service("Lambda"), 0.0);
        assert_eq!(e.service("DynamoDB"), 0.0);
        assert!(render(&profile(), &prices, &e).contains("as of 2025-01-15"));
    }
}
