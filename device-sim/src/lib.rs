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
//! - [`scenario`]: scenario files (mixed fleets, stages in order).
//! - [`plan`]: the deterministic schedule (who sends what, when; faults,
//!   stages).
//! - [`signal`]: deterministic values per (seed, device, metric, seq).
//! - [`payload`]: payload v1 JSON.
//! - [`lateness`]: late and too-late decisions with honest uncertainty.
//! - [`publish`]: one lean MQTT connection per device (3.1.1 or 5, TCP or
//!   TLS), PUBACK tracking, retries.
//! - [`freshness`]: how soon a published reading shows in the API.
//! - [`ledger`]: the record of runs that lets runs continue and verify their union.
//! - [`expect`]: expected windows, regenerated one device at a time.
//! - [`verify`]: reads the API and compares.
//! - [`resources`]: open-files limit, the simulator's memory and CPU.
//! - [`summary`]: the run's numbers.
//!
//! Library use: `device_sim::run(SimConfig { .. }).await?` returns a
//! [`Summary`] whose `verify` field holds the verdict.

pub mod cli;
pub mod config;
pub mod expect;
pub mod freshness;
pub mod lateness;
pub mod ledger;
pub mod payload;
pub mod plan;
pub mod publish;
pub mod resources;
pub mod scenario;
pub mod signal;
pub mod summary;
pub mod verify;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tokio::time::Instant;

pub use config::{BrokerAddr, Rate, SimConfig, Stop};
pub use summary::Summary;
pub use verify::VerifyReport;

use lateness::{Class, Exceptions, classify, too_late_boundary};
use ledger::{Ledger, LedgerLine, RunFinish, RunStart};
use plan::{RunPlan, SendKind};
use publish::device::DeviceCounters;
use publish::{ConnectLimiter, Fleet, FleetShared, PublishConfig, PublishOutcome};
use signal::MetricSpec;
use summary::FleetSummary;
use verify::api::Api;
use verify::{StatsExpectation, VerifyConfig};

/// Wall-clock ms since the epoch: the clock the pipeline stamps arrivals with.
pub fn now_ms() -> i64 {
    now_us().div_euclid(1000)
}

/// Wall-clock µs since the epoch.
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// One fleet of a run, before it has started.
struct FleetRun {
    plan: RunPlan,
    qos: u8,
    first_seq: Vec<u64>,
    messages: Vec<u64>,
    run_id: u64,
}

/// The fleets a configuration asks for: its scenario's, or the one its
/// flat fields describe.
fn fleet_plans(cfg: &SimConfig, ledger: &Ledger) -> anyhow::Result<Vec<FleetRun>> {
    let base = RunPlan {
        seed: cfg.seed,
        fleet: cfg.fleet.clone(),
        prefix: cfg.prefix(),
        devices: cfg.devices,
        period_us: 1,
        readings_per_message: cfg.readings_per_message,
        metrics: cfg.metrics.clone(),
        run_start_ms: 0,
        faults: cfg.faults.clone(),
        allowed_lateness_ms: cfg.allowed_lateness.as_millis() as i64,
        clock_skew_ms: cfg.clock_skew.as_millis() as i64,
        arrival_slack_ms: cfg.arrival_slack.as_millis() as i64,
        watermark_slack_ms: cfg.watermark_slack.as_millis() as i64,
        segments: Vec::new(),
        offline: Vec::new(),
        storms: Vec::new(),
    };
    let mut specs: Vec<(RunPlan, u8, Stop)> = Vec::new();
    match &cfg.scenario {
        None => specs.push((
            RunPlan {
                period_us: cfg.period_us()?,
                ..base
            },
            cfg.qos,
            cfg.stop,
        )),
        Some(sc) => {
            for f in &sc.fleets {
                let one = SimConfig {
                    devices: f.devices,
                    rate: match (f.rate, f.total_rate) {
                        (_, Some(t)) => Rate::Total(t),
                        (r, None) => Rate::PerDevice(r.unwrap_or(1.0)),
                    },
                    scenario: None,
                    ..cfg.clone()
                };
                let period_us = one.period_us()?;
                let schedule = sc.schedule(period_us);
                let plan = RunPlan {
                    seed: sc.seed.unwrap_or(cfg.seed),
                    fleet: f.name.clone(),
                    prefix: f.prefix.clone().unwrap_or_else(|| format!("{}-d", f.name)),
                    devices: f.devices,
                    period_us,
                    readings_per_message: f.readings_per_message,
                    metrics: f
                        .metrics
                        .iter()
                        .map(|name| MetricSpec {
                            name: name.clone(),
                            signal: f.signals.get(name).copied().unwrap_or_default(),
                        })
                        .collect(),
                    segments: schedule.segments,
                    offline: schedule.offline,
                    storms: schedule.storms,
                    ..base.clone()
                };
                specs.push((plan, f.qos, Stop::After(sc.length())));
            }
        }
    }
    let next = ledger.next_seqs();
    let first_run = ledger.next_run_id();
    Ok(specs
        .into_iter()
        .enumerate()
        .map(|(j, (plan, qos, stop))| {
            let first_seq = (0..plan.devices)
                .map(|i| {
                    next.get(&(plan.fleet.clone(), plan.device_id(i)))
                        .copied()
                        .unwrap_or(0)
                })
                .collect();
            let messages = (0..plan.devices)
                .map(|i| match stop {
                    Stop::Count(c) => c,
                    Stop::After(d) => plan.messages_within(i, d.as_micros() as u64),
                })
                .collect();
            FleetRun {
                plan,
                qos,
                first_seq,
                messages,
                run_id: first_run + j as u64,
            }
        })
        .collect())
}

/// Runs a simulation: connect, publish the schedule, record it in the ledger,
/// and verify if asked.
pub async fn run(cfg: SimConfig) -> anyhow::Result<Summary> {
    cfg.validate()?;
    let warnings = cfg.warnings();
    for w in &warnings {
        eprintln!("device-sim: warning: {w}");
    }
    let mut ledger = match &cfg.ledger {
        Some(path) => Ledger::load(path)?,
        None => Ledger::default(),
    };
    let runs = fleet_plans(&cfg, &ledger)?;
    let devices: u32 = runs.iter().map(|r| r.plan.devices).sum();
    let files_limit = resources::ensure_open_files(u64::from(devices) + resources::SPARE_FILES)?;

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

    let connect_rate = cfg
        .scenario
        .as_ref()
        .and_then(|s| s.connect_rate)
        .or(cfg.connect_rate);
    let connect_timeout = cfg.connect_timeout.unwrap_or(Duration::from_secs(10))
        + connect_rate
            .filter(|r| *r > 0.0)
            .map(|r| Duration::from_secs_f64(f64::from(devices) / r))
            .unwrap_or(Duration::from_secs(u64::from(devices / 1000)));
    let limiter = Arc::new(ConnectLimiter::new(connect_rate));
    let total: u64 = runs.iter().flat_map(|r| r.messages.iter()).sum();
    let fresh_every = cfg
        .verify
        .as_ref()
        .and_then(|_| cfg.freshness_sample.every(total));
    let (fresh_tx, fresh_task) = match (&cfg.verify, fresh_every) {
        (Some(url), Some(every)) => {
            let queue = freshness::queue_len(every, total, devices);
            let (tx, rx) = tokio::sync::mpsc::channel(queue);
            let task = tokio::spawn(freshness::probe(url.clone(), rx, cfg.verify_timeout));
            (Some(tx), Some(task))
        }
        _ => (None, None),
    };

    let before_connect = resources::Usage::now(files_limit);
    let connecting = Instant::now();
    let mut fleets = Vec::with_capacity(runs.len());
    for r in &runs {
        let pcfg = PublishConfig {
            broker: cfg.broker.clone(),
            protocol: cfg.protocol,
            tls: cfg.tls.clone(),
            source_addrs: cfg.source_addrs.clone(),
            qos: publish::qos(r.qos)?,
            keep_alive: cfg.keep_alive,
            max_inflight: cfg.max_inflight,
            username: cfg.username.clone(),
            password: cfg.password.clone(),
            connect_rate,
            ack_timeout: cfg.ack_timeout,
            connect_timeout,
        };
        let shared = Arc::new(FleetShared::new()?);
        let fresh = fresh_tx
            .clone()
            .zip(fresh_every)
            .map(|(tx, every)| (every, tx));
        fleets.push(
            Fleet::connect(
                &r.plan,
                &r.first_seq,
                &r.messages,
                &pcfg,
                limiter.clone(),
                shared,
                fresh,
                cfg.progress,
            )
            .await?,
        );
    }
    drop(fresh_tx);
    let connect_ms = connecting.elapsed().as_millis() as u64;
    let connected = resources::Usage::now(files_limit);

    // One start for every fleet, recorded before anyone publishes.
    let run_start_ms = now_ms() + 100;
    if let Some(path) = &cfg.ledger {
        for r in &runs {
            let mut plan = r.plan.clone();
            plan.run_start_ms = run_start_ms;
            Ledger::append(path, &LedgerLine::Start(Box::new(start_line(r, &plan))))?;
        }
    }
    let origin = Instant::now();
    for f in &mut fleets {
        f.start(run_start_ms);
    }
    let (stop_progress, progress_task) = if cfg.progress {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let shared = fleets.iter().map(|f| f.shared.clone()).collect();
        let task = tokio::spawn(publish::show_progress(shared, total, origin, rx));
        (Some(tx), Some(task))
    } else {
        (None, None)
    };
    let mut outcomes: Vec<(PublishOutcome, Arc<FleetShared>)> = Vec::new();
    for f in fleets {
        let shared = f.shared.clone();
        let o = f.finish(origin).await?;
        outcomes.push((o, shared));
    }
    if let (Some(stop), Some(task)) = (stop_progress, progress_task) {
        let _ = stop.send(());
        let _ = task.await;
    }
    let freshness = match fresh_task {
        Some(t) => t.await.ok(),
        None => None,
    };
    // Samples the devices could not queue are misses too.
    let fresh_dropped: u64 = outcomes
        .iter()
        .map(|(_, s)| {
            s.freshness_dropped
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .sum();

    for (r, (o, _)) in runs.iter().zip(&outcomes) {
        let finish = RunFinish {
            run: r.run_id,
            exceptions: o.exceptions.clone(),
            failed: o.counters.failed,
        };
        if let Some(path) = &cfg.ledger {
            Ledger::append(path, &LedgerLine::Finish(finish.clone()))?;
        }
        ledger.apply(LedgerLine::Start(Box::new(start_line(r, &o.plan))))?;
        ledger.apply(LedgerLine::Finish(finish))?;
    }

    let mut summary = summarize(&cfg, &runs, &outcomes, connect_ms, warnings);
    summary.freshness = freshness
        .zip(fresh_every)
        .map(|(book, every)| book.figures(fresh_dropped, every, cfg.verify_timeout));

    if let Some(url) = &cfg.verify {
        let mut expect = StatsExpectation::default();
        for (r, (o, _)) in runs.iter().zip(&outcomes) {
            expect.add(&stats_expectation(
                &o.plan,
                &r.first_seq,
                &r.messages,
                &o.exceptions,
                &o.counters,
            ));
        }
        let vcfg = VerifyConfig {
            url: url.clone(),
            timeout: cfg.verify_timeout,
            concurrency: cfg.verify_concurrency,
        };
        let ledger = Arc::new(ledger);
        let mut stats = stats_before.map(|before| (before, expect));
        let mut report: Option<VerifyReport> = None;
        for (j, r) in runs.iter().enumerate() {
            // The stats are the pipeline's totals: checked once, after the
            // last fleet has caught up.
            let s = if j + 1 == runs.len() {
                stats.take()
            } else {
                None
            };
            let one = verify::verify(ledger.clone(), &r.plan.fleet, &vcfg, s).await?;
            match report.as_mut() {
                Some(all) => all.merge(one),
                None => report = Some(one),
            }
        }
        summary.verify = report;
    }
    summary.usage = resources::Usage::now(files_limit);
    summary.rss_connected_mib = connected.rss_mib;
    if devices > 0 {
        summary.idle_kib_per_device =
            (connected.rss_mib - before_connect.rss_mib).max(0.0) * 1024.0 / f64::from(devices);
    }
    if let Some(path) = &cfg.report_json {
        let text = serde_json::to_string_pretty(&summary)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(summary)
}

fn start_line(r: &FleetRun, plan: &RunPlan) -> RunStart {
    RunStart {
        run: r.run_id,
        plan: plan.clone(),
        first_seq: r.first_seq.clone(),
        messages: r.messages.clone(),
    }
}

/// The run's numbers, before verify.
fn summarize(
    cfg: &SimConfig,
    runs: &[FleetRun],
    outcomes: &[(PublishOutcome, Arc<FleetShared>)],
    connect_ms: u64,
    warnings: Vec<String>,
) -> Summary {
    let mut c = DeviceCounters::default();
    let mut latency: Option<hdrhistogram::Histogram<u64>> = None;
    let mut lag: Option<hdrhistogram::Histogram<u64>> = None;
    let mut timeline = publish::AckTimeline::default();
    let (mut first, mut last) = (None, None);
    let mut elapsed = Duration::ZERO;
    let (mut target_msgs, mut target_readings) = (0.0, 0.0);
    let mut not_connected = 0;
    let mut fleets = Vec::new();
    for (r, (o, shared)) in runs.iter().zip(outcomes) {
        c.add(&o.counters);
        merge_histogram(&mut latency, shared.latency());
        merge_histogram(&mut lag, shared.lag());
        timeline.merge(&shared.ack_timeline());
        first = publish::earliest(first, o.first_publish);
        last = last.max(o.last_done);
        elapsed = elapsed.max(o.elapsed);
        not_connected += o.not_connected;
        let (msgs, readings) = planned_rates(r, o);
        target_msgs += msgs;
        target_readings += readings;
        let oc = &o.counters;
        fleets.push(FleetSummary {
            run: r.run_id,
            fleet: o.plan.fleet.clone(),
            devices: o.plan.devices,
            qos: r.qos,
            messages_sent: oc.issued - oc.duplicates_issued - oc.malformed_issued,
            readings_sent: oc.readings_issued,
            acked: oc.telemetry_completed,
            failed: oc.failed,
            retransmissions: oc.retransmissions,
            reconnects: oc.reconnects,
        });
    }
    // The real time from the first publish to the last acknowledgement
    // (QoS 0: the last write): what was achieved, not what was planned.
    let span = match (first, last) {
        (Some(f), Some(l)) => l.saturating_duration_since(f),
        _ => Duration::ZERO,
    };
    let per_sec = |n: u64| match span.as_secs_f64() {
        secs if secs > 0.0 => n as f64 / secs,
        _ => 0.0,
    };
    let achieved = per_sec(c.telemetry_completed);
    let achieved_readings = per_sec(c.readings_completed);
    let telemetry_sent = c.issued - c.duplicates_issued - c.malformed_issued;
    let puback = latency.as_ref().and_then(summary::Latency::from_histogram);
    let schedule_lag = lag.as_ref().and_then(summary::Latency::from_histogram);
    let verdict = verdict(
        &c,
        (achieved_readings, target_readings),
        schedule_lag.as_ref(),
        puback.as_ref(),
        cfg.max_inflight,
    );
    Summary {
        run: runs.first().map_or(1, |r| r.run_id),
        fleet: runs
            .iter()
            .map(|r| r.plan.fleet.as_str())
            .collect::<Vec<_>>()
            .join(","),
        devices: runs.iter().map(|r| r.plan.devices).sum(),
        not_connected,
        qos: runs.first().map_or(cfg.qos, |r| r.qos),
        messages_sent: telemetry_sent,
        readings_sent: c.readings_issued,
        acked: c.telemetry_completed,
        failed: c.failed,
        duplicates_sent: c.duplicates_issued,
        malformed_sent: c.malformed_issued,
        retransmissions: c.retransmissions,
        reconnects: c.reconnects,
        target_msgs_per_sec: target_msgs,
        achieved_msgs_per_sec: achieved,
        target_readings_per_sec: target_readings,
        achieved_readings_per_sec: achieved_readings,
        acked_readings: c.readings_completed,
        rate_span_ms: span.as_secs_f64() * 1000.0,
        schedule_lag,
        behind_schedule: c.behind,
        max_lag_ms: c.max_lag_ms,
        puback,
        puback_timeline: timeline.buckets(),
        elapsed_ms: elapsed.as_millis() as u64,
        last_error: c.last_error.clone(),
        verify: None,
        protocol: cfg.protocol.to_string(),
        tls: cfg.tls.is_some(),
        connect_ms,
        refused: c.refused,
        window_waits: c.window_waits,
        verdict,
        fleets,
        freshness: None,
        usage: resources::Usage::default(),
        rss_connected_mib: 0.0,
        idle_kib_per_device: 0.0,
        warnings,
    }
}

fn merge_histogram(
    all: &mut Option<hdrhistogram::Histogram<u64>>,
    h: hdrhistogram::Histogram<u64>,
) {
    match all.as_mut() {
        Some(all) => {
            let _ = all.add(&h);
        }
        None => *all = Some(h),
    }
}

/// A fleet's planned messages/s and readings/s: what its schedule asks for
/// over its planned length.
fn planned_rates(r: &FleetRun, o: &PublishOutcome) -> (f64, f64) {
    let planned: u64 = (0..o.plan.devices)
        .map(|i| {
            let n = r.messages.get(i as usize).copied().unwrap_or(0);
            o.plan.telemetry_sends(i, n)
        })
        .sum();
    let planned_readings =
        r.messages.iter().sum::<u64>() * u64::from(o.plan.readings_per_message.max(1));
    let length = o
        .plan
        .planned_length_us()
        .map(|us| us as f64 / 1e6)
        .unwrap_or_else(|| {
            let longest = r.messages.iter().copied().max().unwrap_or(0);
            (o.plan.period_us.saturating_mul(longest)) as f64 / 1e6
        });
    if length > 0.0 {
        (planned as f64 / length, planned_readings as f64 / length)
    } else {
        let per_sec = f64::from(o.plan.devices) * 1e6 / o.plan.period_us as f64;
        (per_sec, per_sec * f64::from(o.plan.readings_per_message))
    }
}

/// Whether the schedule was kept, and if not, which side fell behind: the
/// broker (publishes waited for PUBACKs, PUBACKs took seconds, or
/// acknowledgements fell short of publishes made on time) or the simulator
/// itself (publishes late with the broker answering promptly).
///
/// Kept means both: publishes no more than [`MAX_LAG_P99_MS`] behind their
/// due time at the p99, and at least 98 % of the target acknowledged per
/// second. Judged on readings, which backfill batching does not change.
fn verdict(
    c: &DeviceCounters,
    (achieved, target): (f64, f64),
    lag: Option<&summary::Latency>,
    puback: Option<&summary::Latency>,
    window: usize,
) -> String {
    let on_rate = target <= 0.0 || achieved >= 0.98 * target;
    let (lag_p99, lag_max) = lag.map_or((0.0, 0.0), |l| (l.p99_ms, l.max_ms));
    let on_time = lag_p99 <= MAX_LAG_P99_MS;
    let rate = format!(
        "{achieved:.1} of {target:.1} readings/s acknowledged ({:.1} %)",
        100.0 * achieved / target.max(1e-9)
    );
    let lagging = format!(
        "publish lag p99 {}, max {}",
        seconds_or_ms(lag_p99),
        seconds_or_ms(lag_max)
    );
    let p50 = puback.map_or(0.0, |l| l.p50_ms);
    let slow_acks = p50 > SLOW_PUBACK_MS;
    if on_rate && on_time {
        let mut v = format!("kept the schedule: {rate}, {lagging}");
        if c.behind > 0 {
            v.push_str(&format!("; {} publishes over 100 ms late", c.behind));
        }
        if slow_acks || c.window_waits > 0 {
            v.push_str(&format!(
                "; the broker is slow to acknowledge: PUBACK p50 {p50:.0} ms, {} publishes waited for a full in-flight window",
                c.window_waits
            ));
        }
        return v;
    }
    let mut causes = Vec::new();
    // Publishes made on time but acknowledged too slowly: only the broker
    // can be behind.
    if c.window_waits > 0 || slow_acks || on_time {
        causes.push(format!(
            "the broker is not keeping up: PUBACK p50 {p50:.0} ms, {} publishes waited for a full in-flight window ({window} per device)",
            c.window_waits
        ));
    }
    if !on_time && c.window_waits == 0 {
        let who = if causes.is_empty() {
            "the simulator fell behind its schedule"
        } else {
            "publishing also fell behind (the simulator shares the CPU with the broker here)"
        };
        causes.push(format!("{who}: {} publishes over 100 ms late", c.behind));
    }
    format!(
        "did not keep the schedule: {lagging}, {rate}; {}",
        causes.join("; ")
    )
}

/// "850 ms" or "9.4 s".
fn seconds_or_ms(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else {
        format!("{ms:.0} ms")
    }
}

/// PUBACKs slower than this (median) mean the broker is behind, not busy.
const SLOW_PUBACK_MS: f64 = 1000.0;
/// Publishes this far behind their due time at the p99 did not keep the
/// schedule, whatever the rate.
const MAX_LAG_P99_MS: f64 = 1000.0;

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

#[cfg(test)]
mod tests {
    use super::*;

    fn latency(p50_ms: f64) -> summary::Latency {
        summary::Latency {
            count: 1,
            p50_ms,
            p90_ms: p50_ms,
            p99_ms: p50_ms,
            p999_ms: p50_ms,
            max_ms: p50_ms,
        }
    }

    #[test]
    fn the_verdict_names_the_side_that_fell_behind() {
        let mut c = DeviceCounters::default();
        let on_time = latency(5.0);
        let kept = verdict(
            &c,
            (995.0, 1000.0),
            Some(&on_time),
            Some(&latency(5.0)),
            256,
        );
        assert!(kept.starts_with("kept the schedule"), "{kept}");
        c.behind = 500;
        let late_but_on_rate = verdict(
            &c,
            (990.0, 1000.0),
            Some(&latency(300.0)),
            Some(&latency(5.0)),
            256,
        );
        assert!(
            late_but_on_rate.starts_with("kept the schedule"),
            "{late_but_on_rate}"
        );
        assert!(
            late_but_on_rate.contains("500 publishes over 100 ms late"),
            "{late_but_on_rate}"
        );
        // On rate, but publishes ran seconds behind at the p99: not kept.
        let far_behind = verdict(
            &c,
            (1000.0, 1000.0),
            Some(&latency(9400.0)),
            Some(&latency(3.0)),
            256,
        );
        assert!(
            far_behind.starts_with("did not keep the schedule: publish lag p99 9.4 s"),
            "{far_behind}"
        );
        assert!(
            far_behind.contains("the simulator fell behind its schedule"),
            "{far_behind}"
        );
        let slow_broker = verdict(
            &c,
            (800.0, 1000.0),
            Some(&latency(2000.0)),
            Some(&latency(8000.0)),
            256,
        );
        assert!(
            slow_broker.starts_with("did not keep the schedule"),
            "{slow_broker}"
        );
        assert!(
            slow_broker.contains("the broker is not keeping up"),
            "{slow_broker}"
        );
        assert!(
            slow_broker.contains("publishing also fell behind"),
            "{slow_broker}"
        );
        // Published on time, acknowledged at 54 %: the broker.
        let short_acks = verdict(
            &c,
            (540.0, 1000.0),
            Some(&on_time),
            Some(&latency(300.0)),
            256,
        );
        assert!(
            short_acks.contains("540.0 of 1000.0 readings/s acknowledged (54.0 %)"),
            "{short_acks}"
        );
        assert!(
            short_acks.contains("the broker is not keeping up"),
            "{short_acks}"
        );
        c.behind = 0;
        c.window_waits = 7;
        let full = verdict(&c, (990.0, 1000.0), Some(&on_time), Some(&latency(30.0)), 4);
        assert!(full.starts_with("kept the schedule"), "{full}");
        assert!(full.contains("7 publishes waited"), "{full}");
    }
}
