//! How fast the simulator itself publishes and verifies, against the
//! in-memory stand-in pipeline of the tests (which acknowledges on receipt,
//! so the simulator is the bottleneck).
//!
//! `cargo run --release -p device-sim --example capacity -- DEVICES RATE SECONDS [discard]`
//! (defaults: 1000 devices, 10 msg/s each, 10 s). With `discard` the stand-in
//! only acknowledges, and nothing is verified: the simulator's publishing alone.

use std::time::{Duration, Instant};

use device_sim::{BrokerAddr, Rate, SimConfig, Stop};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: f64| -> anyhow::Result<f64> {
        Ok(match args.get(i) {
            Some(s) => s.parse()?,
            None => default,
        })
    };
    let (devices, rate, seconds) = (arg(0, 1000.0)?, arg(1, 10.0)?, arg(2, 10.0)?);
    let discard = args.get(3).is_some_and(|a| a == "discard");
    let h = testkit::standin::Harness::start().await;
    h.pipeline
        .discard
        .store(discard, std::sync::atomic::Ordering::Relaxed);
    let cfg = SimConfig {
        broker: BrokerAddr {
            host: h.mqtt.ip().to_string(),
            port: h.mqtt.port(),
        },
        devices: devices as u32,
        rate: Rate::PerDevice(rate),
        stop: Stop::After(Duration::from_secs_f64(seconds)),
        fleet: "cap".into(),
        verify: (!discard).then(|| h.api_url()),
        verify_timeout: Duration::from_secs(120),
        ..SimConfig::default()
    };
    let started = Instant::now();
    let summary = device_sim::run(cfg).await?;
    let total = started.elapsed();
    print!("{summary}");
    let publish = Duration::from_millis(summary.elapsed_ms);
    println!(
        "connecting and verifying took {:.2} s; whole run {:.2} s; peak RSS {} MiB",
        total.saturating_sub(publish).as_secs_f64(),
        total.as_secs_f64(),
        peak_rss_mib()
    );
    Ok(())
}

/// VmHWM from /proc (Linux); 0 where it is unavailable.
fn peak_rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}
