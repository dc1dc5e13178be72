//! The run's numbers, before verify: the fleets' outcomes added up, the
//! rates achieved against the rates planned, and the verdict on both.

use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::time::Instant;

use super::fleets::FleetRun;
use super::verdict::verdict;
use crate::config::SimConfig;
use crate::publish::device::DeviceCounters;
use crate::publish::{self, FleetShared, PublishOutcome};
use crate::resources;
use crate::summary::{self, FleetSummary, Summary};

/// What the fleets did, added up.
#[derive(Default)]
struct Totals {
    counters: DeviceCounters,
    latency: Option<Histogram<u64>>,
    lag: Option<Histogram<u64>>,
    timeline: publish::AckTimeline,
    first: Option<Instant>,
    last: Option<Instant>,
    elapsed: Duration,
    target_msgs: f64,
    target_readings: f64,
    not_connected: u32,
    fleets: Vec<FleetSummary>,
}

impl Totals {
    fn of(runs: &[FleetRun], outcomes: &[(PublishOutcome, Arc<FleetShared>)]) -> Totals {
        let mut t = Totals::default();
        for (r, (o, shared)) in runs.iter().zip(outcomes) {
            t.counters.add(&o.sum.counters);
            merge_histogram(&mut t.latency, shared.latency());
            merge_histogram(&mut t.lag, shared.lag());
            t.timeline.merge(&shared.ack_timeline());
            t.first = publish::earliest(t.first, o.sum.first_publish);
            t.last = t.last.max(o.sum.last_done);
            t.elapsed = t.elapsed.max(o.elapsed);
            t.not_connected += o.not_connected;
            let (msgs, readings) = planned_rates(r, o);
            t.target_msgs += msgs;
            t.target_readings += readings;
            let oc = &o.sum.counters;
            t.fleets.push(FleetSummary {
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
        t
    }

    /// The real time from the first publish to the last acknowledgement
    /// (QoS 0: the last write): what was achieved, not what was planned.
    fn span(&self) -> Duration {
        match (self.first, self.last) {
            (Some(f), Some(l)) => l.saturating_duration_since(f),
            _ => Duration::ZERO,
        }
    }
}

/// The run's numbers, before verify.
pub(super) fn summarize(
    cfg: &SimConfig,
    runs: &[FleetRun],
    outcomes: &[(PublishOutcome, Arc<FleetShared>)],
    connect_ms: u64,
    warnings: Vec<String>,
) -> Summary {
    let t = Totals::of(runs, outcomes);
    let c = &t.counters;
    let span = t.span();
    let per_sec = |n: u64| match span.as_secs_f64() {
        secs if secs > 0.0 => n as f64 / secs,
        _ => 0.0,
    };
    let achieved = per_sec(c.telemetry_completed);
    let achieved_readings = per_sec(c.readings_completed);
    let telemetry_sent = c.issued - c.duplicates_issued - c.malformed_issued;
    let puback = t
        .latency
        .as_ref()
        .and_then(summary::Latency::from_histogram);
    let schedule_lag = t.lag.as_ref().and_then(summary::Latency::from_histogram);
    let verdict = verdict(
        c,
        (achieved_readings, t.target_readings),
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
        not_connected: t.not_connected,
        qos: runs.first().map_or(cfg.qos, |r| r.qos),
        messages_sent: telemetry_sent,
        readings_sent: c.readings_issued,
        acked: c.telemetry_completed,
        failed: c.failed,
        duplicates_sent: c.duplicates_issued,
        malformed_sent: c.malformed_issued,
        retransmissions: c.retransmissions,
        reconnects: c.reconnects,
        target_msgs_per_sec: t.target_msgs,
        achieved_msgs_per_sec: achieved,
        target_readings_per_sec: t.target_readings,
        achieved_readings_per_sec: achieved_readings,
        acked_readings: c.readings_completed,
        rate_span_ms: span.as_secs_f64() * 1000.0,
        schedule_lag,
        behind_schedule: c.behind,
        max_lag_ms: c.max_lag_ms,
        puback,
        puback_timeline: t.timeline.buckets(),
        elapsed_ms: t.elapsed.as_millis() as u64,
        last_error: c.last_error.clone(),
        verify: None,
        alerts: None,
        protocol: cfg.protocol.to_string(),
        tls: cfg.tls.is_some(),
        connect_ms,
        refused: c.refused,
        window_waits: c.window_waits,
        verdict,
        fleets: t.fleets,
        freshness: None,
        usage: resources::Usage::default(),
        rss_connected_mib: 0.0,
        idle_kib_per_device: 0.0,
        warnings,
        liveness: Vec::new(),
    }
}

fn merge_histogram(all: &mut Option<Histogram<u64>>, h: Histogram<u64>) {
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
