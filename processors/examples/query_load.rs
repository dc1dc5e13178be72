//! Query latency under concurrent clients: a day of 1-minute windows for one
//! device, read whole by each request, over real HTTP from the API that
//! `iotpipe up` serves, on the SQLite store.
//!
//! ```text
//! cargo run --release -p processors --example query_load -- [CLIENTS] [SECONDS] [INTERVAL_MS] [AGG] [DAYS] [RES]
//! ```
//! (defaults: 50 clients, 10 s, 0, every field, 1 day, `1m`; `all` as AGG
//! asks for every field). `30 1h` reads 30 days of hourly windows, which the
//! span layout serves from compacted device windows rather than spans. With an interval each
//! client sends a request every INTERVAL_MS (a dashboard refreshing); with 0
//! each sends its next request as soon as the last is answered, which
//! measures the API's capacity and puts 50 requests in its queue at all
//! times. AGG is an `agg=` list such as `avg,min,max` (what a chart draws). The store is filled by the real core: one
//! reading a minute for 24 hours, three metrics, in batches of 60 records.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use processors::api::{ApiState, app};
use processors::metrics::ProcessorMetrics;
use processors::run::process_batch;
use processors::store::sqlite::SqliteStore;
use rollup::AggregateConfig;
use schemas::shard::Record;
use schemas::{Metric, PackedRecord, Reading};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const T0: i64 = 1_764_201_600_000; // 2025-11-27T00:00:00Z
const MIN: i64 = 60_000;
const DAY_MINUTES: i64 = 1440;
const HOUR: i64 = 60 * MIN;

fn record(i: i64) -> Record {
    let ts = T0 + i * MIN + 5;
    let data = PackedRecord {
        device_id: "d1".into(),
        fleet: "f".into(),
        received_at: ts + 10,
        readings: vec![Reading {
            seq: Some(i as u64 + 1),
            ts,
            metrics: ["temperature", "humidity", "voltage"]
                .iter()
                .map(|m| Metric {
                    name: (*m).into(),
                    value: (i % 97) as f64 * 0.5,
                })
                .collect(),
        }],
    }
    .encode();
    Record {
        seq: (i as u128 + 1).into(),
        partition_key: "d1".into(),
        data: Bytes::from(data),
        arrival_ms: ts + 10,
    }
}

/// Dashboard `i` of `clients`: asks for `url` every `interval_ms` (back to
/// back if 0) until `end`, and returns its latencies and error count.
async fn dashboard(
    http: reqwest::Client,
    url: String,
    i: usize,
    clients: usize,
    interval_ms: u64,
    end: Instant,
) -> (Vec<Duration>, u64) {
    let mut lat = Vec::new();
    let mut errors = 0u64;
    let mut tick = (interval_ms > 0).then(|| {
        // Clients spread over the interval, as independent dashboards are.
        let offset = Duration::from_millis(interval_ms * i as u64 / clients as u64);
        tokio::time::interval_at(
            tokio::time::Instant::now() + offset,
            Duration::from_millis(interval_ms),
        )
    });
    while Instant::now() < end {
        if let Some(t) = tick.as_mut() {
            t.tick().await;
        }
        let t = Instant::now();
        match http.get(&url).send().await {
            Ok(r) if r.status().is_success() => match r.bytes().await {
                Ok(_) => lat.push(t.elapsed()),
                Err(_) => errors += 1,
            },
            _ => errors += 1,
        }
    }
    (lat, errors)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let clients: usize = args.first().map(|s| s.parse()).transpose()?.unwrap_or(50);
    let seconds: u64 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(10);
    let interval_ms: u64 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(0);
    let agg_arg = args.get(3).map_or("all", String::as_str);
    let agg = match agg_arg {
        "all" => String::new(),
        a => format!("&agg={a}"),
    };
    let days: i64 = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(1);
    let res = args.get(5).map_or("1m", String::as_str);
    let res_ms = match res {
        "1m" => MIN,
        "1h" => HOUR,
        other => anyhow::bail!("RES must be 1m or 1h, not {other}"),
    };
    let minutes = days * DAY_MINUTES;

    let dir = tempfile::tempdir()?;
    let store = Arc::new(SqliteStore::open(&dir.path().join("rollups.db"))?);
    let cfg = Arc::new(AggregateConfig::default());
    let metrics = ProcessorMetrics::default();
    let records: Vec<Record> = (0..minutes).map(record).collect();
    for batch in records.chunks(60) {
        process_batch("s0", batch, store.as_ref(), &cfg, &metrics).await?;
    }

    let mut state = ApiState::new(store.clone(), cfg);
    // A day after the data: every window is final.
    state.clock = Arc::new(move || T0 + (minutes + DAY_MINUTES) * MIN);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app(state)).await });

    let url = format!(
        "http://{addr}/v1/devices/d1/metrics/temperature?res={res}&from={T0}&to={}{agg}",
        T0 + minutes * MIN
    );
    let expected = (minutes * MIN / res_ms) as usize;
    let http = reqwest::Client::new();
    // One request first: it must return the whole day.
    let body: serde_json::Value = http.get(&url).send().await?.json().await?;
    let windows = body["windows"]
        .as_array()
        .context("the answer has no `windows`")?
        .len();
    anyhow::ensure!(
        windows == expected,
        "expected {expected} windows, got {windows}"
    );

    let end = Instant::now() + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(dashboard(http, url, i, clients, interval_ms, end))
        })
        .collect();
    let started = Instant::now();
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        lat.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0)
    };
    println!(
        "{clients} clients, {seconds} s, interval {interval_ms} ms, agg {agg_arg}, {days} days at {res}, {windows} windows per answer: {} requests ({:.0}/s), {errors} errors, \
         p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        lat.len(),
        lat.len() as f64 / elapsed,
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(1.0)
    );
    Ok(())
}
