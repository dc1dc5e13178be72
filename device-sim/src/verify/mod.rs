//! Verify: after publishing, compare every device and fleet window the API
//! reports with what the ledger's runs should have produced.
//!
//! - [`api`]: the query API client (pagination, bounded concurrency).
//! - [`compare`]: the field-by-field comparison, pure.
//!
//! Order of work: (1) regenerate every device once to build the fleet's
//! expected windows, keeping only those; (2) poll the fleet's 1d counts until
//! they reach the expected totals (the pipeline has caught up) or the
//! timeout passes; (3) regenerate each device again, fetch its series and
//! compare, a bounded number of devices at a time; then the fleet's series;
//! (4) while time remains, re-check the series that failed, since a pipeline
//! may update device and fleet series at different moments.

pub mod api;
pub mod compare;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use serde::Serialize;
use tokio::time::Instant;

use crate::expect::{Totals, Windows, device_windows};
use crate::ledger::Ledger;
use crate::plan::DAY_MS;
use api::{Api, Scope, Stats, res_name};
use compare::{Mismatch, Tally, compare_series};

/// How often verify asks whether the pipeline has caught up.
const POLL_EVERY: Duration = Duration::from_millis(200);
/// Devices whose failures verify re-checks; more than this is no lag.
const MAX_RECHECK: usize = 1000;

#[derive(Debug, Clone)]
pub struct VerifyConfig {
    pub url: String,
    pub timeout: Duration,
    pub concurrency: usize,
}

/// An expected change of one `/v1/stats` counter over the run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatCheck {
    pub counter: String,
    pub expected_lo: u64,
    pub expected_hi: u64,
    /// The counter's change (after minus before).
    pub got: i64,
}

impl StatCheck {
    pub fn ok(&self) -> bool {
        self.got >= self.expected_lo as i64 && self.got <= self.expected_hi as i64
    }
}

/// What the run should have done to `/v1/stats`, as ranges.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatsExpectation {
    pub accepted_readings: (u64, u64),
    pub duplicate_readings: (u64, u64),
    pub too_late: (u64, u64),
    pub malformed_json: (u64, u64),
}

impl StatsExpectation {
    /// Adds another fleet's expectation: the counters are the pipeline's
    /// totals.
    pub fn add(&mut self, o: &StatsExpectation) {
        for (a, b) in [
            (&mut self.accepted_readings, o.accepted_readings),
            (&mut self.duplicate_readings, o.duplicate_readings),
            (&mut self.too_late, o.too_late),
            (&mut self.malformed_json, o.malformed_json),
        ] {
            a.0 += b.0;
            a.1 += b.1;
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VerifyReport {
    pub ok: bool,
    pub devices: u64,
    pub series: u64,
    pub windows: u64,
    /// Windows checked by their count alone, because a reading in them may
    /// or may not have been accepted.
    pub uncertain_windows: u64,
    pub mismatch_count: u64,
    pub mismatches: Vec<Mismatch>,
    /// The fleet's totals reached the expected ones before the timeout.
    pub caught_up: bool,
    /// How long the API took to catch up (or until the timeout), ms.
    pub catch_up_ms: u64,
    /// Totals the API reported against the expected ones, per metric.
    pub catch_up_detail: String,
    pub stats: Vec<StatCheck>,
    /// How long verify took in all, ms.
    pub verify_ms: u64,
}

impl VerifyReport {
    /// Folds another fleet's report into this one.
    pub fn merge(&mut self, o: VerifyReport) {
        self.ok &= o.ok;
        self.devices += o.devices;
        self.series += o.series;
        self.windows += o.windows;
        self.uncertain_windows += o.uncertain_windows;
        self.mismatch_count += o.mismatch_count;
        for m in o.mismatches {
            if self.mismatches.len() < compare::KEPT_MISMATCHES {
                self.mismatches.push(m);
            }
        }
        if !o.caught_up {
            self.catch_up_detail = o.catch_up_detail;
        }
        self.caught_up &= o.caught_up;
        self.catch_up_ms = self.catch_up_ms.max(o.catch_up_ms);
        self.verify_ms += o.verify_ms;
        self.stats.extend(o.stats);
    }
}

impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.ok {
            writeln!(f, "verify: OK")?;
        } else {
            writeln!(f, "verify: FAILED ({} mismatches)", self.mismatch_count)?;
        }
        writeln!(
            f,
            "verify: compared {} windows in {} series of {} devices and their fleet ({} uncertain windows checked by count range only) in {:.1} s",
            self.windows,
            self.series,
            self.devices,
            self.uncertain_windows,
            self.verify_ms as f64 / 1000.0
        )?;
        if !self.caught_up {
            writeln!(
                f,
                "verify: the API did not catch up within {} ms: {}",
                self.catch_up_ms, self.catch_up_detail
            )?;
        }
        for s in &self.stats {
            let mark = if s.ok() { "ok" } else { "MISMATCH" };
            writeln!(
                f,
                "verify: stats {} changed by {} (expected {}..={}) {mark}",
                s.counter, s.got, s.expected_lo, s.expected_hi
            )?;
        }
        for m in &self.mismatches {
            writeln!(f, "  {m}")?;
        }
        if self.mismatch_count > self.mismatches.len() as u64 {
            writeln!(
                f,
                "  ... and {} more",
                self.mismatch_count - self.mismatches.len() as u64
            )?;
        }
        Ok(())
    }
}

/// Verifies every device of `fleet` in the ledger, and the fleet's series.
pub async fn verify(
    ledger: Arc<Ledger>,
    fleet: &str,
    cfg: &VerifyConfig,
    stats: Option<(Stats, StatsExpectation)>,
) -> anyhow::Result<VerifyReport> {
    let started = Instant::now();
    let deadline = started + cfg.timeout;
    let api = Api::new(&cfg.url, cfg.concurrency)?;
    let devices = Arc::new(ledger.devices_of(fleet));
    for occ in devices.values().flatten() {
        let run = &ledger.runs[occ.0];
        if run.exceptions.is_none() {
            bail!(
                "ledger run {} of fleet {fleet} never finished: what it published is unknown, so the fleet cannot be verified exactly",
                run.start.run
            );
        }
    }

    let (fleet_windows, totals) = {
        let (ledger, devices) = (ledger.clone(), devices.clone());
        tokio::task::spawn_blocking(move || {
            let mut fleet_windows = Windows::new();
            for occ in devices.values() {
                for (k, w) in device_windows(&ledger.runs, occ) {
                    fleet_windows.entry(k).or_default().merge(&w);
                }
            }
            let mut totals: Vec<(String, Totals)> = Vec::new();
            for ((metric, res, _), w) in &fleet_windows {
                if *res != DAY_MS {
                    continue;
                }
                if totals.last().is_none_or(|(m, _)| m != metric) {
                    totals.push((metric.clone(), Totals::default()));
                }
                if let Some((_, t)) = totals.last_mut() {
                    t.certain += w.count - w.maybe;
                    t.maybe += w.maybe;
                }
            }
            (fleet_windows, totals)
        })
        .await
        .context("regenerating the fleet's windows")?
    };
    let (from, to) = day_range(&fleet_windows);

    let (caught_up, catch_up_detail) = catch_up(&api, fleet, &totals, from, to, deadline).await?;
    let catch_up_ms = started.elapsed().as_millis() as u64;

    let mut tally = Tally::default();
    let mut failing = Vec::new();
    let ids: Vec<&String> = devices.keys().collect();
    let mut checks = futures::stream::iter(ids)
        .map(|id| {
            let (api, ledger, devices) = (&api, &ledger, &devices);
            async move {
                let t = check_device(api, ledger, id, &devices[id]).await;
                (id, t)
            }
        })
        .buffer_unordered(cfg.concurrency.max(1));
    while let Some((id, t)) = checks.next().await {
        let t = t?;
        if !t.ok() {
            failing.push(id.clone());
        }
        tally.add(t);
    }
    drop(checks);
    let mut fleet_tally = check_fleet(&api, fleet, &fleet_windows, from, to).await?;
    let (windows, series, uncertain) = (
        tally.windows + fleet_tally.windows,
        tally.series + fleet_tally.series,
        tally.uncertain + fleet_tally.uncertain,
    );

    // Re-check what failed while time remains: the first pass may have
    // raced the pipeline's last updates.
    let mut device_tally = tally;
    let mut failing: BTreeSet<String> = failing.into_iter().collect();
    while (!failing.is_empty() || !fleet_tally.ok())
        && failing.len() <= MAX_RECHECK
        && Instant::now() + POLL_EVERY < deadline
    {
        tokio::time::sleep(POLL_EVERY).await;
        let mut again = Tally::default();
        let mut still = BTreeSet::new();
        for id in &failing {
            let t = check_device(&api, &ledger, id, &devices[id]).await?;
            if !t.ok() {
                still.insert(id.clone());
            }
            again.add(t);
        }
        if !fleet_tally.ok() {
            fleet_tally = check_fleet(&api, fleet, &fleet_windows, from, to).await?;
        }
        failing = still;
        device_tally = again;
    }
    if failing.is_empty() {
        device_tally = Tally::default();
    }
    let mut result = Tally::default();
    result.add(device_tally);
    result.add(fleet_tally);

    let mut stat_checks = Vec::new();
    if let Some((before, expect)) = stats {
        let after = api.stats().await?;
        let delta = |f: &dyn Fn(&Stats) -> u64| f(&after) as i64 - f(&before) as i64;
        let mut check = |counter: &str, (lo, hi): (u64, u64), got: i64| {
            stat_checks.push(StatCheck {
                counter: counter.into(),
                expected_lo: lo,
                expected_hi: hi,
                got,
            })
        };
        check(
            "accepted_readings",
            expect.accepted_readings,
            delta(&|s| s.accepted_readings),
        );
        check(
            "duplicate_readings",
            expect.duplicate_readings,
            delta(&|s| s.duplicate_readings),
        );
        check(
            "rejected.too_late",
            expect.too_late,
            delta(&|s| s.rejected("too_late")),
        );
        check(
            "rejected.malformed_json",
            expect.malformed_json,
            delta(&|s| s.rejected("malformed_json")),
        );
    }

    // Devices that published yet expect no window at all mean the
    // expectation itself went wrong; that must never read as a pass.
    let compared_something = windows + uncertain > 0 || devices.is_empty();
    Ok(VerifyReport {
        ok: result.ok() && stat_checks.iter().all(StatCheck::ok) && compared_something,
        devices: devices.len() as u64,
        series,
        windows,
        uncertain_windows: uncertain,
        mismatch_count: result.mismatch_count,
        mismatches: result.mismatches,
        caught_up,
        catch_up_ms,
        catch_up_detail,
        stats: stat_checks,
        verify_ms: started.elapsed().as_millis() as u64,
    })
}

/// `[from, to)` covering every day the windows touch.
fn day_range(windows: &Windows) -> (i64, i64) {
    let days = windows.keys().filter(|k| k.1 == DAY_MS).map(|k| k.2);
    let (mut from, mut to) = (i64::MAX, i64::MIN);
    for d in days {
        from = from.min(d);
        to = to.max(d + DAY_MS);
    }
    if from > to { (0, 0) } else { (from, to) }
}

/// Polls the fleet's 1d counts per metric until each lies in the expected
/// range. Returns whether it did, and the last totals seen.
async fn catch_up(
    api: &Api,
    fleet: &str,
    totals: &[(String, Totals)],
    from: i64,
    to: i64,
    deadline: Instant,
) -> anyhow::Result<(bool, String)> {
    loop {
        let mut all = true;
        let mut over = false;
        let mut detail = Vec::new();
        for (metric, t) in totals {
            let got: u64 = api
                .windows(Scope::Fleet(fleet), metric, DAY_MS, from, to)
                .await?
                .iter()
                .map(|w| w.count)
                .sum();
            let hi = t.certain + t.maybe;
            all &= (t.certain..=hi).contains(&got);
            over |= got > hi;
            detail.push(format!("{metric} {got} of {}", t.certain));
        }
        let detail = detail.join(", ");
        // More than expected will not shrink by waiting: go and find where.
        if all || over || Instant::now() + POLL_EVERY >= deadline {
            return Ok((all, detail));
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

async fn check_device(
    api: &Api,
    ledger: &Ledger,
    id: &str,
    occurrences: &[(usize, u32)],
) -> anyhow::Result<Tally> {
    let windows = device_windows(&ledger.runs, occurrences);
    let (from, to) = day_range(&windows);
    let mut tally = Tally::default();
    for (metric, res) in series_of(&windows) {
        let got = api
            .windows(Scope::Device(id), &metric, res, from, to)
            .await?;
        let expected = windows
            .range((metric.clone(), res, i64::MIN)..=(metric.clone(), res, i64::MAX))
            .map(|(k, w)| (k.2, w));
        let name = format!("device {id} {metric} {}", res_name(res));
        compare_series(&name, res, expected, &got, &mut tally);
    }
    Ok(tally)
}

async fn check_fleet(
    api: &Api,
    fleet: &str,
    windows: &Windows,
    from: i64,
    to: i64,
) -> anyhow::Result<Tally> {
    let mut tally = Tally::default();
    for (metric, res) in series_of(windows) {
        let got = api
            .windows(Scope::Fleet(fleet), &metric, res, from, to)
            .await?;
        let expected = windows
            .range((metric.clone(), res, i64::MIN)..=(metric.clone(), res, i64::MAX))
            .map(|(k, w)| (k.2, w));
        let name = format!("fleet {fleet} {metric} {}", res_name(res));
        compare_series(&name, res, expected, &got, &mut tally);
    }
    Ok(tally)
}

/// The distinct (metric, resolution) series among `windows`' keys.
fn series_of(windows: &Windows) -> Vec<(String, i64)> {
    let mut out: Vec<(String, i64)> = Vec::new();
    for (metric, res, _) in windows.keys() {
        if out.last().is_none_or(|(m, r)| m != metric || r != res) {
            out.push((metric.clone(), *res));
        }
    }
    out
}
