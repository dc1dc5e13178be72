//! The deterministic schedule of one run: which device sends what, when.
//!
//! Everything here is a pure function of a [`RunPlan`] (and a device's first
//! seq and message count), so that the publisher and verify, possibly in a
//! later process reading the ledger, see the very same messages.
//!
//! Device `i`'s `k`-th message is due at `run_start + phase_i + k * period`,
//! where `phase_i = i * period / devices` spreads the fleet evenly over one
//! period. A message carries `K` readings; reading `j` is taken at
//! `due - (K - 1 - j) * period / K`, so a message goes out when its last
//! reading is taken, the way a batching device behaves. Reading `j` of message
//! `k` has `seq = first_seq + k * K + j`.

use std::collections::VecDeque;

use rand::RngCore;
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::lateness::{Class, classify};
use crate::signal::{MetricSpec, mix, unit};

pub const MINUTE_MS: i64 = 60_000;
pub const HOUR_MS: i64 = 3_600_000;
pub const DAY_MS: i64 = 86_400_000;

/// The resolutions the pipeline keeps; the first is the finest, whose window
/// decides `too_late`.
pub const RESOLUTIONS_MS: [i64; 3] = [MINUTE_MS, HOUR_MS, DAY_MS];

/// How close (beyond the clock-skew margin) a fault reading may come to its
/// `too_late` boundary. Covers the publisher running a little behind its
/// schedule and the time to the PUBACK, which are unknown when faults are
/// drawn.
pub const FAULT_GUARD_MS: i64 = 2_000;

/// Fault knobs, each a probability per message. All draws come from the
/// run's seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct FaultConfig {
    /// Publish the message a second time right after it.
    pub duplicate_rate: f64,
    /// Hold the message back and send it after the next one.
    pub reorder_rate: f64,
    /// Move one of the message's readings `late_by_ms` into the past.
    pub late_rate: f64,
    pub late_by_ms: i64,
    /// Publish a truncated (invalid JSON) message before this one.
    pub malformed_rate: f64,
}

impl FaultConfig {
    pub fn any(&self) -> bool {
        self.duplicate_rate > 0.0
            || self.reorder_rate > 0.0
            || self.late_rate > 0.0
            || self.malformed_rate > 0.0
    }
}

/// The parameters that, with each device's first seq and message count,
/// determine every message of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunPlan {
    pub seed: u64,
    pub fleet: String,
    /// Device ids are `{prefix}{index:05}`.
    pub prefix: String,
    pub devices: u32,
    /// Time between two messages of one device, in microseconds (integer so
    /// that the schedule is exact however it is recomputed).
    pub period_us: u64,
    pub readings_per_message: u32,
    pub metrics: Vec<MetricSpec>,
    /// Wall-clock start of the schedule, ms since the epoch.
    pub run_start_ms: i64,
    pub faults: FaultConfig,
    /// Must match the pipeline's; decides `too_late`.
    pub allowed_lateness_ms: i64,
    /// Margin around the publish..PUBACK interval for the pipeline's clock.
    pub clock_skew_ms: i64,
}

/// One reading as planned (its values come from [`crate::signal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedReading {
    pub seq: u64,
    pub ts: i64,
}

/// One telemetry message of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Position in the device's schedule (0-based within the run).
    pub k: u64,
    /// When the message is due to be published, ms: the nominal arrival that
    /// lateness is planned against.
    pub due_ms: i64,
    pub readings: Vec<PlannedReading>,
    /// Index of the reading moved into the past by the late fault.
    pub late_reading: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendKind {
    Telemetry(Message),
    /// A second copy of a message already sent; it must have no effect.
    Duplicate(Message),
    /// Invalid JSON, expected to be rejected as `malformed_json`. `k` is the
    /// message it precedes, which makes its bytes deterministic.
    Malformed {
        k: u64,
        first_seq: u64,
    },
}

/// One publish of a device, in schedule order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Send {
    pub due_us: i64,
    pub kind: SendKind,
}

impl RunPlan {
    pub fn device_id(&self, index: u32) -> String {
        format!("{}{index:05}", self.prefix)
    }

    pub fn topic(&self, index: u32) -> String {
        format!("dt/{}/{}/telemetry", self.fleet, self.device_id(index))
    }

    fn phase_us(&self, index: u32) -> u64 {
        // u128: period (up to ~1e12 µs) times device count must not overflow.
        (u128::from(index) * u128::from(self.period_us) / u128::from(self.devices.max(1))) as u64
    }

    /// When device `index`'s `k`-th message is due, µs since the epoch.
    pub fn due_us(&self, index: u32, k: u64) -> i64 {
        self.run_start_ms * 1000 + (self.phase_us(index) + k * self.period_us) as i64
    }

    /// How many messages device `index` sends in `duration_us`: those due
    /// before the end.
    pub fn messages_within(&self, index: u32, duration_us: u64) -> u64 {
        let phase = self.phase_us(index);
        if duration_us <= phase {
            return 0;
        }
        (duration_us - phase).div_ceil(self.period_us)
    }

    /// Message `k`'s readings, without faults, due at `due_us`.
    fn readings(&self, first_seq: u64, k: u64, due_us: i64) -> Vec<PlannedReading> {
        let kk = u64::from(self.readings_per_message.max(1));
        (0..kk)
            .map(|j| {
                let back = ((kk - 1 - j) * self.period_us / kk) as i64;
                PlannedReading {
                    seq: first_seq + k * kk + j,
                    ts: (due_us - back).div_euclid(1000),
                }
            })
            .collect()
    }

    /// Every publish of device `index` in this run, in order. Lazy, so that
    /// a long run costs memory for one message at a time.
    pub fn sends(&self, index: u32, first_seq: u64, messages: u64) -> Sends<'_> {
        Sends {
            plan: self,
            index,
            first_seq,
            messages,
            next_k: 0,
            queue: VecDeque::new(),
            rng: ChaCha8Rng::seed_from_u64(mix(mix(self.seed, u64::from(index)), 0xfa17)),
        }
    }

    /// The run's telemetry messages for a device (its duplicates and malformed
    /// sends left out), in send order.
    pub fn messages(
        &self,
        index: u32,
        first_seq: u64,
        messages: u64,
    ) -> impl Iterator<Item = Message> + '_ {
        self.sends(index, first_seq, messages)
            .filter_map(|s| match s.kind {
                SendKind::Telemetry(m) => Some(m),
                _ => None,
            })
    }
}

/// The fault draws of one message.
#[derive(Debug, Clone, Copy)]
struct Draws {
    duplicate: bool,
    reorder: bool,
    late: bool,
    malformed: bool,
    /// Picks which reading of the message the late fault moves.
    pick: f64,
}

/// Iterator over a device's sends; see [`RunPlan::sends`].
#[derive(Debug)]
pub struct Sends<'a> {
    plan: &'a RunPlan,
    index: u32,
    first_seq: u64,
    messages: u64,
    next_k: u64,
    queue: VecDeque<Send>,
    /// Fault draws: one block of the stream per message, addressed by `k`.
    rng: ChaCha8Rng,
}

impl Sends<'_> {
    fn draws(&mut self, k: u64) -> Draws {
        let f = &self.plan.faults;
        self.rng.set_word_pos(u128::from(k) * 16);
        let mut u = || unit(self.rng.next_u64());
        Draws {
            duplicate: u() < f.duplicate_rate,
            reorder: u() < f.reorder_rate,
            late: u() < f.late_rate,
            malformed: u() < f.malformed_rate,
            pick: u(),
        }
    }

    /// Queues message `k`, published at `due_us` (later than its readings'
    /// schedule when it is held back), with its faults.
    fn push_message(&mut self, k: u64, due_us: i64, d: Draws) {
        let plan = self.plan;
        let mut readings = plan.readings(self.first_seq, k, plan.due_us(self.index, k));
        let due_ms = due_us.div_euclid(1000);
        let mut late_reading = None;
        if d.late && plan.faults.late_by_ms > 0 {
            let j = ((d.pick * readings.len() as f64) as usize).min(readings.len() - 1);
            let ts = readings[j].ts - plan.faults.late_by_ms;
            // Only where the outcome is certain: a reading whose too_late
            // boundary lies near its arrival could go either way, and would
            // change count, sum, min and max. Such draws are dropped.
            let boundary =
                ts.div_euclid(MINUTE_MS) * MINUTE_MS + MINUTE_MS + plan.allowed_lateness_ms;
            let margin = plan.clock_skew_ms + FAULT_GUARD_MS;
            if ts >= 0 && classify(boundary, due_ms - margin, due_ms + margin) != Class::Maybe {
                readings[j].ts = ts;
                late_reading = Some(j);
            }
        }
        let msg = Message {
            k,
            due_ms,
            readings,
            late_reading,
        };
        if d.malformed {
            self.queue.push_back(Send {
                due_us,
                kind: SendKind::Malformed {
                    k,
                    first_seq: self.first_seq,
                },
            });
        }
        // A duplicate of a message holding a rejected reading would be
        // rejected again and muddle the too_late count; only clean messages
        // are duplicated.
        let duplicate = d.duplicate && msg.late_reading.is_none();
        self.queue.push_back(Send {
            due_us,
            kind: SendKind::Telemetry(msg.clone()),
        });
        if duplicate {
            self.queue.push_back(Send {
                due_us,
                kind: SendKind::Duplicate(msg),
            });
        }
    }
}

impl Iterator for Sends<'_> {
    type Item = Send;

    fn next(&mut self) -> Option<Send> {
        while self.queue.is_empty() && self.next_k < self.messages {
            let k = self.next_k;
            let d = self.draws(k);
            let due = self.plan.due_us(self.index, k);
            if d.reorder && k + 1 < self.messages {
                // Held back: k goes out right after k + 1, at k + 1's time.
                let next_due = self.plan.due_us(self.index, k + 1);
                let mut d_next = self.draws(k + 1);
                d_next.reorder = false;
                self.push_message(k + 1, next_due, d_next);
                self.push_message(k, next_due, d);
                self.next_k += 2;
            } else {
                self.push_message(k, due, d);
                self.next_k += 1;
            }
        }
        self.queue.pop_front()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::signal::Signal;

    pub(crate) fn plan() -> RunPlan {
        RunPlan {
            seed: 1,
            fleet: "f".into(),
            prefix: "f-d".into(),
            devices: 4,
            period_us: 200_000,
            readings_per_message: 1,
            metrics: vec![
                MetricSpec {
                    name: "temperature".into(),
                    signal: Signal::Sine,
                },
                MetricSpec {
                    name: "humidity".into(),
                    signal: Signal::RandomWalk,
                },
            ],
            run_start_ms: 1_764_240_000_000,
            faults: FaultConfig::default(),
            allowed_lateness_ms: HOUR_MS,
            clock_skew_ms: 250,
        }
    }

    #[test]
    fn devices_are_spread_over_the_period() {
        let p = plan();
        assert_eq!(p.device_id(3), "f-d00003");
        assert_eq!(p.topic(3), "dt/f/f-d00003/telemetry");
        let starts: Vec<i64> = (0..4)
            .map(|i| p.due_us(i, 0) - p.run_start_ms * 1000)
            .collect();
        assert_eq!(starts, [0, 50_000, 100_000, 150_000]);
        assert_eq!(p.due_us(1, 10) - p.due_us(1, 9), 200_000);
        // 1 s holds 5 slots for every device.
        assert!((0..4).all(|i| p.messages_within(i, 1_000_000) == 5));
        assert_eq!(p.messages_within(3, 150_000), 0);
        assert_eq!(p.messages_within(3, 150_001), 1);
    }

    #[test]
    fn batches_spread_readings_within_the_period() {
        let mut p = plan();
        p.readings_per_message = 4;
        let m: Vec<Message> = p.messages(0, 100, 2).collect();
        let ts: Vec<i64> = m[1]
            .readings
            .iter()
            .map(|r| r.ts - p.run_start_ms)
            .collect();
        assert_eq!(ts, [50, 100, 150, 200]);
        let seqs: Vec<u64> = m
            .iter()
            .flat_map(|m| m.readings.iter().map(|r| r.seq))
            .collect();
        assert_eq!(seqs, (100..108).collect::<Vec<_>>());
        assert_eq!(m[1].due_ms, p.run_start_ms + 200);
    }

    #[test]
    fn faults_are_seeded_and_keep_every_message() {
        let mut p = plan();
        p.faults = FaultConfig {
            duplicate_rate: 0.2,
            reorder_rate: 0.2,
            late_rate: 0.2,
            late_by_ms: 5 * MINUTE_MS,
            malformed_rate: 0.1,
        };
        let a: Vec<Send> = p.sends(2, 0, 500).collect();
        let b: Vec<Send> = p.sends(2, 0, 500).collect();
        assert_eq!(a, b);
        let mut ks: Vec<u64> = p.messages(2, 0, 500).map(|m| m.k).collect();
        let in_order = ks.windows(2).all(|w| w[0] < w[1]);
        assert!(!in_order, "some messages are reordered");
        ks.sort_unstable();
        assert_eq!(ks, (0..500).collect::<Vec<_>>());
        for m in p.messages(2, 0, 500) {
            let scheduled = p.due_us(2, m.k).div_euclid(1000);
            let held_back = m.due_ms != scheduled;
            assert!(!held_back || m.due_ms == p.due_us(2, m.k + 1).div_euclid(1000));
            if m.late_reading.is_none() {
                assert_eq!(m.readings[0].ts, scheduled);
            }
        }
        let count = |f: fn(&SendKind) -> bool| a.iter().filter(|s| f(&s.kind)).count();
        let dups = count(|k| matches!(k, SendKind::Duplicate(_)));
        let bad = count(|k| matches!(k, SendKind::Malformed { .. }));
        let late = p
            .messages(2, 0, 500)
            .filter(|m| m.late_reading.is_some())
            .count();
        assert!((60..140).contains(&dups), "{dups}");
        assert!((25..80).contains(&bad), "{bad}");
        assert!((60..140).contains(&late), "{late}");
        for s in &a {
            if let SendKind::Telemetry(m) = &s.kind {
                assert_eq!(m.due_ms, s.due_us.div_euclid(1000));
                if let Some(j) = m.late_reading {
                    assert!(m.due_ms - m.readings[j].ts >= 5 * MINUTE_MS);
                }
            }
        }
    }
}
