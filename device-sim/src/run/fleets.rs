//! The fleets a run publishes: one plan per fleet, numbered after the
//! ledger's earlier runs and continuing each device's sequence numbers.

use crate::config::{Rate, SimConfig, Stop};
use crate::ledger::{Ledger, RunStart};
use crate::plan::RunPlan;
use crate::replay::{self, Recording, ReplayConfig, ReplayPlan, TimeMode};
use crate::scenario::{FleetSpec, Scenario};
use crate::signal::MetricSpec;

/// One fleet of a run, before it has started.
pub(super) struct FleetRun {
    pub(super) plan: RunPlan,
    pub(super) qos: u8,
    /// Per device, the first sequence number this run sends.
    pub(super) first_seq: Vec<u64>,
    /// Per device, the telemetry messages this run sends.
    pub(super) messages: Vec<u64>,
    pub(super) run_id: u64,
}

impl FleetRun {
    /// The ledger's record of this run, under `plan` (as started).
    pub(super) fn start_line(&self, plan: &RunPlan) -> RunStart {
        RunStart {
            run: self.run_id,
            plan: plan.clone(),
            first_seq: self.first_seq.clone(),
            messages: self.messages.clone(),
        }
    }
}

/// The fleets a configuration asks for: its scenario's, or the one its
/// flat fields describe.
pub(super) fn fleet_plans(cfg: &SimConfig, ledger: &Ledger) -> anyhow::Result<Vec<FleetRun>> {
    let base = base_plan(cfg);
    let specs = match (&cfg.scenario, &cfg.replay) {
        (None, Some(replay)) => replay_plans(cfg, replay, &base)?,
        (None, None) => vec![(
            RunPlan {
                period_us: cfg.period_us()?,
                ..base
            },
            cfg.qos,
            cfg.stop,
        )],
        (Some(sc), _) => sc
            .fleets
            .iter()
            .map(|f| scenario_plan(cfg, sc, f, &base))
            .collect::<anyhow::Result<_>>()?,
    };
    let specs = with_liveness(cfg, specs)?;
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
            let roles = plan.liveness_roles();
            let messages = (0..plan.devices)
                .map(|i| match stop {
                    Stop::Count(c) if plan.replay.is_some() => {
                        c.min(plan.messages_within(i, u64::MAX))
                    }
                    Stop::Count(c) => c,
                    Stop::After(d) => plan.messages_within(i, d.as_micros() as u64),
                })
                .zip(stop_counts(&plan, &roles))
                .map(|(n, until)| until.map_or(n, |u| n.min(u)))
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

/// The plan the flat fields describe, before its period is worked out.
fn base_plan(cfg: &SimConfig) -> RunPlan {
    RunPlan {
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
        replay: None,
        template: cfg.payload_template.clone(),
        liveness: None,
    }
}

/// Each fleet's plan with the run's liveness part, which needs the fleet's
/// schedule length.
fn with_liveness(
    cfg: &SimConfig,
    specs: Vec<(RunPlan, u8, Stop)>,
) -> anyhow::Result<Vec<(RunPlan, u8, Stop)>> {
    let Some(l) = &cfg.liveness else {
        return Ok(specs);
    };
    specs
        .into_iter()
        .map(|(mut plan, qos, stop)| {
            let length_us = match stop {
                Stop::After(d) => d.as_micros() as u64,
                Stop::Count(c) => plan
                    .planned_length_us()
                    .unwrap_or_else(|| c.saturating_mul(plan.period_us)),
            };
            plan.liveness = Some(
                l.plan(length_us, cfg.verify.is_some())
                    .map_err(|e| e.context(format!("fleet {}", plan.fleet)))?,
            );
            Ok((plan, qos, stop))
        })
        .collect()
}

/// Per device, the messages due before its liveness stop, if it leaves.
fn stop_counts<'a>(
    plan: &'a RunPlan,
    roles: &'a [crate::liveness::Role],
) -> impl Iterator<Item = Option<u64>> + 'a {
    (0..plan.devices).map(move |i| {
        let leaves = roles.get(i as usize).is_some_and(|r| r.leaves());
        let stop_us = plan.liveness.as_ref().map(|l| l.stop_us);
        stop_us
            .filter(|_| leaves)
            .map(|us| plan.messages_within(i, us))
    })
}

/// One fleet of a scenario: its plan, QoS and when it stops.
fn scenario_plan(
    cfg: &SimConfig,
    sc: &Scenario,
    f: &FleetSpec,
    base: &RunPlan,
) -> anyhow::Result<(RunPlan, u8, Stop)> {
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
    Ok((plan, f.qos, Stop::After(sc.length())))
}

/// A recorded file's fleets, each replaying its devices' rows.
fn replay_plans(
    cfg: &SimConfig,
    replay: &ReplayConfig,
    base: &RunPlan,
) -> anyhow::Result<Vec<(RunPlan, u8, Stop)>> {
    let rec = replay::load(&replay.file, &cfg.fleet, replay.speed)?;
    check_future(&rec, replay)?;
    let metrics: Vec<MetricSpec> = rec
        .metrics
        .iter()
        .map(|name| MetricSpec {
            name: name.clone(),
            signal: Default::default(),
        })
        .collect();
    Ok(rec
        .fleets
        .into_iter()
        .map(|(fleet, data)| {
            let plan = RunPlan {
                fleet: fleet.clone(),
                devices: data.devices.len() as u32,
                // Unused: the rows set the pace.
                period_us: 1_000_000,
                readings_per_message: 1,
                metrics: metrics.clone(),
                replay: Some(ReplayPlan {
                    file: replay.file.clone(),
                    digest: rec.digest.clone(),
                    speed: replay.speed,
                    time: replay.time,
                    default_fleet: cfg.fleet.clone(),
                    first_ts: rec.first_ts,
                    data: Some(std::sync::Arc::new(data)),
                }),
                ..base.clone()
            };
            (plan, cfg.qos, cfg.stop)
        })
        .collect())
}

/// The pipeline refuses readings more than 10 minutes ahead of their
/// arrival (`in_future`), which the expectations do not model: a replay
/// whose readings would run that far ahead of their publish is refused
/// before it starts.
fn check_future(rec: &Recording, replay: &ReplayConfig) -> anyhow::Result<()> {
    // Beyond this, with a margin for the clocks.
    const AHEAD_MS: i64 = 9 * 60_000;
    let now = crate::now_ms();
    for d in rec.fleets.values().flat_map(|f| f.devices.iter()) {
        for row in &d.rows {
            let due_ms = now + (row.due_us / 1000) as i64;
            let ts = match replay.time {
                TimeMode::Shift => now + (row.ts - rec.first_ts),
                TimeMode::Keep => row.ts,
            };
            anyhow::ensure!(
                ts - due_ms <= AHEAD_MS,
                "replaying {} at {:?} with --replay-time {:?}: device {}'s reading at {} would be published {} s before its time, and the pipeline refuses readings more than 10 min ahead (in_future); replay slower, or with --replay-time keep for a recent file",
                replay.file.display(),
                replay.speed,
                replay.time,
                d.id,
                row.ts,
                (ts - due_ms) / 1000
            );
        }
    }
    Ok(())
}
