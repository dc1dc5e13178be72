//! `/v1/stats` over a run: what the run should change in each counter, as
//! ranges (uncertain decisions and retransmissions widen them), and the
//! check of the changes the API reports.

use serde::Serialize;

use super::api::{Api, Stats};
use crate::lateness::{Class, Exceptions, classify, too_late_boundary};
use crate::plan::{RunPlan, SendKind};
use crate::publish::device::DeviceCounters;

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

/// The changes of `/v1/stats` since `before`, against the expected ranges.
pub(super) async fn check_stats(
    api: &Api,
    before: &Stats,
    expect: &StatsExpectation,
) -> anyhow::Result<Vec<StatCheck>> {
    let after = api.stats().await?;
    let delta = |f: &dyn Fn(&Stats) -> u64| f(&after) as i64 - f(before) as i64;
    let check = |counter: &str, (lo, hi): (u64, u64), got: i64| StatCheck {
        counter: counter.into(),
        expected_lo: lo,
        expected_hi: hi,
        got,
    };
    Ok(vec![
        check(
            "accepted_readings",
            expect.accepted_readings,
            delta(&|s| s.accepted_readings),
        ),
        check(
            "duplicate_readings",
            expect.duplicate_readings,
            delta(&|s| s.duplicate_readings),
        ),
        check(
            "rejected.too_late",
            expect.too_late,
            delta(&|s| s.rejected("too_late")),
        ),
        check(
            "rejected.malformed_json",
            expect.malformed_json,
            delta(&|s| s.rejected("malformed_json")),
        ),
    ])
}
