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
use crate::replay::ReplayPlan;
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
    /// How much later than its PUBACK a message may reach the pipeline.
    /// Ledgers written before it existed had none.
    #[serde(default)]
    pub arrival_slack_ms: i64,
    /// How far behind what it has applied the pipeline's processed
    /// watermark stays. Ledgers written before it existed had none.
    #[serde(default)]
    pub watermark_slack_ms: i64,
    /// The schedule's stretches, in order; empty: one steady stretch at
    /// `period_us` without end (a run without a scenario).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub segments: Vec<Segment>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub offline: Vec<OfflineWindow>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub storms: Vec<Storm>,
    /// A recorded file's rows instead of the seed's schedule and values
    /// (see [`crate::replay`]): one reading per message, no stages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay: Option<ReplayPlan>,
    /// The payload's shape (see [`crate::template`]); `None`: payload v1
    /// as [`crate::payload`] writes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<crate::template::Template>,
    /// Devices that stop or leave with a Last Will mid-run (see
    /// [`crate::liveness`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness: Option<crate::liveness::LivenessPlan>,
}

/// A stretch of the schedule with one period per device. Times are µs from
/// the run's start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub start_us: u64,
    pub end_us: u64,
    pub period_us: u64,
    /// Devices start publishing one after another across the segment (a
    /// linear ramp of the fleet's rate), instead of all within one period.
    #[serde(default)]
    pub ramp: bool,
}

/// Some devices go offline for a while and then send their backlog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OfflineWindow {
    /// µs from the run's start.
    pub start_us: u64,
    pub end_us: u64,
    /// Share of the devices that go offline, drawn per device from the seed.
    pub fraction: f64,
    /// Readings per backfill message.
    pub batch: u32,
    /// Distinguishes the draws of several windows.
    pub salt: u64,
}

/// Some devices lose their connections at once and reconnect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Storm {
    /// µs from the run's start.
    pub at_us: u64,
    pub fraction: f64,
    pub salt: u64,
}

/// Whether device `index` takes part in an event drawn with `salt`.
fn chosen(seed: u64, index: u32, salt: u64, fraction: f64) -> bool {
    unit(mix(mix(seed, u64::from(index)), 0x0ff1_13e0 ^ salt)) < fraction
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
        let recorded = self.replay.as_ref().and_then(|r| r.data.as_ref());
        match recorded.and_then(|d| d.devices.get(index as usize)) {
            Some(d) => d.id.clone(),
            None => format!("{}{index:05}", self.prefix),
        }
    }

    pub fn topic(&self, index: u32) -> String {
        format!("dt/{}/{}/telemetry", self.fleet, self.device_id(index))
    }

    fn phase_us(&self, index: u32) -> u64 {
        self.spread(index, self.period_us)
    }

    /// `index`'s share of `span`: devices spread evenly over it.
    fn spread(&self, index: u32, span: u64) -> u64 {
        // u128: a span (up to ~1e12 µs) times the device count must not overflow.
        (u128::from(index) * u128::from(span) / u128::from(self.devices.max(1))) as u64
    }

    /// When device `index` sends its first message in segment `s`, µs after
    /// the segment's start.
    fn segment_phase(&self, s: &Segment, index: u32) -> u64 {
        if s.ramp {
            self.spread(index, s.end_us - s.start_us)
        } else {
            self.spread(index, s.period_us)
        }
    }

    /// Device `index`'s messages in segment `s` due before `until_us` (from
    /// the run's start).
    fn count_in(&self, s: &Segment, index: u32, until_us: u64) -> u64 {
        let end = until_us.min(s.end_us);
        if end <= s.start_us {
            return 0;
        }
        let phase = self.segment_phase(s, index);
        let len = end - s.start_us;
        if len <= phase {
            return 0;
        }
        (len - phase).div_ceil(s.period_us.max(1))
    }

    /// When device `index`'s `k`-th message is due, µs since the epoch.
    pub fn due_us(&self, index: u32, k: u64) -> i64 {
        let base = self.run_start_ms * 1000;
        if let Some(r) = &self.replay {
            return base + r.row(index, k).map_or(0, |row| row.due_us as i64);
        }
        if self.segments.is_empty() {
            return base + (self.phase_us(index) + k * self.period_us) as i64;
        }
        let mut k = k;
        for s in &self.segments {
            let n = self.count_in(s, index, s.end_us);
            if k < n {
                return base + (s.start_us + self.segment_phase(s, index) + k * s.period_us) as i64;
            }
            k -= n;
        }
        // Past the last segment: its rhythm goes on (runs stop before this).
        let last = self.segments.last().map_or(0, |s| s.end_us);
        base + (last + self.phase_us(index) + k * self.period_us) as i64
    }

    /// How many messages device `index` sends in `duration_us`: those due
    /// before the end.
    pub fn messages_within(&self, index: u32, duration_us: u64) -> u64 {
        if let Some(r) = &self.replay {
            return r.rows_within(index, duration_us);
        }
        if self.segments.is_empty() {
            let phase = self.phase_us(index);
            if duration_us <= phase {
                return 0;
            }
            return (duration_us - phase).div_ceil(self.period_us);
        }
        self.segments
            .iter()
            .map(|s| self.count_in(s, index, duration_us))
            .sum()
    }

    /// The schedule's planned length in µs, if it has segments.
    pub fn planned_length_us(&self) -> Option<u64> {
        if let Some(d) = self.replay.as_ref().and_then(|r| r.data.as_ref()) {
            let last = d.devices.iter().filter_map(|d| d.rows.last());
            return Some(last.map(|r| r.due_us).max().unwrap_or(0) + 1);
        }
        self.segments.last().map(|s| s.end_us)
    }

    /// Device `index`'s offline windows: (start, end) µs since the epoch,
    /// and readings per backfill message.
    pub fn offline_windows(&self, index: u32) -> Vec<(i64, i64, u32)> {
        let base = self.run_start_ms * 1000;
        self.offline
            .iter()
            .filter(|w| chosen(self.seed, index, w.salt, w.fraction))
            .map(|w| {
                (
                    base + w.start_us as i64,
                    base + w.end_us as i64,
                    w.batch.max(1),
                )
            })
            .collect()
    }

    /// How many telemetry messages device `index` sends for `messages`
    /// scheduled ones: an offline window's messages go out regrouped into
    /// batches.
    pub fn telemetry_sends(&self, index: u32, messages: u64) -> u64 {
        let base = self.run_start_ms * 1000;
        let kk = u64::from(self.readings_per_message.max(1));
        let mut sends = messages;
        for (start, end, batch) in self.offline_windows(index) {
            let upto = |t: i64| {
                self.messages_within(index, (t - base).max(0) as u64)
                    .min(messages)
            };
            let held = upto(end) - upto(start);
            sends = sends - held + (held * kk).div_ceil(u64::from(batch));
        }
        sends
    }

    /// When device `index` loses its connection in a storm, µs since the epoch.
    pub fn storm_times(&self, index: u32) -> Vec<i64> {
        let base = self.run_start_ms * 1000;
        self.storms
            .iter()
            .filter(|st| chosen(self.seed, index, st.salt, st.fraction))
            .map(|st| base + st.at_us as i64)
            .collect()
    }

    /// Device `index`'s message `k`'s readings, without faults, due at
    /// `due_us`.
    fn readings(&self, index: u32, first_seq: u64, k: u64, due_us: i64) -> Vec<PlannedReading> {
        if let Some(r) = &self.replay {
            return r
                .row(index, k)
                .map(|row| PlannedReading {
                    seq: first_seq + k,
                    ts: r.ts(row, self.run_start_ms),
                })
                .into_iter()
                .collect();
        }
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
            offline: self.offline_windows(index),
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
    /// This device's offline windows (see [`RunPlan::offline_windows`]).
    offline: Vec<(i64, i64, u32)>,
}

impl Sends<'_> {
    /// The offline window holding `due_us`, if any.
    fn offline_at(&self, due_us: i64) -> Option<(i64, i64, u32)> {
        self.offline
            .iter()
            .copied()
            .find(|(start, end, _)| (*start..*end).contains(&due_us))
    }

    /// Queues the backlog of an offline window: every message due in it,
    /// regrouped into batches of `batch` readings sent at the window's end
    /// with their original timestamps. Faults are not drawn for them.
    fn push_backlog(&mut self, end_us: i64, batch: u32) {
        let plan = self.plan;
        let first_k = self.next_k;
        let mut readings = Vec::new();
        while self.next_k < self.messages {
            let due = plan.due_us(self.index, self.next_k);
            if due >= end_us {
                break;
            }
            readings.extend(plan.readings(self.index, self.first_seq, self.next_k, due));
            self.next_k += 1;
        }
        let kk = u64::from(plan.readings_per_message.max(1));
        for chunk in readings.chunks(batch as usize) {
            let k = chunk
                .first()
                .map_or(first_k, |r| (r.seq - self.first_seq) / kk);
            self.queue.push_back(Send {
                due_us: end_us,
                kind: SendKind::Telemetry(Message {
                    k,
                    due_ms: end_us.div_euclid(1000),
                    readings: chunk.to_vec(),
                    late_reading: None,
                }),
            });
        }
    }

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
        let mut readings = plan.readings(self.index, self.first_seq, k, plan.due_us(self.index, k));
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
            let margin = plan.clock_skew_ms + plan.arrival_slack_ms + FAULT_GUARD_MS;
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
            let due = self.plan.due_us(self.index, k);
            if let Some((_, end, batch)) = self.offline_at(due) {
                self.push_backlog(end, batch);
                continue;
            }
            let d = self.draws(k);
            let next_offline = k + 1 < self.messages
                && self
                    .offline_at(self.plan.due_us(self.index, k + 1))
                    .is_some();
            if d.reorder && k + 1 < self.messages && !next_offline {
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
pub(crate) mod tests;
