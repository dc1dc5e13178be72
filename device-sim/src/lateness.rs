//! Lateness, judged the way the pipeline judges it, with honest uncertainty.
//!
//! The pipeline stamps `received_at` when a message reaches it; a reading is
//! late in every window whose end is `<= received_at`, and rejected
//! `too_late` when its finest window's `end + allowed_lateness <=
//! received_at`. The simulator cannot know `received_at`, only that it lies
//! in `[publish - skew, ack + skew]`. A decision is certain when its boundary
//! lies outside that interval and [`Class::Maybe`] otherwise.
//!
//! Verify regenerates each reading's *nominal* decisions from the schedule
//! (arrival exactly at the message's due time). The publisher records only
//! where the actual interval decides differently ([`Exceptions`]): the rare
//! readings near a boundary, and readings published behind schedule.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::plan::{MINUTE_MS, Message, RESOLUTIONS_MS};

/// Whether `boundary <= received_at` for some `received_at` in `[lo, hi]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    No,
    Yes,
    Maybe,
}

pub fn classify(boundary: i64, lo: i64, hi: i64) -> Class {
    if boundary <= lo {
        Class::Yes
    } else if boundary > hi {
        Class::No
    } else {
        Class::Maybe
    }
}

impl Class {
    /// The least and most this decision can contribute to a count.
    pub fn range(self) -> (i32, i32) {
        match self {
            Class::No => (0, 0),
            Class::Yes => (1, 1),
            Class::Maybe => (0, 1),
        }
    }
}

pub fn window_end(ts: i64, res_ms: i64) -> i64 {
    ts.div_euclid(res_ms) * res_ms + res_ms
}

/// The `too_late` boundary of a reading: its finest window's end plus the
/// allowed lateness.
pub fn too_late_boundary(ts: i64, allowed_lateness_ms: i64) -> i64 {
    window_end(ts, MINUTE_MS) + allowed_lateness_ms
}

/// Where actual arrivals decide differently from the schedule. Keys are
/// device indices of one run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(into = "ExceptionsWire", from = "ExceptionsWire")]
pub struct Exceptions {
    /// `(device, resolution ms, window start) -> (lo, hi)`: add to the
    /// nominal `late_count` to get the range the window may report.
    pub windows: BTreeMap<(u32, i64, i64), (i32, i32)>,
    /// `(device, seq) -> actual too_late decision`, where it differs from
    /// the nominal one.
    pub too_late: BTreeMap<(u32, u64), Class>,
}

impl Exceptions {
    /// Records how message `msg` of `device` fared, given that the pipeline
    /// stamped it somewhere in `[lo, hi]`.
    pub fn record_arrival(&mut self, device: u32, msg: &Message, lo: i64, hi: i64, allowed: i64) {
        let nominal = msg.due_ms;
        for r in &msg.readings {
            let tl = too_late_boundary(r.ts, allowed);
            let actual = classify(tl, lo, hi);
            if actual != classify(tl, nominal, nominal) {
                self.too_late.insert((device, r.seq), actual);
            }
            if actual == Class::Yes {
                continue;
            }
            for res in RESOLUTIONS_MS {
                let end = window_end(r.ts, res);
                let (n, _) = classify(end, nominal, nominal).range();
                let (a_lo, a_hi) = classify(end, lo, hi).range();
                if (a_lo, a_hi) != (n, n) {
                    let e = self.windows.entry((device, res, end - res)).or_default();
                    e.0 += a_lo - n;
                    e.1 += a_hi - n;
                }
            }
        }
    }

    pub fn merge(&mut self, other: Exceptions) {
        for (k, (lo, hi)) in other.windows {
            let e = self.windows.entry(k).or_default();
            e.0 += lo;
            e.1 += hi;
        }
        self.too_late.extend(other.too_late);
    }

    pub fn is_empty(&self) -> bool {
        self.windows.is_empty() && self.too_late.is_empty()
    }
}

/// [`Exceptions`] as the ledger stores it: JSON maps cannot have tuple keys.
#[derive(Serialize, Deserialize)]
struct ExceptionsWire {
    /// `[device, resolution ms, window start, lo, hi]`.
    windows: Vec<(u32, i64, i64, i32, i32)>,
    /// `[device, seq, decision]`.
    too_late: Vec<(u32, u64, Class)>,
}

impl From<Exceptions> for ExceptionsWire {
    fn from(e: Exceptions) -> Self {
        ExceptionsWire {
            windows: e
                .windows
                .into_iter()
                .map(|((d, r, s), (lo, hi))| (d, r, s, lo, hi))
                .collect(),
            too_late: e
                .too_late
                .into_iter()
                .map(|((d, s), c)| (d, s, c))
                .collect(),
        }
    }
}

impl From<ExceptionsWire> for Exceptions {
    fn from(w: ExceptionsWire) -> Self {
        Exceptions {
            windows: w
                .windows
                .into_iter()
                .map(|(d, r, s, lo, hi)| ((d, r, s), (lo, hi)))
                .collect(),
            too_late: w
                .too_late
                .into_iter()
                .map(|(d, s, c)| ((d, s), c))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::PlannedReading;

    fn msg(ts: i64, due_ms: i64) -> Message {
        Message {
            k: 0,
            due_ms,
            readings: vec![PlannedReading { seq: 9, ts }],
            late_reading: None,
        }
    }

    #[test]
    fn classifies_against_an_interval() {
        assert_eq!(classify(100, 100, 200), Class::Yes);
        assert_eq!(classify(150, 100, 200), Class::Maybe);
        assert_eq!(classify(200, 100, 200), Class::Maybe);
        assert_eq!(classify(201, 100, 200), Class::No);
    }

    #[test]
    fn a_reading_just_before_a_minute_boundary_is_maybe_late() {
        // Scheduled at 12:00:59.999, acked 3 ms later: the 1m window may or
        // may not count it late; the 1h and 1d windows certainly do not.
        let t = 1_764_244_859_999;
        let mut ex = Exceptions::default();
        ex.record_arrival(1, &msg(t, t), t - 250, t + 3 + 250, 3_600_000);
        let start = t + 1 - MINUTE_MS;
        assert_eq!(ex.windows.len(), 1);
        assert_eq!(ex.windows[&(1, MINUTE_MS, start)], (0, 1));
        assert!(ex.too_late.is_empty());
    }

    #[test]
    fn on_schedule_away_from_boundaries_records_nothing() {
        let t = 1_764_244_830_000;
        let mut ex = Exceptions::default();
        ex.record_arrival(1, &msg(t, t), t - 250, t + 250, 3_600_000);
        assert!(ex.is_empty());
    }

    #[test]
    fn publishing_far_behind_schedule_is_certain() {
        // Due at :30 but published two minutes later: certainly late in the
        // 1m window, and an hour later, certainly too late.
        let t = 1_764_244_830_000;
        let mut ex = Exceptions::default();
        ex.record_arrival(1, &msg(t, t), t + 120_000, t + 120_100, 3_600_000);
        assert_eq!(ex.windows[&(1, MINUTE_MS, t - 30_000)], (1, 1));
        let mut ex = Exceptions::default();
        ex.record_arrival(1, &msg(t, t), t + 7_200_000, t + 7_200_100, 3_600_000);
        assert_eq!(ex.too_late[&(1, 9)], Class::Yes);
        assert!(ex.windows.is_empty(), "a rejected reading is in no window");
        let text = serde_json::to_string(&ex).unwrap();
        assert_eq!(serde_json::from_str::<Exceptions>(&text).unwrap(), ex);
    }
}
