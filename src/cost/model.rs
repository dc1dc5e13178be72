//! The bill of a load profile, line by line: what each service meters for
//! the profile, at the table's prices.

use super::prices::{Prices, tiered};
use super::writes::{self, BatchShape, Retention, StoreShape, WritePattern};
use super::{GB, HOURS_PER_MONTH, MILLION, SECONDS_PER_MONTH};

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
    /// Times a day each device connects again (a connect and a disconnect,
    /// each a presence record; see `presence`).
    pub reconnects_per_day: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KinesisMode {
    OnDemand,
    Provisioned,
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
    pub(super) fn priced(
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

/// The telemetry's messaging line.
const MESSAGING: &str = "messaging (5 KB units)";

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
    let stored = writes::stored_bytes(&store_shape(p), &p.retention);
    for (item, quantity, unit, price) in [
        (
            "write request units",
            readings * pattern.wru() / MILLION,
            "M WRU",
            d.per_million_write_units,
        ),
        (
            "read request units",
            readings * pattern.rru() / MILLION,
            "M RRU",
            d.per_million_read_units,
        ),
        ("storage", stored / GB, "GB-month", d.storage_per_gb_month),
    ] {
        lines.push(Line::priced("DynamoDB", item, quantity, unit, price));
    }
    let telemetry_messages = lines
        .iter()
        .find(|l| l.item == MESSAGING)
        .map_or(0.0, |l| l.quantity);
    let presence = super::presence::lines(p, prices, telemetry_messages);
    // Presence costs either design the same.
    let presence_usd: f64 = presence.iter().map(|l| l.usd).sum();
    lines.extend(presence);
    let naive_usd = ingest_usd + presence_usd + naive_store_usd(p, prices, msgs, invocations);
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
            item: MESSAGING,
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
