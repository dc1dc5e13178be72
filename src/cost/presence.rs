//! What devices' connects and disconnects cost: each is a presence record.
//!
//! On AWS, IoT Core publishes a lifecycle event per connect and per
//! disconnect, and the template's `PresenceRule` puts each into the Kinesis
//! stream: one rule triggered, one action and one record each. The aggregate
//! function folds it into the device's member row: one small conditional
//! write, after reading the row and, since IoT Core's events name no fleet,
//! the device item (eventually consistent, half a read unit each). A
//! CONNECT is metered as a message (DISCONNECT is not), Basic Ingest or not.

use super::model::{KinesisMode, Line, Profile};
use super::prices::{Prices, tiered};
use super::{GB, HOURS_PER_MONTH, MILLION};

/// Bytes of a lifecycle event as the rule forwards it (`clientId`,
/// `timestamp`, `eventType`, `disconnectReason`).
const EVENT_B: f64 = 150.0;
/// Read units per presence record: the member row and the device item,
/// eventually consistent.
const RRU_PER_EVENT: f64 = 1.0;

/// Presence records a month: a connect and a disconnect per reconnect.
pub fn events(p: &Profile) -> f64 {
    p.devices as f64 * p.reconnects_per_day * 2.0 * HOURS_PER_MONTH / 24.0
}

/// The lines presence adds to the bill; `telemetry_messages` (millions of
/// 5 KB units already metered) places CONNECTs in the messaging tiers.
pub fn lines(p: &Profile, prices: &Prices, telemetry_messages: f64) -> Vec<Line> {
    let events = events(p);
    if events <= 0.0 {
        return Vec::new();
    }
    let m = events / MILLION;
    let connects = m / 2.0;
    let iot = &prices.iot_core;
    let tiers = &iot.messaging_tiers;
    let mut out = vec![
        Line {
            service: "IoT Core",
            item: "CONNECT messages (5 KB units)",
            quantity: connects,
            unit: "M messages",
            usd: tiered(telemetry_messages + connects, tiers) - tiered(telemetry_messages, tiers),
        },
        Line::priced(
            "IoT Core",
            "rules triggered (presence)",
            m,
            "M rules",
            iot.rules_triggered_per_million,
        ),
        Line::priced(
            "IoT Core",
            "actions executed (presence)",
            m,
            "M actions",
            iot.actions_executed_per_million,
        ),
    ];
    let k = &prices.kinesis;
    match p.kinesis {
        KinesisMode::OnDemand => {
            out.push(Line::priced(
                "Kinesis",
                "presence records in (1 KB)",
                events * 1024.0 / GB,
                "GB",
                k.on_demand_ingest_per_gb,
            ));
            out.push(Line::priced(
                "Kinesis",
                "presence records out",
                events * EVENT_B / GB,
                "GB",
                k.on_demand_retrieval_per_gb,
            ));
        }
        KinesisMode::Provisioned => {
            out.push(Line::priced(
                "Kinesis",
                "PUT payload units (presence)",
                m,
                "M units",
                k.put_payload_units_per_million,
            ));
        }
    }
    let gb_s = events * p.lambda_ms_per_write / 1000.0 * p.lambda_memory_mb as f64 / 1024.0;
    out.push(Line::priced(
        "Lambda",
        "duration (presence writes)",
        gb_s,
        "GB-seconds",
        prices.lambda.per_gb_second,
    ));
    let d = &prices.dynamodb;
    out.push(Line::priced(
        "DynamoDB",
        "write request units (presence)",
        m,
        "M WRU",
        d.per_million_write_units,
    ));
    out.push(Line::priced(
        "DynamoDB",
        "read request units (presence)",
        m * RRU_PER_EVENT,
        "M RRU",
        d.per_million_read_units,
    ));
    out
}
