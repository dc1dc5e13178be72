//! `iotpipe cost`: what a load profile costs a month on the AWS deployment
//! (`deploy/`): IoT Core, its rule, Kinesis, the aggregate Lambda function
//! and DynamoDB on demand.
//!
//! The model follows the services' metering, not a flat rate per message:
//! IoT Core meters messages and rules in 5 KB increments (Basic Ingest skips
//! the messaging charge), Kinesis on demand rounds each record up to 1 KB,
//! and DynamoDB charges a write unit per KB written and a read unit per
//! 4 KB read strongly consistent, per item.
//!
//! The store's side follows its items ([`writes`]): per Lambda batch, each
//! device writes one span item per span its readings fall in (every metric
//! of a run of finest windows, and the span's dedup set), reads its device
//! item, and writes that only when its list of open coarse windows changes;
//! each hour and day of a device is written once, when compacted; fleet
//! windows, counters and the watermark are written per batch and shared by
//! its readings. So a quiet device's reading costs about one small write,
//! and less when a long batching window puts several of its readings in one
//! span write. A batch covers the batching window, or less when the batch
//! size fills first; devices are taken to report evenly, the worst case for
//! sharing a write. Item sizes, and so the units, are a rough model of the
//! encoding.
//!
//! `scripts/bench`, or a run against DynamoDB (moto) at fleet shape,
//! measures the store items written per reading that this models; pass a
//! measured figure with `--write-amplification` to price it (the modelled
//! mix of items and sizes is kept). The bill also prices the naive design,
//! one raw item per message written without a read, for comparison.
//!
//! Prices come from a dated table ([`Prices`]); the default is
//! `src/prices.toml`, compiled in.

use std::fmt::Write as _;

use serde::Deserialize;

mod writes;

pub use writes::{BatchShape, ItemCost, Retention, StoreShape, WritePattern};

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
    /// Store items written per reading, as measured; `None` models it from
    /// the batch shape (see the module comment).
    pub write_amplification: Option<f64>,
    pub metrics_per_reading: u64,
    /// Stored resolutions (1m, 1h, 1d by default).
    pub resolutions: u64,
    pub fleets: u64,
    /// Seconds of finest windows one span item holds.
    pub span_s: f64,
    pub kinesis: KinesisMode,
    /// Most records per Lambda invocation (the event source's BatchSize).
    pub batch_size: u64,
    /// How long the event source gathers records before invoking
    /// (MaximumBatchingWindowInSeconds; at least 1 s between polls of a
    /// shard). Longer windows put more readings of a device in one write.
    pub batching_window_s: f64,
    pub lambda_memory_mb: u64,
    /// Billed duration of one invocation: a fixed part (startup of the
    /// handler, the load round trip) ...
    pub lambda_base_ms: f64,
    /// ... plus this much per store write (writes go out 16 at a time).
    pub lambda_ms_per_write: f64,
    /// How long span, hour and day items are kept; storage is billed on it.
    pub retention: Retention,
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
    /// The store's reads and writes per reading, given or modelled.
    pub pattern: WritePattern,
    /// One shard's batch, on average.
    pub batch: BatchShape,
    /// The month's bill of the naive design (one raw item per message, no
    /// read), for comparison.
    pub naive_usd: f64,
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

    /// Store items written per reading.
    pub fn write_amplification(&self) -> f64 {
        self.pattern.writes()
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

/// Bytes of the naive design's item: the payload plus keys and arrival time.
const NAIVE_KEYS_B: u64 = 80;

pub fn estimate(p: &Profile, prices: &Prices) -> Estimate {
    let mut lines = Vec::new();
    let msgs_per_s = p.devices as f64 * p.msgs_per_device_per_s;
    let msgs = msgs_per_s * SECONDS_PER_MONTH;
    let readings = msgs * p.readings_per_message as f64;
    let shards = ingest_lines(p, prices, &mut lines);
    let (invocations_per_s, batch) = batch_shape(p, shards);
    let invocations = invocations_per_s * SECONDS_PER_MONTH;

    let modelled = writes::model(&store_shape(p), &batch);
    let pattern = match p.write_amplification {
        Some(w) => modelled.scaled_to(w),
        None => modelled,
    };
    let ingest_usd: f64 = lines.iter().map(|l| l.usd).sum();
    lambda_lines(
        p,
        prices,
        invocations,
        readings * pattern.writes(),
        &mut lines,
    );
    let d = &prices.dynamodb;
    lines.push(Line::priced(
        "DynamoDB",
        "write request units",
        readings * pattern.wru() / MILLION,
        "M WRU",
        d.per_million_write_units,
    ));
    lines.push(Line::priced(
        "DynamoDB",
        "read request units",
        readings * pattern.rru() / MILLION,
        "M RRU",
        d.per_million_read_units,
    ));
    let stored = writes::stored_bytes(&store_shape(p), &p.retention);
    lines.push(Line::priced(
        "DynamoDB",
        "storage",
        stored / GB,
        "GB-month",
        d.storage_per_gb_month,
    ));
    let naive_usd = ingest_usd + naive_store_usd(p, prices, msgs, invocations);
    Estimate {
        lines,
        readings,
        pattern,
        batch,
        naive_usd,
    }
}

/// IoT Core and Kinesis, which every design pays alike; returns the shards.
fn ingest_lines(p: &Profile, prices: &Prices, lines: &mut Vec<Line>) -> f64 {
    let msgs_per_s = p.devices as f64 * p.msgs_per_device_per_s;
    let msgs = msgs_per_s * SECONDS_PER_MONTH;
    let metered = p.payload_bytes + p.topic_bytes;
    let iot = &prices.iot_core;
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
    kinesis_lines(p, prices, lines)
}

/// Kinesis: the rule puts each message as one record.
fn kinesis_lines(p: &Profile, prices: &Prices, lines: &mut Vec<Line>) -> f64 {
    let msgs_per_s = p.devices as f64 * p.msgs_per_device_per_s;
    let msgs = msgs_per_s * SECONDS_PER_MONTH;
    let k = &prices.kinesis;
    let record_bytes_per_s = msgs_per_s * p.payload_bytes as f64;
    // A shard takes 1,000 records or 1 MB a second; on demand starts at 4.
    let shards = (msgs_per_s / 1000.0)
        .max(record_bytes_per_s / (1024.0 * 1024.0))
        .ceil()
        .max(1.0);
    match p.kinesis {
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
    }
}

/// Lambda invocations a second, and one shard's average batch. Each shard
/// with records is invoked once per batching window, or as soon as it holds
/// a full batch: the batch size cuts a long window short.
fn batch_shape(p: &Profile, shards: f64) -> (f64, BatchShape) {
    let msgs_per_s = p.devices as f64 * p.msgs_per_device_per_s;
    // A shard no device hashes to is never invoked.
    let active = shards.min(p.devices as f64).max(1.0);
    let per_shard = msgs_per_s / active;
    let window = p.batching_window_s.max(1.0);
    let mut per_shard_invocations = (per_shard / p.batch_size.max(1) as f64).max(1.0 / window);
    if per_shard > 0.0 {
        // A shard whose records come further apart than the window is
        // invoked once per record, not once per empty window.
        per_shard_invocations = per_shard_invocations.min(per_shard);
    }
    let devices = (p.devices as f64 / active).max(1.0);
    let records = per_shard / per_shard_invocations;
    // Devices report evenly (a meter every minute), so a batch shorter than
    // their period holds each of them at most once. Evenly spread is the
    // worst case for sharing a write: bursts would share more.
    let present = devices.min(records);
    let invocations_per_s = if msgs_per_s > 0.0 {
        active * per_shard_invocations
    } else {
        0.0
    };
    let batch = BatchShape {
        period_s: 1.0 / per_shard_invocations,
        devices,
        present,
        records,
        readings: records * p.readings_per_message as f64,
    };
    (invocations_per_s, batch)
}

fn store_shape(p: &Profile) -> StoreShape {
    StoreShape {
        metrics: p.metrics_per_reading,
        resolutions: p.resolutions,
        fleets: p.fleets,
        devices: p.devices,
        span_s: p.span_s,
        readings_per_device_s: p.msgs_per_device_per_s * p.readings_per_message as f64,
        msgs_per_device_s: p.msgs_per_device_per_s,
    }
}

/// Lambda: requests, and duration billed per invocation from its writes.
fn lambda_lines(
    p: &Profile,
    prices: &Prices,
    invocations: f64,
    writes: f64,
    lines: &mut Vec<Line>,
) {
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
}

/// Lambda and DynamoDB of the naive design: one raw item per message, put
/// without a read, kept for the finest windows' retention.
fn naive_store_usd(p: &Profile, prices: &Prices, msgs: f64, invocations: f64) -> f64 {
    let mut lines = Vec::new();
    lambda_lines(p, prices, invocations, msgs, &mut lines);
    let item = (p.payload_bytes + NAIVE_KEYS_B) as f64;
    let msgs_per_s = p.devices as f64 * p.msgs_per_device_per_s;
    let stored = msgs_per_s * p.retention.span_s * (item + writes::ITEM_OVERHEAD_B);
    let d = &prices.dynamodb;
    let lambda: f64 = lines.iter().map(|l| l.usd).sum();
    lambda
        + msgs * writes::wru(item) / MILLION * d.per_million_write_units
        + stored / GB * d.storage_per_gb_month
}

/// The bill as a table, with the profile's totals and the price table's date.
pub fn render(p: &Profile, prices: &Prices, e: &Estimate) -> String {
    let mut out = String::new();
    let msgs_per_s = p.devices as f64 * p.msgs_per_device_per_s;
    let _ = writeln!(
        out,
        "{} devices, {:.0} msgs/s, {} readings/msg, {} B payload{}",
        p.devices,
        msgs_per_s,
        p.readings_per_message,
        p.payload_bytes,
        if p.basic_ingest { ", Basic Ingest" } else { "" }
    );
    let _ = writeln!(
        out,
        "prices: {} list prices as of {}\n",
        prices.region, prices.as_of
    );
    render_pattern(&mut out, p, e);
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
        let naive = e.naive_usd / e.readings * MILLION;
        let _ = writeln!(
            out,
            "per million readings: ${:.4}\n\
             naive design (one raw item per message, written without a read, kept {:.0} days): \
             ${naive:.4} per million readings; this design costs {:.2}x that",
            total / e.readings * MILLION,
            p.retention.span_s / writes::DAY_S,
            total / e.naive_usd,
        );
    }
    let _ = writeln!(out, "\nsources:");
    for s in &prices.sources {
        let _ = writeln!(out, "  {s}");
    }
    out
}

/// The store's reads and writes per reading, item by item.
fn render_pattern(out: &mut String, p: &Profile, e: &Estimate) {
    let b = &e.batch;
    let how = match p.write_amplification {
        Some(_) => "given; the mix of items is modelled".to_string(),
        None => format!(
            "modelled: a shard's batch covers {:.1} s, {:.0} readings of {:.0} devices",
            b.period_s, b.readings, b.present
        ),
    };
    let _ = writeln!(
        out,
        "store per reading: {:.3} items written, {:.3} WRU, {:.3} RRU ({how})",
        e.pattern.writes(),
        e.pattern.wru(),
        e.pattern.rru(),
    );
    let _ = writeln!(
        out,
        "  {:<26} {:>10} {:>10} {:>10} {:>12}",
        "item", "writes", "WRU", "RRU", "bytes (avg)"
    );
    for i in &e.pattern.items {
        let _ = writeln!(
            out,
            "  {:<26} {:>10.4} {:>10.4} {:>10.4} {:>12.0}",
            i.item, i.writes, i.wru, i.rru, i.bytes
        );
    }
    let _ = writeln!(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: f64 = 86_400.0;

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
            span_s: 600.0,
            kinesis: KinesisMode::OnDemand,
            batch_size: 1000,
            batching_window_s: 1.0,
            lambda_memory_mb: 256,
            lambda_base_ms: 20.0,
            lambda_ms_per_write: 0.4,
            retention: Retention {
                span_s: 30.0 * DAY,
                hour_s: 90.0 * DAY,
                day_s: 1098.0 * DAY,
            },
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
    fn a_given_write_amplification_scales_the_modelled_units() {
        let prices = Prices::default_table().unwrap();
        let e = estimate(&profile(), &prices);
        assert!((e.write_amplification() - 0.1).abs() < 1e-9);
        let e2 = estimate(
            &Profile {
                write_amplification: Some(0.2),
                ..profile()
            },
            &prices,
        );
        for item in ["write request units", "read request units"] {
            let (one, two) = (line(&e, item).quantity, line(&e2, item).quantity);
            assert!(one > 0.0 && (two - 2.0 * one).abs() < 1e-6, "{item}");
        }
        // Storage follows the items kept, not how often they are written.
        assert_eq!(line(&e, "storage").usd, line(&e2, "storage").usd);
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

    /// The real fleet's shape: 10,000 devices reporting one message a
    /// minute, 3 metrics, the template's batch size.
    fn fleet(window: f64, batch_size: u64) -> Estimate {
        estimate(
            &Profile {
                devices: 10_000,
                msgs_per_device_per_s: 1.0 / 60.0,
                metrics_per_reading: 3,
                write_amplification: None,
                batching_window_s: window,
                batch_size,
                ..profile()
            },
            &Prices::default_table().unwrap(),
        )
    }

    #[test]
    fn a_quiet_fleet_writes_about_one_item_per_reading() {
        // One reading per device per batch: one span write each, plus its
        // share of member items, compactions, fleet windows and counters.
        let e = fleet(1.0, 1000);
        let w = e.write_amplification();
        assert!((1.0..=1.5).contains(&w), "{w}");
        let span = &e.pattern.items[0];
        assert_eq!(span.item, "span items");
        assert!((span.writes - 1.0).abs() < 0.02, "{}", span.writes);
    }

    #[test]
    fn a_long_batching_window_shares_span_writes_between_readings() {
        // 300 s of a shard's 2,500 devices is 12,500 records; the event
        // source's largest batch (10,000) still holds 4 readings a device.
        let e = fleet(300.0, 10_000);
        let w = e.write_amplification();
        assert!(w < 1.0, "{w}");
        assert!(e.pattern.wru() < 1.0, "{}", e.pattern.wru());
    }

    #[test]
    fn the_batch_size_cuts_a_long_batching_window_short() {
        // 1,000 records of 41.75 a second fill a batch in 24 s, long before
        // 300 s: each device is in a batch about once, as at 1 s.
        let e = fleet(300.0, 1000);
        assert!(
            (e.batch.period_s - 24.0).abs() < 0.1,
            "{}",
            e.batch.period_s
        );
        assert!(e.write_amplification() > 1.0);
        assert!(e.write_amplification() < fleet(1.0, 1000).write_amplification());
    }

    #[test]
    fn a_chatty_fleet_writes_far_less_than_one_item_per_reading() {
        let prices = Prices::default_table().unwrap();
        let e = estimate(
            &Profile {
                devices: 200,
                msgs_per_device_per_s: 100.0,
                metrics_per_reading: 3,
                write_amplification: None,
                ..profile()
            },
            &prices,
        );
        let w = e.write_amplification();
        assert!(w < 0.05, "{w}");
    }

    #[test]
    fn items_per_reading_fall_as_the_batching_window_grows() {
        for batch_size in [1000, 10_000] {
            let mut last = f64::INFINITY;
            for window in [1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0] {
                let e = fleet(window, batch_size);
                let w = e.write_amplification();
                assert!(w <= last, "{window} s, batch {batch_size}: {w} > {last}");
                assert!(e.service("DynamoDB") > 0.0);
                last = w;
            }
        }
    }

    #[test]
    fn a_quiet_span_item_fits_one_write_unit_when_full() {
        // 60 B + 3 x 12 B of names + 10 windows x (10 B + 3 x (1 B + 12 B))
        // = 586 B when full: every one of its ten writes takes 1 WRU.
        let e = fleet(1.0, 1000);
        let span = &e.pattern.items[0];
        assert!((span.wru / span.writes - 1.0).abs() < 0.001, "{span:?}");
        assert!(span.bytes > 300.0 && span.bytes < 400.0, "{span:?}");
    }

    #[test]
    fn the_naive_design_pays_one_write_unit_per_message_and_no_read() {
        let prices = Prices::default_table().unwrap();
        let p = Profile {
            devices: 10_000,
            msgs_per_device_per_s: 1.0 / 60.0,
            payload_bytes: 120,
            basic_ingest: true,
            ..profile()
        };
        let e = estimate(&p, &prices);
        let msgs = 10_000.0 / 60.0 * SECONDS_PER_MONTH;
        let ingest = e.service("IoT Core") + e.service("Kinesis");
        // 120 B of payload, 80 B of keys and 100 B of overhead per
        // message, for 30 days.
        let storage = 10_000.0 / 60.0 * 30.0 * DAY * 300.0 / GB * 0.25;
        let store = e.naive_usd - ingest - e.service("Lambda");
        let wru = msgs / MILLION * 0.625;
        // The Lambda of the naive design differs only in its duration.
        assert!(
            (store - wru - storage).abs() < 0.02 * wru,
            "{store} vs {}",
            wru + storage
        );
        assert!(render(&p, &prices, &e).contains("naive design"));
    }

    #[test]
    fn storage_keeps_each_kind_of_item_for_its_retention() {
        let e = fleet(1.0, 1000);
        // Per device, with 100 B of overhead per item: 30 days of 10-minute
        // spans (586 B), 90 days of hours (907 B), 1,098 days (1,438 B),
        // its device and member items; fleet windows add under 1 %.
        let per_device = 30.0 * 144.0 * 686.0
            + 90.0 * 24.0 * (906.9 + 100.0)
            + 1098.0 * (1437.6 + 100.0)
            + 296.0
            + 160.0;
        let expected = 10_000.0 * per_device / GB;
        let stored = line(&e, "storage").quantity;
        assert!(
            stored > expected && stored < 1.01 * expected,
            "{stored} vs {expected}"
        );
    }

    #[test]
    fn a_rare_reporter_pays_for_its_batches_not_for_empty_windows() {
        let prices = Prices::default_table().unwrap();
        // One device, one message an hour: one invocation per message, its
        // batch writing the fleet windows and counters for one reading.
        let e = estimate(
            &Profile {
                devices: 1,
                msgs_per_device_per_s: 1.0 / 3600.0,
                write_amplification: None,
                ..profile()
            },
            &prices,
        );
        let requests = line(&e, "requests").quantity * MILLION;
        assert!((requests - HOURS_PER_MONTH).abs() < 1e-6, "{requests}");
        let w = e.write_amplification();
        assert!((5.0..12.0).contains(&w), "{w}");
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
        assert!(e.write_amplification().is_sign_positive());
        assert!(render(&profile(), &prices, &e).contains("as of 2025-01-15"));
    }
}
