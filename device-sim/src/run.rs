//! [`run`]: a simulation from its configuration to its summary, in named
//! steps: plan the fleets, connect them, publish their schedules, record
//! them in the ledger, add up the numbers, verify.
//!
//! - `fleets`: the fleets' plans, continuing the ledger's runs.
//! - `spread`: a run over several processes: the parent's side and the
//!   workers' (see [`crate::processes`]).
//! - `tally`: the run's numbers, from the fleets' outcomes.
//! - `verdict`: whether the schedule was kept, and who fell behind.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::SimConfig;
use crate::exporter::{self, Live, Phase};
use crate::freshness::{self, Sample};
use crate::ledger::{Ledger, LedgerLine, RunFinish};
use crate::plan::RunPlan;
use crate::publish::{self, ConnectLimiter, Fleet, FleetShared, PublishConfig, PublishOutcome};
use crate::summary::Summary;
use crate::template::Verdict;
use crate::verify::api::Api;
use crate::verify::{self, StatsExpectation, VerifyConfig, VerifyReport};
use crate::{now_ms, resources};
use fleets::{FleetRun, fleet_plans};

mod fleets;
mod spread;
mod tally;
mod verdict;

pub use spread::serve_worker;

/// Runs a simulation: connect, publish the schedule, record it in the ledger,
/// and verify if asked.
pub async fn run(cfg: SimConfig) -> anyhow::Result<Summary> {
    cfg.validate()?;
    // The endpoint serves until this run returns, however it returns.
    let mut cfg = cfg;
    let _serving = match cfg.metrics_listen {
        Some(addr) => {
            let live = cfg.live.get_or_insert_with(Live::new).clone();
            Some(exporter::start(addr, live).await?.1)
        }
        None => None,
    };
    let cfg = cfg;
    let warnings = cfg.warnings();
    for w in &warnings {
        eprintln!("device-sim: warning: {w}");
    }
    let mut ledger = match &cfg.ledger {
        Some(path) => Ledger::load(path)?,
        None => Ledger::default(),
    };
    let runs = fleet_plans(&cfg, &ledger)?;
    let refused = template_refusal(&cfg, &runs)?;
    let devices: u32 = runs.iter().map(|r| r.plan.devices).sum();
    if let Some(live) = &cfg.live {
        let total: u64 = runs.iter().flat_map(|r| r.messages.iter()).sum();
        live.planned(u64::from(devices), total);
    }
    // Spread over workers, this process holds no device's connection.
    let sockets = if cfg.processes.is_some() { 0 } else { devices };
    let files_limit = resources::ensure_open_files(u64::from(sockets) + resources::SPARE_FILES)?;
    let stats_before = stats_before(&cfg, refused.is_some()).await?;

    let mut published = match &cfg.processes {
        Some(p) => spread::publish_workers(&cfg, &runs, p).await?,
        None => publish_here(&cfg, &runs, devices, files_limit).await?,
    };
    record(&cfg, &runs, &published.outcomes, &mut ledger)?;

    let mut summary = tally::summarize(
        &cfg,
        &runs,
        &published.outcomes,
        published.connect_ms,
        warnings,
    );
    summary.freshness = published
        .freshness
        .take()
        .map(|t| t.figures(cfg.verify_timeout));
    summary.liveness = std::mem::take(&mut published.liveness);
    if let Some(url) = &cfg.verify {
        set_phase(&cfg, Phase::Verifying);
        summary.verify = match (refused, stats_before) {
            (Some(reason), Some(before)) => Some(
                verify::verify_refused(
                    url,
                    &before,
                    reason,
                    &published.outcomes,
                    devices,
                    cfg.verify_timeout,
                )
                .await?,
            ),
            (_, stats_before) => {
                let expect = expected_stats(&runs, &published.outcomes);
                let stats = stats_before.map(|before| (before, expect));
                verify_fleets(&cfg, url, &runs, ledger, stats).await?
            }
        };
    }
    // The liveness check is part of verify: a miss or an extra fails it.
    if let Some(v) = summary.verify.as_mut() {
        v.ok &= summary.liveness.iter().all(|l| l.ok);
    }
    if let (Some(url), false) = (&cfg.verify, cfg.alert_rules.is_empty()) {
        summary.alerts = Some(check_alerts(&cfg, url, &published).await?);
    }
    summary.usage = resources::Usage::now(files_limit);
    summary.usage.add(&published.workers);
    let (rss_before_mib, rss_connected_mib) = published.rss_mib;
    summary.rss_connected_mib = rss_connected_mib;
    if devices > 0 {
        summary.idle_kib_per_device =
            (rss_connected_mib - rss_before_mib).max(0.0) * 1024.0 / f64::from(devices);
    }
    if let Some(path) = &cfg.report_json {
        let text = serde_json::to_string_pretty(&summary)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(live) = &cfg.live {
        live.finish(&summary);
    }
    Ok(summary)
}

/// The alerts check, over the windows from the allowed lateness before the
/// earliest fleet's start (late readings reach back that far) to the last
/// acknowledgement.
async fn check_alerts(
    cfg: &SimConfig,
    url: &str,
    published: &Published,
) -> anyhow::Result<verify::alerts::AlertCheck> {
    let started = published
        .outcomes
        .iter()
        .map(|(o, _)| o.plan.run_start_ms)
        .min()
        .unwrap_or_else(now_ms);
    let last = published
        .outcomes
        .iter()
        .filter_map(|(o, _)| o.sum.last_done)
        .max();
    let acked_until_ms = match last {
        Some(at) => now_ms() - Instant::now().saturating_duration_since(at).as_millis() as i64,
        None => now_ms(),
    };
    let from_ms = started - cfg.allowed_lateness.as_millis() as i64 - crate::plan::MINUTE_MS;
    verify::alerts::check(
        url,
        &cfg.alert_rules,
        from_ms,
        acked_until_ms,
        cfg.verify_timeout,
    )
    .await
}

/// Connects and publishes every device in this process.
async fn publish_here(
    cfg: &SimConfig,
    runs: &[FleetRun],
    devices: u32,
    files_limit: u64,
) -> anyhow::Result<Published> {
    let before_connect = resources::Usage::now(files_limit).rss_mib;
    let connected = connect(cfg, runs, devices).await?;
    let rss_connected_mib = resources::Usage::now(files_limit).rss_mib;
    set_phase(cfg, Phase::Publishing);
    let run_start_ms = now_ms() + 100;
    record_start(cfg, runs, run_start_ms)?;
    let mut published = publish(cfg, runs, connected, run_start_ms).await?;
    published.rss_mib = (before_connect, rss_connected_mib);
    Ok(published)
}

/// Records each fleet's start in the ledger file, before anyone publishes.
fn record_start(cfg: &SimConfig, runs: &[FleetRun], run_start_ms: i64) -> anyhow::Result<()> {
    if let Some(path) = &cfg.ledger {
        for r in runs {
            let mut plan = r.plan.clone();
            plan.run_start_ms = run_start_ms;
            Ledger::append(path, &LedgerLine::Start(Box::new(r.start_line(&plan))))?;
        }
    }
    Ok(())
}

fn set_phase(cfg: &SimConfig, phase: Phase) {
    if let Some(live) = &cfg.live {
        live.set_phase(phase);
    }
}

/// What payload v1 makes of the run's template, when verifying: `None` when
/// its payloads read back as the readings (or there is no template), the
/// reason the pipeline must refuse them with, or an error when they say
/// something else, which verify cannot expect.
fn template_refusal(cfg: &SimConfig, runs: &[FleetRun]) -> anyhow::Result<Option<&'static str>> {
    let Some(t) = &cfg.payload_template else {
        return Ok(None);
    };
    if cfg.verify.is_none() {
        return Ok(None);
    }
    let mut refused = None;
    for r in runs {
        let names: Vec<String> = r.plan.metrics.iter().map(|m| m.name.clone()).collect();
        match t.verdict(&names) {
            Verdict::Faithful => {}
            Verdict::Refused(reason) => refused = Some(reason),
            Verdict::Unfaithful(why) => anyhow::bail!(
                "--payload-template: {why}, so verify cannot know what the pipeline stores; run without --verify"
            ),
        }
    }
    anyhow::ensure!(
        refused.is_none() || !cfg.faults.any(),
        "a template whose payloads are refused cannot be combined with fault knobs"
    );
    Ok(refused)
}

/// `/v1/stats` before publishing. Stats deltas only mean something when the
/// run injects faults, and assume nothing else publishes meanwhile.
async fn stats_before(
    cfg: &SimConfig,
    refused: bool,
) -> anyhow::Result<Option<verify::api::Stats>> {
    match &cfg.verify {
        Some(url) if cfg.faults.any() || refused => Ok(Some(
            Api::new(url, 1)?
                .with_token(cfg.api_token.clone())
                .stats()
                .await
                .context("reading /v1/stats before publishing")?,
        )),
        _ => Ok(None),
    }
}

/// The fleets, connected, and the freshness probe, started.
struct Connected {
    fleets: Vec<Fleet>,
    connect_ms: u64,
    /// Telemetry messages the run plans, over every fleet.
    total: u64,
    /// The freshness probe, when verifying: it samples one publish in `every`.
    freshness: Option<(tokio::sync::oneshot::Receiver<freshness::Book>, u64)>,
}

/// Connects every fleet's devices, at the configured rate.
async fn connect(cfg: &SimConfig, runs: &[FleetRun], devices: u32) -> anyhow::Result<Connected> {
    let connect_rate = cfg
        .scenario
        .as_ref()
        .and_then(|s| s.connect_rate)
        .or(cfg.connect_rate)
        // A worker of a spread run connects its share at its share of the rate.
        .map(|r| r / f64::from(cfg.worker.map_or(1, |s| s.of)));
    let connect_timeout = cfg.connect_timeout.unwrap_or(Duration::from_secs(10))
        + connect_rate
            .filter(|r| *r > 0.0)
            .map(|r| Duration::from_secs_f64(f64::from(devices) / r))
            .unwrap_or(Duration::from_secs(u64::from(devices / 1000)));
    let limiter = Arc::new(ConnectLimiter::new(connect_rate));
    let total: u64 = runs.iter().flat_map(|r| r.messages.iter()).sum();
    let (fresh_tx, freshness) = start_freshness(cfg, total, devices);
    let connecting = Instant::now();
    let mut fleets = Vec::with_capacity(runs.len());
    for r in runs {
        let pcfg = PublishConfig {
            broker: cfg.broker.clone(),
            more_brokers: cfg.more_brokers.clone(),
            protocol: cfg.protocol,
            tls: cfg.tls.clone(),
            source_addrs: cfg.source_addrs.clone(),
            qos: publish::qos(r.qos)?,
            keep_alive: cfg.keep_alive,
            max_inflight: cfg.max_inflight,
            username: cfg.username.clone(),
            password: cfg.password.clone(),
            presence_topic: cfg.presence_topic,
            hold_connections: cfg.hold_connections,
            connect_rate,
            ack_timeout: cfg.ack_timeout,
            connect_timeout,
            slot: cfg.worker,
        };
        let shared = Arc::new(FleetShared::new()?);
        if let Some(live) = &cfg.live {
            live.add_fleet(shared.clone());
        }
        let fresh = fresh_tx
            .clone()
            .zip(freshness.as_ref().map(|(_, every)| *every))
            .map(|(tx, every)| (every, tx));
        let fleet = Fleet::connect(
            &r.plan,
            &r.first_seq,
            &r.messages,
            &pcfg,
            limiter.clone(),
            shared,
            fresh,
            cfg.progress,
        )
        .await?;
        fleets.push(fleet);
    }
    Ok(Connected {
        fleets,
        connect_ms: connecting.elapsed().as_millis() as u64,
        total,
        freshness,
    })
}

/// The freshness probe, when verifying and sampling: the devices' sender,
/// and the probe's task with its sampling interval.
type FreshnessProbe = (
    Option<mpsc::Sender<Sample>>,
    Option<(tokio::sync::oneshot::Receiver<freshness::Book>, u64)>,
);

fn start_freshness(cfg: &SimConfig, total: u64, devices: u32) -> FreshnessProbe {
    let every = cfg
        .verify
        .as_ref()
        .and_then(|_| cfg.freshness_sample.every(total));
    match (&cfg.verify, every) {
        (Some(url), Some(every)) => {
            let queue = freshness::queue_len(every, total, devices);
            let (tx, rx) = mpsc::channel(queue);
            let task = freshness::spawn_probe(url.clone(), rx, cfg.verify_timeout);
            (Some(tx), Some((task, every)))
        }
        _ => (None, None),
    }
}

/// What publishing did.
struct Published {
    outcomes: Vec<(PublishOutcome, Arc<FleetShared>)>,
    connect_ms: u64,
    freshness: Option<freshness::Tally>,
    /// Resident memory before and after connecting, MiB (summed over the
    /// workers of a spread run).
    rss_mib: (f64, f64),
    /// What the workers of a spread run used, added up; zero otherwise.
    workers: resources::Usage,
    /// Each fleet's liveness check, for fleets with a liveness plan.
    liveness: Vec<crate::liveness::LivenessReport>,
}

/// Starts every fleet at `run_start_ms`, and waits for them to finish.
async fn publish(
    cfg: &SimConfig,
    runs: &[FleetRun],
    connected: Connected,
    run_start_ms: i64,
) -> anyhow::Result<Published> {
    let Connected {
        mut fleets,
        connect_ms,
        total,
        freshness,
    } = connected;
    let origin = Instant::now();
    let mut liveness = Vec::new();
    for (f, r) in fleets.iter_mut().zip(runs) {
        let plan = f.start(run_start_ms);
        if r.plan.liveness.is_some() {
            liveness.push(start_liveness_check(cfg, plan)?);
        }
    }
    let progress = cfg.progress.then(|| {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let shared = fleets.iter().map(|f| f.shared.clone()).collect();
        let task = tokio::spawn(publish::show_progress(shared, total, origin, rx));
        (tx, task)
    });
    let mut outcomes: Vec<(PublishOutcome, Arc<FleetShared>)> = Vec::new();
    for f in fleets {
        let shared = f.shared.clone();
        let o = f.finish(origin).await?;
        outcomes.push((o, shared));
    }
    if let Some((stop, task)) = progress {
        let _ = stop.send(());
        let _ = task.await;
    }
    // The devices' senders are gone with their tasks: the probe finishes
    // what it has queued.
    let freshness = match freshness {
        Some((task, every)) => task.await.ok().map(|book| {
            // Samples the devices could not queue are misses too.
            let dropped: u64 = outcomes
                .iter()
                .map(|(_, s)| {
                    s.freshness_dropped
                        .load(std::sync::atomic::Ordering::Relaxed)
                })
                .sum();
            book.tally(dropped, every)
        }),
        None => None,
    };
    let mut reports = Vec::with_capacity(liveness.len());
    for task in liveness {
        reports.push(task.await.context("the liveness check panicked")?);
    }
    Ok(Published {
        outcomes,
        connect_ms,
        freshness,
        rss_mib: (0.0, 0.0),
        workers: resources::Usage::default(),
        liveness: reports,
    })
}

/// Starts the liveness check of a fleet that has started with `plan`: it
/// reads the API from the plan's stop time on, while the fleet publishes.
fn start_liveness_check(
    cfg: &SimConfig,
    plan: RunPlan,
) -> anyhow::Result<JoinHandle<crate::liveness::LivenessReport>> {
    let api = match &cfg.verify {
        Some(url) => Some(Api::new(url, 4)?.with_token(cfg.api_token.clone())),
        None => None,
    };
    let stop_us = plan.liveness.as_ref().map_or(0, |l| l.stop_us as i64);
    let ahead_us = plan.run_start_ms * 1000 + stop_us - crate::now_us();
    let stop = Instant::now() + Duration::from_micros(ahead_us.max(0) as u64);
    Ok(tokio::spawn(crate::liveness::check(api, plan, stop)))
}

/// Records each fleet's finish in the ledger file (if any) and in `ledger`,
/// which verify reads.
fn record(
    cfg: &SimConfig,
    runs: &[FleetRun],
    outcomes: &[(PublishOutcome, Arc<FleetShared>)],
    ledger: &mut Ledger,
) -> anyhow::Result<()> {
    for (r, (o, _)) in runs.iter().zip(outcomes) {
        let finish = RunFinish {
            run: r.run_id,
            exceptions: o.sum.exceptions.clone(),
            failed: o.sum.counters.failed,
        };
        if let Some(path) = &cfg.ledger {
            Ledger::append(path, &LedgerLine::Finish(finish.clone()))?;
        }
        ledger.apply(LedgerLine::Start(Box::new(r.start_line(&o.plan))))?;
        ledger.apply(LedgerLine::Finish(finish))?;
    }
    Ok(())
}

/// What every fleet together should change in `/v1/stats`.
fn expected_stats(
    runs: &[FleetRun],
    outcomes: &[(PublishOutcome, Arc<FleetShared>)],
) -> StatsExpectation {
    let mut expect = StatsExpectation::default();
    for (r, (o, _)) in runs.iter().zip(outcomes) {
        expect.add(&verify::stats::stats_expectation(
            &o.plan,
            &r.first_seq,
            &r.messages,
            &o.sum.exceptions,
            &o.sum.counters,
        ));
    }
    expect
}

/// Verifies each fleet in turn, and the stats once, after the last.
async fn verify_fleets(
    cfg: &SimConfig,
    url: &str,
    runs: &[FleetRun],
    ledger: Ledger,
    mut stats: Option<(verify::api::Stats, StatsExpectation)>,
) -> anyhow::Result<Option<VerifyReport>> {
    let vcfg = VerifyConfig {
        url: url.to_string(),
        token: cfg.api_token.clone(),
        timeout: cfg.verify_timeout,
        concurrency: cfg.verify_concurrency,
    };
    let ledger = Arc::new(ledger);
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
    Ok(report)
}
