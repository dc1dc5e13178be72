//! Liveness: some devices stop publishing mid-run, some leave with their Last
//! Will, and a check that the API's `status` names exactly those devices.
//!
//! At the stop time (halfway through the run unless told), two shares of the
//! fleet leave, exactly `round(fraction × devices)` of each, ranked by a
//! seeded hash so that the same seed picks the same devices (and verify, from
//! the ledger, picks them again):
//!
//! - a *stopping* device sends the messages due before the stop time, waits
//!   for their PUBACKs and drops its socket without a DISCONNECT. It left no
//!   will, so the endpoint reports nothing: the device is `stale` once
//!   `stale_after` has passed since its last reading.
//! - a *will* device connected with a Last Will (on
//!   `dt/{fleet}/{device}/status`) and drops its socket the same way: the
//!   endpoint records the will (or, with a broker in front and
//!   `--presence-topic`, the broker publishes it and the bridge reads it), so
//!   the device is `offline`.
//!
//! Every other device publishes to the end of the run, so it must read
//! `online` meanwhile. That is why the check runs while the run goes on,
//! from the stop time until the lists are exact or `within` has passed, and
//! why that deadline must fall before the run's end (at the end every device
//! says DISCONNECT, which is `offline`).
//!
//! The stopping devices' shorter schedules are their message counts in the
//! ledger, so verify expects exactly the readings they sent.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use anyhow::ensure;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::config::parse_duration;
use crate::plan::RunPlan;
use crate::signal::mix;
use crate::verify::api::Api;

/// Distinguishes the liveness ranking from the plan's other seeded draws.
const SALT: u64 = 0x11fe_0001;
/// How often the check reads the device lists.
const POLL_EVERY: Duration = Duration::from_millis(250);
/// Names a report prints per list; the JSON report keeps them all.
const SHOWN: usize = 20;

/// What a run is asked to do about liveness.
#[derive(Debug, Clone, PartialEq)]
pub struct LivenessConfig {
    /// Share of the devices that stop publishing and drop their connection
    /// without a will: expected `stale`.
    pub stop_fraction: f64,
    /// Share of the devices that connect with a Last Will and drop their
    /// connection: expected `offline`.
    pub will_fraction: f64,
    /// When they stop, from the run's start; `None`: halfway through.
    pub stop_at: Option<Duration>,
    /// How long after the stop time the API may take to list them exactly.
    pub within: Duration,
}

/// The liveness flags, flattened into the command line.
#[derive(Debug, Clone, clap::Args)]
pub struct LivenessArgs {
    /// Share of the devices that stop publishing mid-run and drop their
    /// connection without a will; verify expects them `stale`.
    #[arg(long, default_value_t = 0.0)]
    pub stop_fraction: f64,
    /// Share of the devices that connect with a Last Will and drop their
    /// connection mid-run; verify expects them `offline`.
    #[arg(long, default_value_t = 0.0)]
    pub will_fraction: f64,
    /// When those devices stop, from the run's start (default: halfway).
    #[arg(long, value_parser = parse_duration)]
    pub stop_at: Option<Duration>,
    /// With --verify: how long after the stop time `GET /v1/devices?status=`
    /// may take to list exactly those devices (before the run's end).
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub liveness_within: Duration,
}

impl LivenessArgs {
    /// The configuration the flags ask for; `None` when no device leaves.
    pub fn config(&self) -> Option<LivenessConfig> {
        (self.stop_fraction > 0.0 || self.will_fraction > 0.0).then_some(LivenessConfig {
            stop_fraction: self.stop_fraction,
            will_fraction: self.will_fraction,
            stop_at: self.stop_at,
            within: self.liveness_within,
        })
    }
}

impl LivenessConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        for (name, f) in [
            ("--stop-fraction", self.stop_fraction),
            ("--will-fraction", self.will_fraction),
        ] {
            ensure!((0.0..=1.0).contains(&f), "{name} is a share in 0..=1");
        }
        ensure!(
            self.stop_fraction + self.will_fraction <= 1.0,
            "--stop-fraction and --will-fraction together exceed the fleet"
        );
        Ok(())
    }

    /// The plan of a fleet whose schedule lasts `length_us`; with `check`,
    /// the stop time plus `within` must fall inside it, since the devices
    /// that stay must still be publishing when the lists are read.
    pub fn plan(&self, length_us: u64, check: bool) -> anyhow::Result<LivenessPlan> {
        let stop_us = match self.stop_at {
            Some(d) => d.as_micros() as u64,
            None => length_us / 2,
        };
        ensure!(
            stop_us < length_us,
            "the liveness stop time ({} s) must fall within the run ({} s)",
            stop_us as f64 / 1e6,
            length_us as f64 / 1e6
        );
        let end = stop_us + self.within.as_micros() as u64;
        ensure!(
            !check || end <= length_us,
            "the liveness check (stop time {} s + --liveness-within {} s) must end before the run does ({} s): the devices that stay are online only while they publish",
            stop_us as f64 / 1e6,
            self.within.as_secs_f64(),
            length_us as f64 / 1e6
        );
        Ok(LivenessPlan {
            stop_us,
            stop_fraction: self.stop_fraction,
            will_fraction: self.will_fraction,
            within_ms: self.within.as_millis() as u64,
        })
    }
}

/// The liveness part of a fleet's plan, recorded in the ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LivenessPlan {
    /// When the chosen devices stop, µs from the run's start.
    pub stop_us: u64,
    pub stop_fraction: f64,
    pub will_fraction: f64,
    /// The check's deadline after the stop time.
    pub within_ms: u64,
}

/// What a device does about liveness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Publishes to the end of the run.
    Stays,
    /// Stops at the stop time and drops its connection without a will.
    Stops,
    /// Connects with a Last Will, stops at the stop time and drops its
    /// connection.
    Wills,
}

impl Role {
    /// Whether the device leaves at the stop time.
    pub fn leaves(self) -> bool {
        self != Role::Stays
    }
}

impl LivenessPlan {
    /// Every device's role: exactly `round(fraction × devices)` of each
    /// kind, the lowest of a seeded hash first.
    pub fn roles(&self, seed: u64, devices: u32) -> Vec<Role> {
        let n = devices as usize;
        let share = |f: f64| ((f * n as f64).round() as usize).min(n);
        let stops = share(self.stop_fraction);
        let wills = share(self.will_fraction).min(n - stops);
        let mut order: Vec<u32> = (0..devices).collect();
        order.sort_unstable_by_key(|&i| (mix(mix(seed, u64::from(i)), SALT), i));
        let mut roles = vec![Role::Stays; n];
        for (rank, &i) in order.iter().take(stops + wills).enumerate() {
            roles[i as usize] = if rank < stops {
                Role::Stops
            } else {
                Role::Wills
            };
        }
        roles
    }
}

impl RunPlan {
    /// Every device's liveness role; empty when the plan has none (every
    /// device stays).
    pub fn liveness_roles(&self) -> Vec<Role> {
        self.liveness
            .as_ref()
            .map_or_else(Vec::new, |l| l.roles(self.seed, self.devices))
    }

    /// When a device of `role` leaves, µs since the epoch; `None`: it stays.
    pub fn leaves_at_us(&self, role: Role) -> Option<i64> {
        let l = self.liveness.as_ref()?;
        role.leaves()
            .then(|| self.run_start_ms * 1000 + l.stop_us as i64)
    }

    /// Device `index`'s status topic: where its Last Will goes, and where it
    /// says `online` and `offline` with `presence_topic`.
    pub fn status_topic(&self, index: u32) -> String {
        format!("dt/{}/{}/status", self.fleet, self.device_id(index))
    }
}

/// The devices of a fleet by the status the API should give them once the
/// chosen ones have left.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Expected {
    pub stale: BTreeSet<String>,
    pub offline: BTreeSet<String>,
    pub online: BTreeSet<String>,
}

impl Expected {
    pub fn of(plan: &RunPlan) -> Expected {
        let mut e = Expected::default();
        for (i, role) in plan.liveness_roles().into_iter().enumerate() {
            let id = plan.device_id(i as u32);
            match role {
                Role::Stays => e.online.insert(id),
                Role::Stops => e.stale.insert(id),
                Role::Wills => e.offline.insert(id),
            };
        }
        e
    }
}

/// What the API listed: `?status=stale`, `?status=offline`, and every
/// device with its status.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Listing {
    pub stale: BTreeSet<String>,
    pub offline: BTreeSet<String>,
    pub all: BTreeMap<String, String>,
}

/// Where a listing differs from the expected sets.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Differences {
    /// Expected `stale`, not in `?status=stale`.
    pub missing_stale: Vec<String>,
    /// In `?status=stale`, not expected there.
    pub extra_stale: Vec<String>,
    pub missing_offline: Vec<String>,
    pub extra_offline: Vec<String>,
    /// Devices that stay, listed with another status or not at all
    /// (`device=status`).
    pub not_online: Vec<String>,
}

impl Differences {
    /// Misses and extras, each a failure.
    pub fn count(&self) -> u64 {
        [
            &self.missing_stale,
            &self.extra_stale,
            &self.missing_offline,
            &self.extra_offline,
            &self.not_online,
        ]
        .iter()
        .map(|v| v.len() as u64)
        .sum()
    }
}

/// Compares a listing with the expected sets: pure, so that a wrong
/// expectation is seen to fail.
pub fn compare(expected: &Expected, got: &Listing) -> Differences {
    let diff = |a: &BTreeSet<String>, b: &BTreeSet<String>| a.difference(b).cloned().collect();
    Differences {
        missing_stale: diff(&expected.stale, &got.stale),
        extra_stale: diff(&got.stale, &expected.stale),
        missing_offline: diff(&expected.offline, &got.offline),
        extra_offline: diff(&got.offline, &expected.offline),
        not_online: expected
            .online
            .iter()
            .filter_map(|id| match got.all.get(id).map(String::as_str) {
                Some("online") => None,
                Some(other) => Some(format!("{id}={other}")),
                None => Some(format!("{id}=unlisted")),
            })
            .collect(),
    }
}

/// The liveness check of one fleet.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LivenessReport {
    pub fleet: String,
    /// Whether the API was asked (with `--verify`).
    pub checked: bool,
    /// The lists were exact before the deadline (or nothing was checked).
    pub ok: bool,
    /// The devices chosen to stop (expected `stale`).
    pub stopped: Vec<String>,
    /// The devices chosen to leave with a will (expected `offline`).
    pub wills: Vec<String>,
    /// Misses and extras of the last reading.
    pub failures: u64,
    pub differences: Differences,
    /// From the stop time to the exact lists (or the deadline), ms.
    pub after_stop_ms: u64,
    pub within_ms: u64,
    pub polls: u64,
    /// The last error reading the API, if a read failed.
    pub last_error: Option<String>,
}

impl LivenessReport {
    fn unchecked(plan: &RunPlan, expected: &Expected) -> LivenessReport {
        LivenessReport {
            fleet: plan.fleet.clone(),
            checked: false,
            ok: true,
            stopped: expected.stale.iter().cloned().collect(),
            wills: expected.offline.iter().cloned().collect(),
            failures: 0,
            differences: Differences::default(),
            after_stop_ms: 0,
            within_ms: plan.liveness.as_ref().map_or(0, |l| l.within_ms),
            polls: 0,
            last_error: None,
        }
    }
}

/// Reads the three lists of `fleet`.
async fn list(api: &Api, fleet: &str) -> anyhow::Result<Listing> {
    let ids = |v: Vec<(String, String)>| v.into_iter().map(|(id, _)| id).collect();
    Ok(Listing {
        stale: ids(api.devices(fleet, Some("stale")).await?),
        offline: ids(api.devices(fleet, Some("offline")).await?),
        all: api.devices(fleet, None).await?.into_iter().collect(),
    })
}

/// Polls the API from `stop` until its lists are exactly `plan`'s (then
/// passes) or `stop + within` has passed (then fails, naming each miss and
/// extra). Without an API, it reports the chosen devices only.
pub async fn check(api: Option<Api>, plan: RunPlan, stop: Instant) -> LivenessReport {
    let expected = Expected::of(&plan);
    let mut report = LivenessReport::unchecked(&plan, &expected);
    let Some(api) = api else {
        return report;
    };
    report.checked = true;
    tokio::time::sleep_until(stop).await;
    let deadline = stop + Duration::from_millis(report.within_ms);
    loop {
        report.polls += 1;
        let exact = match list(&api, &plan.fleet).await {
            Ok(got) => {
                report.differences = compare(&expected, &got);
                report.failures = report.differences.count();
                report.last_error = None;
                report.failures == 0
            }
            Err(e) => {
                report.last_error = Some(format!("{e:#}"));
                false
            }
        };
        let now = Instant::now();
        report.after_stop_ms = now.saturating_duration_since(stop).as_millis() as u64;
        if exact || now >= deadline {
            report.ok = exact;
            return report;
        }
        tokio::time::sleep_until((now + POLL_EVERY).min(deadline)).await;
    }
}

fn names(f: &mut fmt::Formatter<'_>, what: &str, ids: &[String]) -> fmt::Result {
    if ids.is_empty() {
        return Ok(());
    }
    let shown: Vec<&str> = ids.iter().take(SHOWN).map(String::as_str).collect();
    let more = ids.len().saturating_sub(SHOWN);
    let tail = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    writeln!(f, "  {what} ({}): {}{tail}", ids.len(), shown.join(", "))
}

impl fmt::Display for LivenessReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = match (self.checked, self.ok) {
            (false, _) => "not checked (no --verify)".to_string(),
            (true, true) => format!(
                "OK, the lists were exact {:.1} s after the stop ({} polls)",
                self.after_stop_ms as f64 / 1000.0,
                self.polls
            ),
            (true, false) => format!(
                "FAILED, {} misses and extras {:.1} s after the stop (allowed {:.1} s)",
                self.failures,
                self.after_stop_ms as f64 / 1000.0,
                self.within_ms as f64 / 1000.0
            ),
        };
        writeln!(
            f,
            "liveness of fleet {}: {} stopped (stale), {} left with a will (offline): {verdict}",
            self.fleet,
            self.stopped.len(),
            self.wills.len()
        )?;
        let d = &self.differences;
        names(f, "expected stale, not listed stale", &d.missing_stale)?;
        names(f, "listed stale, not expected", &d.extra_stale)?;
        names(
            f,
            "expected offline, not listed offline",
            &d.missing_offline,
        )?;
        names(f, "listed offline, not expected", &d.extra_offline)?;
        names(f, "expected online, listed otherwise", &d.not_online)?;
        if let (false, Some(e)) = (self.ok, &self.last_error) {
            writeln!(f, "  last error reading the API: {e}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(devices: u32, stop: f64, will: f64) -> RunPlan {
        let mut p = crate::plan::tests::plan();
        p.devices = devices;
        p.liveness = Some(LivenessPlan {
            stop_us: 10_000_000,
            stop_fraction: stop,
            will_fraction: will,
            within_ms: 8_000,
        });
        p
    }

    #[test]
    fn exactly_the_asked_shares_leave_and_the_seed_picks_them() {
        let p = plan(200, 0.10, 0.05);
        let roles = p.liveness_roles();
        let count = |r: Role| roles.iter().filter(|x| **x == r).count();
        assert_eq!(
            (count(Role::Stops), count(Role::Wills), count(Role::Stays)),
            (20, 10, 170)
        );
        assert_eq!(p.liveness_roles(), roles, "the same seed, the same devices");
        let other = RunPlan {
            seed: 2,
            ..p.clone()
        };
        assert_ne!(other.liveness_roles(), roles, "another seed, other devices");
        // Chosen across the fleet, not its first devices.
        assert!(roles[..30].iter().any(|r| !r.leaves()));
        assert!(roles[100..].iter().any(|r| r.leaves()));
        assert!(
            plan(200, 0.0, 0.0)
                .liveness_roles()
                .iter()
                .all(|r| !r.leaves())
        );
        assert!(crate::plan::tests::plan().liveness_roles().is_empty());
    }

    #[test]
    fn only_leaving_devices_leave_at_the_stop_time() {
        let p = plan(10, 0.5, 0.0);
        let start_us = p.run_start_ms * 1000;
        assert_eq!(p.leaves_at_us(Role::Stops), Some(start_us + 10_000_000));
        assert_eq!(p.leaves_at_us(Role::Wills), Some(start_us + 10_000_000));
        assert_eq!(p.leaves_at_us(Role::Stays), None);
        assert_eq!(p.status_topic(3), "dt/f/f-d00003/status");
    }

    #[test]
    fn the_stop_time_and_the_check_must_fit_in_the_run() {
        let l = LivenessConfig {
            stop_fraction: 0.1,
            will_fraction: 0.05,
            stop_at: None,
            within: Duration::from_secs(8),
        };
        assert_eq!(l.plan(20_000_000, true).unwrap().stop_us, 10_000_000);
        assert!(l.plan(15_000_000, true).is_err(), "10 s + 8 s > 15 s");
        assert!(l.plan(15_000_000, false).is_ok(), "nothing checks");
        let late = LivenessConfig {
            stop_at: Some(Duration::from_secs(30)),
            ..l.clone()
        };
        assert!(late.plan(20_000_000, false).is_err());
        for (stop_fraction, will_fraction) in [(1.5, 0.0), (0.6, 0.6), (-0.1, 0.0)] {
            let bad = LivenessConfig {
                stop_fraction,
                will_fraction,
                ..l.clone()
            };
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        assert!(l.validate().is_ok());
    }

    fn set(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    fn listing(stale: &[&str], offline: &[&str], online: &[&str]) -> Listing {
        let mut all = BTreeMap::new();
        for (ids, status) in [(stale, "stale"), (offline, "offline"), (online, "online")] {
            for id in ids {
                all.insert(id.to_string(), status.to_string());
            }
        }
        Listing {
            stale: set(stale),
            offline: set(offline),
            all,
        }
    }

    #[test]
    fn exact_lists_pass_and_every_miss_and_extra_is_named() {
        let expected = Expected {
            stale: set(&["a", "b"]),
            offline: set(&["c"]),
            online: set(&["d", "e"]),
        };
        let exact = listing(&["a", "b"], &["c"], &["d", "e"]);
        assert_eq!(compare(&expected, &exact), Differences::default());
        assert_eq!(compare(&expected, &exact).count(), 0);

        // The API is right, but the expectation is wrong: b is expected
        // stale and c offline, while the API lists b offline, c stale and e
        // stale too, and has never heard of d.
        let got = listing(&["a", "c", "e"], &["b"], &[]);
        let d = compare(&expected, &got);
        assert_eq!(d.missing_stale, vec!["b".to_string()]);
        assert_eq!(d.extra_stale, vec!["c".to_string(), "e".to_string()]);
        assert_eq!(d.missing_offline, vec!["c".to_string()]);
        assert_eq!(d.extra_offline, vec!["b".to_string()]);
        assert_eq!(
            d.not_online,
            vec!["d=unlisted".to_string(), "e=stale".to_string()]
        );
        assert_eq!(d.count(), 7);
    }

    #[test]
    fn a_wrong_expectation_fails_the_check_and_the_report_names_the_devices() {
        let p = plan(20, 0.10, 0.05);
        let expected = Expected::of(&p);
        assert_eq!((expected.stale.len(), expected.offline.len()), (2, 1));
        // The API lists one device of those that stay as stale, and misses
        // the will.
        let mut got = listing(&[], &[], &[]);
        got.stale = expected.stale.clone();
        let wrong = expected.online.iter().next().unwrap().clone();
        got.stale.insert(wrong.clone());
        for id in &expected.online {
            got.all.insert(id.clone(), "online".into());
        }
        got.all.insert(wrong.clone(), "stale".into());
        let d = compare(&expected, &got);
        assert_eq!(d.extra_stale, vec![wrong.clone()]);
        assert_eq!(d.missing_offline.len(), 1);
        assert_eq!(d.not_online, vec![format!("{wrong}=stale")]);
        let mut report = LivenessReport::unchecked(&p, &expected);
        report.checked = true;
        report.ok = false;
        report.failures = d.count();
        report.differences = d;
        let text = report.to_string();
        assert!(text.contains("FAILED, 3 misses and extras"), "{text}");
        assert!(text.contains(&wrong), "{text}");
    }
}
