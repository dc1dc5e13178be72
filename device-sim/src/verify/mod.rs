//! Verify: after publishing, compare every device and fleet window the API
//! reports with what the ledger's runs should have produced.
//!
//! - [`api`]: the query API client (pagination, bounded concurrency).
//! - [`compare`]: the field-by-field comparison, pure.
//! - [`stats`]: what a run should change in `/v1/stats`, and the check.
//! - [`alerts`]: the pipeline's alerts against the windows found exact.
//!
//! Order of work: (1) regenerate every device once to build the fleet's
//! expected windows, keeping only those; (2) poll the fleet's 1d counts until
//! they reach the expected totals (the pipeline has caught up) or the
//! timeout passes; (3) regenerate each device again, fetch its series and
//! compare, a bounded number of devices at a time; then the fleet's series;
//! (4) while time remains, re-check the series that failed, since a pipeline
//! may update device and fleet series at different moments.

pub mod alerts;
pub mod api;
pub mod compare;
pub mod stats;

use std::collections::{BTreeMap, BTreeSet};
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
use compare::{Finality, Mismatch, Tally, compare_series, too_uncertain};
use stats::check_stats;
pub use stats::{StatCheck, StatsExpectation};

/// How often verify asks whether the pipeline has caught up.
const POLL_EVERY: Duration = Duration::from_millis(200);
/// Devices whose failures verify re-checks; more than this is no lag.
const MAX_RECHECK: usize = 1000;

#[derive(Debug, Clone)]
pub struct VerifyConfig {
    pub url: String,
    /// The API's bearer token, if it requires one.
    pub token: Option<String>,
    pub timeout: Duration,
    pub concurrency: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VerifyReport {
    pub ok: bool,
    pub devices: u64,
    pub series: u64,
    /// Windows compared exactly.
    pub windows: u64,
    /// Windows compared on bounds alone, because a reading in them may or
    /// may not have been accepted.
    pub uncertain_windows: u64,
    /// More than [`compare::MAX_UNCERTAIN_SHARE`] of the compared windows
    /// were uncertain: the run fails, exact verification fell short.
    pub too_uncertain: bool,
    pub mismatch_count: u64,
    pub mismatches: Vec<Mismatch>,
    /// The fleet's totals reached the expected ones before the timeout.
    pub caught_up: bool,
    /// The store holds readings of the fleet that its runs did not send:
    /// its totals exceeded theirs, or some window holds a reading before,
    /// after or beyond the expected ones.
    pub more_than_expected: bool,
    /// Windows holding readings the runs did not send.
    pub unknown_windows: u64,
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
        self.too_uncertain |= o.too_uncertain;
        self.mismatch_count += o.mismatch_count;
        for m in o.mismatches {
            if self.mismatches.len() < compare::KEPT_MISMATCHES {
                self.mismatches.push(m);
            }
        }
        if !o.caught_up && (self.caught_up || o.more_than_expected) {
            self.catch_up_detail = o.catch_up_detail;
        }
        self.caught_up &= o.caught_up;
        self.more_than_expected |= o.more_than_expected;
        self.unknown_windows += o.unknown_windows;
        self.catch_up_ms = self.catch_up_ms.max(o.catch_up_ms);
        self.verify_ms += o.verify_ms;
        self.stats.extend(o.stats);
    }
}

impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.ok {
            writeln!(f, "verify: OK")?;
        } else if self.mismatch_count > 0 {
            writeln!(f, "verify: FAILED ({} mismatches)", self.mismatch_count)?;
        } else {
            writeln!(f, "verify: FAILED")?;
        }
        let compared = self.windows + self.uncertain_windows;
        writeln!(
            f,
            "verify: compared {compared} windows in {} series of {} devices and their fleet in {:.1} s; {} uncertain ({:.2} %, at most {} % allowed) held to the bounds their uncertain readings allow",
            self.series,
            self.devices,
            self.verify_ms as f64 / 1000.0,
            self.uncertain_windows,
            100.0 * self.uncertain_windows as f64 / compared.max(1) as f64,
            100.0 * compare::MAX_UNCERTAIN_SHARE,
        )?;
        if self.too_uncertain {
            writeln!(
                f,
                "verify: too many uncertain windows: more than {} % of the windows hold a reading whose acceptance is unknown (unacknowledged, or too close to the too_late boundary), so the run cannot be verified exactly",
                100.0 * compare::MAX_UNCERTAIN_SHARE
            )?;
        }
        if self.more_than_expected {
            writeln!(
                f,
                "verify: the API holds more readings than were sent ({}; {} windows hold readings the run did not send): the store already held readings of this fleet (an earlier run, another publisher), or the pipeline counted some twice. Run again with a new --fleet (the default picks a fresh one), or with --ledger FILE on every run so that verify expects all of them",
                self.catch_up_detail, self.unknown_windows
            )?;
        } else if !self.caught_up {
            writeln!(
                f,
                "verify: the API had not caught up when {} ms had passed, fewer readings than were sent ({}): the pipeline is behind; a longer --verify-timeout waits for it",
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
        tokio::task::spawn_blocking(move || expect_fleet(&ledger, &devices))
            .await
            .context("regenerating the fleet's windows")?
    };
    let checker = Checker {
        api: Api::new(&cfg.url, cfg.concurrency)?.with_token(cfg.token.clone()),
        finality: FinalityBase::of(&ledger, &devices),
        ledger,
        devices,
        fleet: fleet.to_string(),
        range: day_range(&fleet_windows),
    };

    let reached = checker.catch_up(&totals, deadline).await?;
    let catch_up_ms = started.elapsed().as_millis() as u64;
    let (result, first) = checker
        .compare_all(&fleet_windows, cfg.concurrency, deadline)
        .await?;
    let stat_checks = match stats {
        Some((before, expect)) => check_stats(&checker.api, &before, &expect).await?,
        None => Vec::new(),
    };

    // Devices that published yet expect no window at all mean the
    // expectation itself went wrong; that must never read as a pass.
    let compared_something = first.windows + first.uncertain > 0 || checker.devices.is_empty();
    let too_uncertain = too_uncertain(first.windows, first.uncertain);
    Ok(VerifyReport {
        ok: result.ok()
            && stat_checks.iter().all(StatCheck::ok)
            && compared_something
            && !too_uncertain,
        devices: checker.devices.len() as u64,
        series: first.series,
        windows: first.windows,
        uncertain_windows: first.uncertain,
        too_uncertain,
        mismatch_count: result.mismatch_count,
        mismatches: result.mismatches,
        caught_up: reached.caught_up,
        more_than_expected: reached.over || result.unknown > 0,
        unknown_windows: result.unknown,
        catch_up_ms,
        catch_up_detail: reached.detail,
        stats: stat_checks,
        verify_ms: started.elapsed().as_millis() as u64,
    })
}

/// Verifies a run whose template makes every payload one the pipeline must
/// refuse with `reason`: nothing accepted, and each telemetry message (and
/// duplicate) counted under `reason` once, or twice when retransmitted.
pub async fn verify_refused(
    url: &str,
    before: &Stats,
    reason: &str,
    outcomes: &[(
        crate::publish::PublishOutcome,
        Arc<crate::publish::FleetShared>,
    )],
    devices: u32,
    timeout: Duration,
) -> anyhow::Result<VerifyReport> {
    let started = Instant::now();
    let mut c = crate::publish::device::DeviceCounters::default();
    for (o, _) in outcomes {
        c.add(&o.sum.counters);
    }
    let messages = c.issued - c.malformed_issued;
    let lo = messages.saturating_sub(c.failed);
    let hi = messages + c.retransmissions;
    let api = Api::new(url, 1)?;
    // Refusals may be counted a little after their PUBACKs: poll until the
    // counters are as expected or the timeout passes.
    let deadline = started + timeout;
    let stats = loop {
        let after = api.stats().await?;
        let delta = |f: &dyn Fn(&Stats) -> u64| f(&after) as i64 - f(before) as i64;
        let stats = vec![
            StatCheck {
                counter: "accepted_readings".into(),
                expected_lo: 0,
                expected_hi: 0,
                got: delta(&|s| s.accepted_readings),
            },
            StatCheck {
                counter: format!("rejected.{reason}"),
                expected_lo: lo,
                expected_hi: hi,
                got: delta(&|s| s.rejected(reason)),
            },
        ];
        if stats.iter().all(StatCheck::ok) || Instant::now() >= deadline {
            break stats;
        }
        tokio::time::sleep(POLL_EVERY).await;
    };
    Ok(VerifyReport {
        ok: stats.iter().all(StatCheck::ok),
        devices: u64::from(devices),
        series: 0,
        windows: 0,
        uncertain_windows: 0,
        too_uncertain: false,
        mismatch_count: 0,
        mismatches: Vec::new(),
        caught_up: true,
        more_than_expected: false,
        unknown_windows: 0,
        catch_up_ms: 0,
        catch_up_detail: format!("every payload refused as {reason}"),
        stats,
        verify_ms: started.elapsed().as_millis() as u64,
    })
}

/// Regenerates every device once and keeps only the fleet's windows, and
/// the readings expected per metric (from the 1d windows).
fn expect_fleet(
    ledger: &Ledger,
    devices: &BTreeMap<String, Vec<(usize, u32)>>,
) -> (Windows, Vec<(String, Totals)>) {
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
            t.certain += w.sure.count;
            t.maybe += w.maybe.count;
        }
    }
    (fleet_windows, totals)
}

/// What the fleet's runs fix about `final` (see [`Finality`]); the moment
/// of reading is added per series.
#[derive(Debug, Clone, Copy)]
struct FinalityBase {
    allowed_lateness_ms: i64,
    skew_ms: i64,
    settled_ms: i64,
}

impl FinalityBase {
    /// From the fleet's latest run: its allowed lateness is the pipeline's,
    /// and its first publish is the latest moment the pipeline has seen.
    fn of(ledger: &Ledger, devices: &BTreeMap<String, Vec<(usize, u32)>>) -> FinalityBase {
        let latest = devices.values().flatten().map(|o| o.0).max();
        match latest.and_then(|r| ledger.runs.get(r)) {
            Some(run) => {
                let plan = &run.start.plan;
                let skew_ms = plan.clock_skew_ms + plan.arrival_slack_ms;
                FinalityBase {
                    allowed_lateness_ms: plan.allowed_lateness_ms,
                    skew_ms,
                    // The run's readings were applied, so the watermark has
                    // passed their arrival less the pipeline's slack.
                    settled_ms: plan.run_start_ms - skew_ms - plan.watermark_slack_ms,
                }
            }
            None => FinalityBase {
                allowed_lateness_ms: 0,
                skew_ms: 0,
                settled_ms: i64::MIN,
            },
        }
    }

    /// For a series whose response has just arrived.
    fn read_now(&self) -> Finality {
        Finality {
            allowed_lateness_ms: self.allowed_lateness_ms,
            read_by_ms: crate::now_ms() + self.skew_ms,
            settled_ms: self.settled_ms,
        }
    }
}

/// How the catch-up poll ended.
struct Reached {
    caught_up: bool,
    /// Some metric's total exceeded every reading the runs sent.
    over: bool,
    /// The totals the API reported against the expected ones.
    detail: String,
}

/// One fleet's verification: what it reads and what it compares against.
struct Checker {
    api: Api,
    ledger: Arc<Ledger>,
    devices: Arc<BTreeMap<String, Vec<(usize, u32)>>>,
    fleet: String,
    finality: FinalityBase,
    /// `[from, to)` covering every day the fleet's windows touch.
    range: (i64, i64),
}

impl Checker {
    /// Polls the fleet's 1d counts per metric until each lies in the
    /// expected range, one exceeds it (waiting will not shrink it), or the
    /// deadline passes.
    async fn catch_up(
        &self,
        totals: &[(String, Totals)],
        deadline: Instant,
    ) -> anyhow::Result<Reached> {
        let (from, to) = self.range;
        loop {
            let (mut all, mut over) = (true, false);
            let mut detail = Vec::new();
            for (metric, t) in totals {
                let got: u64 = self
                    .api
                    .windows(Scope::Fleet(&self.fleet), metric, DAY_MS, from, to)
                    .await?
                    .iter()
                    .map(|w| w.count)
                    .sum();
                let hi = t.certain + t.maybe;
                all &= (t.certain..=hi).contains(&got);
                over |= got > hi;
                let want = if t.maybe > 0 {
                    format!("{}..={}", t.certain, hi)
                } else {
                    t.certain.to_string()
                };
                detail.push(format!("{metric} {got} of {want}"));
            }
            let detail = format!("fleet {}: {}", self.fleet, detail.join(", "));
            if all || over || Instant::now() + POLL_EVERY >= deadline {
                return Ok(Reached {
                    caught_up: all,
                    over,
                    detail,
                });
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// Compares every device and then the fleet; re-checks what failed while
    /// time remains, since the first pass may have raced the pipeline's last
    /// updates. Returns the final mismatches and the first pass's counts.
    async fn compare_all(
        &self,
        fleet_windows: &Windows,
        concurrency: usize,
        deadline: Instant,
    ) -> anyhow::Result<(Tally, Tally)> {
        let mut device_tally = Tally::default();
        let mut failing = BTreeSet::new();
        let mut checks = futures::stream::iter(self.devices.keys())
            .map(|id| async move { (id, self.check_device(id).await) })
            .buffer_unordered(concurrency.max(1));
        while let Some((id, t)) = checks.next().await {
            let t = t?;
            if !t.ok() {
                failing.insert(id.clone());
            }
            device_tally.add(t);
        }
        drop(checks);
        let mut fleet_tally = self.check_fleet(fleet_windows).await?;
        let mut first = Tally {
            mismatches: Vec::new(),
            ..device_tally.clone()
        };
        first.add(Tally {
            mismatches: Vec::new(),
            ..fleet_tally.clone()
        });

        while (!failing.is_empty() || !fleet_tally.ok())
            && failing.len() <= MAX_RECHECK
            && Instant::now() + POLL_EVERY < deadline
        {
            tokio::time::sleep(POLL_EVERY).await;
            let mut again = Tally::default();
            let mut still = BTreeSet::new();
            for id in &failing {
                let t = self.check_device(id).await?;
                if !t.ok() {
                    still.insert(id.clone());
                }
                again.add(t);
            }
            if !fleet_tally.ok() {
                fleet_tally = self.check_fleet(fleet_windows).await?;
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
        Ok((result, first))
    }

    async fn check_device(&self, id: &str) -> anyhow::Result<Tally> {
        let windows = device_windows(&self.ledger.runs, &self.devices[id]);
        let name = format!("device {id}");
        self.check_series(Scope::Device(id), &name, &windows, day_range(&windows))
            .await
    }

    async fn check_fleet(&self, windows: &Windows) -> anyhow::Result<Tally> {
        let name = format!("fleet {}", self.fleet);
        self.check_series(Scope::Fleet(&self.fleet), &name, windows, self.range)
            .await
    }

    /// Reads and compares every (metric, resolution) series of `windows`.
    async fn check_series(
        &self,
        scope: Scope<'_>,
        name: &str,
        windows: &Windows,
        (from, to): (i64, i64),
    ) -> anyhow::Result<Tally> {
        let mut tally = Tally::default();
        for (metric, res) in series_of(windows) {
            let got = self.api.windows(scope, &metric, res, from, to).await?;
            let fin = self.finality.read_now();
            let expected = windows
                .range((metric.clone(), res, i64::MIN)..=(metric.clone(), res, i64::MAX))
                .map(|(k, w)| (k.2, w));
            let series = format!("{name} {metric} {}", res_name(res));
            compare_series(&series, res, expected, &got, &fin, &mut tally);
        }
        Ok(tally)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> VerifyReport {
        VerifyReport {
            ok: false,
            devices: 1000,
            series: 6006,
            windows: 8000,
            uncertain_windows: 0,
            too_uncertain: false,
            mismatch_count: 3,
            mismatches: Vec::new(),
            caught_up: true,
            more_than_expected: false,
            unknown_windows: 0,
            catch_up_ms: 32,
            catch_up_detail: "fleet sim: humidity 120000 of 60000".into(),
            stats: Vec::new(),
            verify_ms: 1500,
        }
    }

    #[test]
    fn a_store_holding_more_than_was_sent_is_told_apart_from_a_pipeline_behind() {
        let over = VerifyReport {
            caught_up: false,
            more_than_expected: true,
            ..report()
        };
        let text = over.to_string();
        assert!(
            text.contains("holds more readings than were sent"),
            "{text}"
        );
        assert!(
            text.contains("--fleet") && text.contains("--ledger"),
            "{text}"
        );
        assert!(!text.contains("not caught up"), "{text}");
        let behind = VerifyReport {
            caught_up: false,
            catch_up_detail: "fleet sim: humidity 50000 of 60000".into(),
            ..report()
        };
        let text = behind.to_string();
        assert!(text.contains("had not caught up"), "{text}");
        assert!(!text.contains("more readings"), "{text}");
        let mut merged = report();
        merged.merge(over);
        assert!(merged.more_than_expected && !merged.caught_up);
        assert!(merged.to_string().contains("more readings"));
    }

    #[test]
    fn too_many_uncertain_windows_fail_with_a_reason() {
        let r = VerifyReport {
            mismatch_count: 0,
            uncertain_windows: 200,
            too_uncertain: true,
            ..report()
        };
        let text = r.to_string();
        assert!(text.starts_with("verify: FAILED\n"), "{text}");
        assert!(
            text.contains("200 uncertain (2.44 %, at most 1 % allowed)"),
            "{text}"
        );
        assert!(text.contains("too many uncertain windows"), "{text}");
    }
}
