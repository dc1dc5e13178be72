//! device-sim: a fleet of simulated MQTT devices that publishes deterministic
//! telemetry to iotpipe and then verifies, window by window, that the query
//! API reports exactly what was sent.
//!
//! It shares no code with the pipeline: its payloads and its expected
//! windows come from its own simple arithmetic, so that a bug in the pipeline
//! cannot hide itself in both places.
//!
//! - [`config`]: [`SimConfig`], what a run is asked to do.
//! - [`cli`]: the command line, mapped onto [`SimConfig`].
//! - [`plan`]: the deterministic schedule (who sends what, when; faults).
//! - [`signal`]: deterministic values per (seed, device, metric, seq).
//! - [`payload`]: payload v1 JSON.
//! - [`lateness`]: late and too-late decisions with honest uncertainty.
//! - [`publish`]: one MQTT connection per device, PUBACK tracking, retries.
//! - [`ledger`]: the record of runs that lets runs continue and verify their union.
//! - [`expect`]: expected windows, regenerated one device at a time.
//! - [`verify`]: reads the API and compares.
//! - [`summary`]: the run's numbers.
//!
//! Library use: `device_sim::run(SimConfig { .. }).await?` returns a
//! [`Summary`] whose `verify` field holds the verdict.

pub mod cli;
pub mod config;
pub mod expect;
pub mod lateness;
pub mod ledger;
pub mod payload;
pub mod plan;
pub mod publish;
pub mod signal;
pub mod summary;
pub mod verify;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;

pub use config::{BrokerAddr, Rate, SimConfig, Stop};
pub use summary::Summary;
pub use verify::VerifyReport;

use lateness::{Class, Exceptions, classify, too_late_boundary};
use ledger::{Ledger, LedgerLine, RunFinish, RunStart};
use plan::{RunPlan, SendKind};
use publish::device::DeviceCounters;
use publish::{Fleet, PublishConfig};
use verify::api::Api;
use verify::{StatsExpectation, VerifyConfig};

/// Wall-clock ms since the epoch: the clock the pipeline stamps arrivals with.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Runs a simulation: connect, publish the schedule, record it in the ledger,
/// and verify if asked.
pub async fn run(cfg: SimConfig) -> anyhow::Result<Summary> {
    cfg.validate()?;
    let mut ledger = match &cfg.ledger {
        Some(path) => Ledger::load(path)?,
        None => Ledger::default(),
    };
    let plan = RunPlan {
        seed: cfg.seed,
        fleet: cfg.fleet.clone(),
        prefix: cfg.prefix(),
        devices: cfg.devices,
        period_us: cfg.period_us()?,
        readings_per_message: cfg.readings_per_message,
        metrics: cfg.metrics.clone(),
        run_start_ms: 0,
        faults: cfg.faults.clone(),
        allowed_lateness_ms: cfg.allowed_lateness.as_millis() as i64,
        clock_skew_ms: cfg.clock_skew.as_millis() as i64,
    };
    let next = ledger.next_seqs();
    let first_seq: Vec<u64> = (0..plan.devices)
        .map(|i| {
            next.get(&(plan.fleet.clone(), plan.device_id(i)))
                .copied()
                .unwrap_or(0)
        })
        .collect();
    let messages: Vec<u64> = (0..plan.devices)
        .map(|i| match cfg.stop {
            Stop::Count(c) => c,
            Stop::After(d) => plan.messages_within(i, d.as_micros() as u64),
        })
        .collect();

    // Stats deltas only mean something when the run injects faults, and
    // assume nothing else publishes meanwhile.
    let stats_before = match &cfg.verify {
        Some(url) if cfg.faults.any() => Some(
            Api::new(url, 1)?
                .stats()
                .await
                .context("reading /v1/stats before publishing")?,
        ),
        _ => None,
    };

    let pcfg = PublishConfig {
        broker: cfg.broker.clone(),
        qos: publish::qos(cfg.qos)?,
        connect_rate: cfg.connect_rate,
        ack_timeout: cfg.ack_timeout,
        connect_timeout: std::time::Duration::from_secs(10)
            + cfg
                .connect_rate
                .filter(|r| *r > 0.0)
                .map(|r| std::time::Duration::from_secs_f64(f64::from(cfg.devices) / r))
                .unwrap_or_default(),
    };
    let fleet = Fleet::connect(
        &plan,
        &first_seq,
        &pcfg,
        plan.allowed_lateness_ms,
        plan.clock_skew_ms,
    )
    .await?;
    let run_id = ledger.next_run_id();
    let start_line = |p: &RunPlan| RunStart {
        run: run_id,
        plan: p.clone(),
        first_seq: first_seq.clone(),
        messages: messages.clone(),
    };
    let outcome = fleet
        .run(
            plan,
            &first_seq,
            &messages,
            cfg.ack_timeout,
            cfg.progress,
            |p| match &cfg.ledger {
                Some(path) => Ledger::append(path, &LedgerLine::Start(start_line(p))),
                None => Ok(()),
            },
        )
        .await?;
    let finish = RunFinish {
        run: run_id,
        exceptions: outcome.exceptions.clone(),
        failed: outcome.counters.failed,
    };
    if let Some(path) = &cfg.ledger {
        Ledger::append(path, &LedgerLine::Finish(finish.clone()))?;
    }
    ledger.apply(LedgerLine::Start(start_line(&outcome.plan)))?;
    ledger.apply(LedgerLine::Finish(finish))?;

    let c = &outcome.counters;
    let window = outcome.publish_window.as_secs_f64().max(1e-9);
    let target_msgs = f64::from(outcome.plan.devices) * 1e6 / outcome.plan.period_us as f64;
    let k = f64::from(outcome.plan.readings_per_message);
    let telemetry_sent = c.issued - c.duplicates_issued - c.malformed_issued;
    let mut summary = Summary {
        run: run_id,
        fleet: outcome.plan.fleet.clone(),
        devices: outcome.plan.devices,
        not_connected: outcome.not_connected,
        qos: cfg.qos,
        messages_sent: telemetry_sent,
        readings_sent: c.readings_issued,
        acked: c.telemetry_completed,
        failed: c.failed,
        duplicates_sent: c.duplicates_issued,
        malformed_sent: c.malformed_issued,
        retransmissions: c.retransmissions,
        reconnects: c.reconnects,
        target_msgs_per_sec: target_msgs,
        achieved_msgs_per_sec: telemetry_sent as f64 / window,
        target_readings_per_sec: target_msgs * k,
        achieved_readings_per_sec: c.readings_issued as f64 / window,
        behind_schedule: c.behind,
        max_lag_ms: c.max_lag_ms,
        puback: summary::Latency::from_histogram(&outcome.latency),
        elapsed_ms: outcome.elapsed.as_millis() as u64,
        last_error: c.last_error.clone(),
        verify: None,
    };

    if let Some(url) = &cfg.verify {
        let stats = stats_before.map(|before| {
            let expect =
                stats_expectation(&outcome.plan, &first_seq, &messages, &outcome.exceptions, c);
            (before, expect)
        });
        let vcfg = VerifyConfig {
            url: url.clone(),
            timeout: cfg.verify_timeout,
            concurrency: cfg.verify_concurrency,
        };
        let report = verify::verify(Arc::new(ledger), &outcome.plan.fleet, &vcfg, stats).await?;
        summary.verify = Some(report);
    }
    if let Some(path) = &cfg.report_json {
        let text = serde_json::to_string_pretty(&summary)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(summary)
}

/// What this run should change in `/v1/stats`, as ranges: uncertain
/// decisions and retransmissions widen them.
pub fn stats_expectation(
    plan: &RunPlan,
    first_seq: &[u64],
    messages: &[u64],
    ex: &Exceptions,
    c: &DeviceCounters,
) -> StatsExpectation {
    let mut e = StatsExpectation::default();
    let bump = |r: &mut (u64, u64), class: Class| match class {
        Class::Yes => {
            r.0 += 1;
            r.1 += 1;
        }
        Class::Maybe => r.1 += 1,
        Class::No => {}
    };
    for index in 0..plan.devices {
        let i = index as usize;
        let first = first_seq.get(i).copied().unwrap_or(0);
        let count = messages.get(i).copied().unwrap_or(0);
        for send in plan.sends(index, first, count) {
            match &send.kind {
                SendKind::Telemetry(m) | SendKind::Duplicate(m) => {
                    let duplicate = matches!(send.kind, SendKind::Duplicate(_));
                    for r in &m.readings {
                        let tl = ex
                            .too_late
                            .get(&(index, r.seq))
                            .copied()
                            .unwrap_or_else(|| {
                                let b = too_late_boundary(r.ts, plan.allowed_lateness_ms);
                                classify(b, m.due_ms, m.due_ms)
                            });
                        let accepted = match tl {
                            Class::Yes => Class::No,
                            Class::No => Class::Yes,
                            Class::Maybe => Class::Maybe,
                        };
                        if duplicate {
                            bump(&mut e.duplicate_readings, accepted);
                        } else {
                            bump(&mut e.accepted_readings, accepted);
                            bump(&mut e.too_late, tl);
                        }
                    }
                }
                SendKind::Malformed { .. } => bump(&mut e.malformed_json, Class::Yes),
            }
        }
    }
    // A retransmitted message may arrive twice: once more as duplicates, or
    // once more rejected.
    e.duplicate_readings.1 += c.retransmitted_readings;
    e.too_late.1 += c.retransmitted_readings;
    e.malformed_json.1 += c.retransmitted_malformed;
    e
}
