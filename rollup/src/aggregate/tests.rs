//! The core driven directly, with a plain map standing in for the store so
//! that a crash can be placed between any two writes.

use std::collections::BTreeMap;

use bytes::Bytes;
use schemas::record::{RejectedMessage, StreamRecord};
use schemas::shard::Record;
use schemas::state::{Item, ItemState};
use schemas::{Metric, PackedRecord, Reading, RejectReason, Rejection, Resolution};

use super::*;
use crate::commit::{Condition, Stored, Write};

const T0: i64 = 1_764_240_000_000; // 2025-11-27T10:40:00Z, a minute boundary.
const MIN: i64 = Resolution::MINUTE;

#[derive(Default, Clone)]
struct Mem(BTreeMap<(String, String), (u64, Item)>);

impl Mem {
    fn load(&self, keys: &[ItemKey]) -> Vec<Option<Stored>> {
        keys.iter()
            .map(|k| {
                self.0.get(&(k.pk(), k.sk())).map(|(v, item)| Stored {
                    version: *v,
                    item: item.clone(),
                })
            })
            .collect()
    }

    fn write(&mut self, w: &Write) {
        let id = (w.key.pk(), w.key.sk());
        let current = self.0.get(&id).map(|(v, _)| *v);
        let version = match (w.condition, current) {
            (Condition::Version(v), Some(c)) => {
                assert_eq!(v, c, "conflict on {id:?}");
                c + 1
            }
            (Condition::Absent, None) | (Condition::InsertOnce, None) => 1,
            (Condition::InsertOnce, Some(_)) => return,
            other => panic!("condition {other:?} failed on {id:?}"),
        };
        self.0.insert(id, (version, w.item.clone()));
    }

    /// Runs a batch, stopping after `crash_after` writes if given.
    fn run(&mut self, shard: &str, records: &[Record], crash_after: Option<usize>) -> BatchStats {
        let cfg = AggregateConfig::default();
        let plan = plan(shard, records, &cfg);
        let loaded = self.load(plan.keys());
        let out = apply(plan, loaded, &cfg).unwrap();
        let all: Vec<&Write> = out.commit.writes.iter().chain(&out.commit.then).collect();
        let n = crash_after.unwrap_or(all.len()).min(all.len());
        for w in &all[..n] {
            self.write(w);
        }
        out.stats
    }

    fn window(&self, pk: &str, start: i64) -> Option<schemas::WindowAgg> {
        match &self
            .0
            .get(&(pk.to_string(), crate::keys::time_sk(start)))?
            .1
            .state
        {
            ItemState::Window(agg) => Some(agg.clone()),
            _ => None,
        }
    }

    fn fleet_window(&self, pk: &str, start: i64, part: &str) -> Option<schemas::WindowAgg> {
        let sk = format!("{}|{part}", crate::keys::time_sk(start));
        match &self.0.get(&(pk.to_string(), sk))?.1.state {
            ItemState::Window(agg) => Some(agg.clone()),
            _ => None,
        }
    }

    fn counter(&self, shard: &str, name: &str) -> u64 {
        match self.0.get(&("c".to_string(), format!("{shard}|{name}"))) {
            Some((
                _,
                Item {
                    state: ItemState::Counter(n),
                    ..
                },
            )) => *n,
            _ => 0,
        }
    }

    /// Everything but versions, in a comparable form.
    fn snapshot(&self) -> Vec<((String, String), Vec<u8>)> {
        self.0
            .iter()
            .map(|(k, (_, item))| (k.clone(), item.encode()))
            .collect()
    }
}

fn reading(seq: Option<u64>, ts: i64, metrics: &[(&str, f64)]) -> Reading {
    Reading {
        seq,
        ts,
        metrics: metrics
            .iter()
            .map(|(name, value)| Metric {
                name: name.to_string(),
                value: *value,
            })
            .collect(),
    }
}

fn rec(seq: u128, device: &str, received_at: i64, readings: Vec<Reading>) -> Record {
    let data = PackedRecord {
        device_id: device.into(),
        fleet: "f".into(),
        received_at,
        readings,
    }
    .encode();
    Record {
        seq: seq.into(),
        partition_key: device.into(),
        data: Bytes::from(data),
        arrival_ms: received_at,
    }
}

fn dwin(device: &str, metric: &str, res: &str) -> String {
    crate::keys::device_window_pk(device, metric, res.parse().unwrap())
}

fn fwin(metric: &str, res: &str) -> String {
    crate::keys::fleet_window_pk("f", metric, res.parse().unwrap())
}

#[test]
fn folds_readings_into_every_resolution_and_series() {
    let mut m = Mem::default();
    let batch = vec![
        rec(
            1,
            "d1",
            T0 + 1000,
            vec![reading(Some(1), T0 + 500, &[("t", 20.0), ("h", 40.0)])],
        ),
        rec(
            2,
            "d1",
            T0 + 2000,
            vec![reading(Some(2), T0 + 1500, &[("t", 22.0)])],
        ),
        rec(
            3,
            "d1",
            T0 + MIN + 100,
            vec![reading(Some(3), T0 + MIN + 50, &[("t", 18.0)])],
        ),
    ];
    let stats = m.run("s0", &batch, None);
    assert_eq!(stats.accepted_readings, 3);
    let w = m.window(&dwin("d1", "t", "1m"), T0).unwrap();
    assert_eq!((w.count, w.sum, w.min, w.max), (2, 42.0, 20.0, 22.0));
    assert_eq!(w.first.value, 20.0);
    assert_eq!(w.last.value, 22.0);
    assert_eq!(w.late_count, 0);
    let h = m
        .window(
            &dwin("d1", "t", "1h"),
            Resolution::DEFAULTS[1].window_start(T0),
        )
        .unwrap();
    assert_eq!((h.count, h.sum), (3, 60.0));
    let d = m
        .window(
            &dwin("d1", "t", "1d"),
            Resolution::DEFAULTS[2].window_start(T0),
        )
        .unwrap();
    assert_eq!(d.count, 3);
    assert_eq!(m.window(&dwin("d1", "h", "1m"), T0).unwrap().count, 1);
    let f = m.fleet_window(&fwin("t", "1m"), T0, "s0").unwrap();
    assert_eq!((f.count, f.sum), (2, 42.0));
    assert_eq!(m.counter("s0", "accepted_readings"), 3);
}

#[test]
fn a_replayed_batch_changes_nothing() {
    let mut m = Mem::default();
    let batch = vec![
        rec(
            1,
            "d1",
            T0 + 1000,
            vec![reading(Some(1), T0 + 500, &[("t", 20.0)])],
        ),
        rec(
            2,
            "d2",
            T0 + 1000,
            vec![reading(None, T0 + 600, &[("t", 21.0)])],
        ),
    ];
    m.run("s0", &batch, None);
    let before = m.snapshot();
    let stats = m.run("s0", &batch, None);
    assert_eq!(stats.accepted_readings, 0);
    assert_eq!(stats.replayed_readings, 2);
    assert_eq!(m.snapshot(), before);
}

#[test]
fn a_reading_delivered_twice_counts_once_in_any_order() {
    let mut m = Mem::default();
    let r = |s| reading(Some(s), T0 + s as i64 * 100, &[("t", s as f64)]);
    // seq 3 arrives before 2, and 2 and 3 arrive again later, in other records.
    m.run("s0", &[rec(1, "d1", T0 + 5000, vec![r(1), r(3)])], None);
    m.run(
        "s0",
        &[
            rec(2, "d1", T0 + 6000, vec![r(2)]),
            rec(3, "d1", T0 + 7000, vec![r(3), r(2)]),
        ],
        None,
    );
    let w = m.window(&dwin("d1", "t", "1m"), T0).unwrap();
    assert_eq!((w.count, w.sum), (3, 6.0));
    assert_eq!(m.counter("s0", "duplicate_readings"), 2);
    assert_eq!(m.counter("s0", "accepted_readings"), 3);
}

#[test]
fn lateness_is_judged_against_received_at() {
    let mut m = Mem::default();
    let hour = Resolution::HOUR;
    let h0 = Resolution::DEFAULTS[1].window_start(T0);
    let batch = vec![
        // Its minute ended, its hour did not: late in the 1m window only.
        rec(
            1,
            "d1",
            T0 + MIN + 10,
            vec![reading(Some(1), T0 + 10, &[("t", 1.0)])],
        ),
        // Its minute ended 59 minutes ago: still within the 1 h lateness.
        rec(
            2,
            "d1",
            T0 + hour - 1,
            vec![reading(Some(2), T0 + 20, &[("t", 2.0)])],
        ),
        // Its minute ended an hour ago: too late.
        rec(
            3,
            "d1",
            T0 + MIN + hour,
            vec![reading(Some(3), T0 + 30, &[("t", 3.0)])],
        ),
        // More than 10 minutes ahead of its arrival: in the future.
        rec(
            4,
            "d1",
            T0,
            vec![reading(Some(4), T0 + 10 * MIN + 1, &[("t", 4.0)])],
        ),
    ];
    let stats = m.run("s0", &batch, None);
    assert_eq!(stats.accepted_readings, 2);
    assert_eq!(stats.late_readings, 2);
    let w = m.window(&dwin("d1", "t", "1m"), T0).unwrap();
    assert_eq!((w.count, w.late_count, w.revision), (2, 2, 2));
    let h = m.window(&dwin("d1", "t", "1h"), h0).unwrap();
    let hour_ended = T0 + hour > h0 + hour;
    assert_eq!(h.late_count, u64::from(hour_ended));
    assert_eq!(m.counter("s0", "rejected:too_late"), 1);
    assert_eq!(m.counter("s0", "rejected:in_future"), 1);
    let letters: Vec<_> =
        m.0.iter()
            .filter(|((pk, _), _)| pk.starts_with("l|"))
            .collect();
    assert_eq!(letters.len(), 2);
}

#[test]
fn refused_and_unreadable_records_are_counted_and_kept() {
    let mut m = Mem::default();
    let refused = StreamRecord::Rejected(RejectedMessage::new(
        "dt/f/d1/telemetry",
        "d1",
        T0,
        Rejection::new(RejectReason::MalformedJson, "EOF while parsing"),
        b"{\"ts\":",
    ))
    .encode();
    let batch = vec![
        Record {
            seq: 1u64.into(),
            partition_key: "d1".into(),
            data: Bytes::from(refused),
            arrival_ms: T0,
        },
        Record {
            seq: 2u64.into(),
            partition_key: "x".into(),
            data: Bytes::from_static(b"garbage"),
            arrival_ms: T0,
        },
    ];
    let stats = m.run("s0", &batch, None);
    assert_eq!(
        stats.rejected,
        vec![
            (RejectReason::MalformedJson, 1),
            (RejectReason::BadRecord, 1)
        ]
    );
    assert_eq!(m.counter("s0", "rejected:malformed_json"), 1);
    assert_eq!(m.counter("s0", "rejected:bad_record"), 1);
    m.run("s0", &batch, None);
    assert_eq!(
        m.counter("s0", "rejected:malformed_json"),
        1,
        "replay counted twice"
    );
}

#[test]
fn fleet_windows_have_one_part_per_shard() {
    let mut m = Mem::default();
    m.run(
        "s0",
        &[rec(
            1,
            "d1",
            T0 + 1,
            vec![reading(Some(1), T0, &[("t", 1.0)])],
        )],
        None,
    );
    m.run(
        "s1",
        &[rec(
            1,
            "d2",
            T0 + 1,
            vec![reading(Some(1), T0, &[("t", 2.0)])],
        )],
        None,
    );
    assert_eq!(m.fleet_window(&fwin("t", "1m"), T0, "s0").unwrap().sum, 1.0);
    assert_eq!(m.fleet_window(&fwin("t", "1m"), T0, "s1").unwrap().sum, 2.0);
}

/// A crash after any number of writes, then a retry (whole or bisected),
/// ends exactly where a clean run ends.
#[test]
fn a_crash_between_any_two_writes_then_a_retry_is_exact() {
    let first = vec![rec(
        1,
        "d1",
        T0 + 100,
        vec![reading(Some(1), T0 + 50, &[("t", 1.0)])],
    )];
    let second: Vec<Record> = (2..8u64)
        .map(|s| {
            let device = if s % 2 == 0 { "d1" } else { "d2" };
            // seq 5 repeats seq 3 of d2: a duplicate inside the batch.
            let id = if s == 5 { 3 } else { s };
            rec(
                s as u128,
                device,
                T0 + MIN * 2,
                vec![reading(
                    Some(id),
                    T0 + s as i64 * 1000,
                    &[("t", s as f64), ("h", 1.0)],
                )],
            )
        })
        .collect();
    let mut clean = Mem::default();
    clean.run("s0", &first, None);
    clean.run("s0", &second, None);
    let expected = clean.snapshot();
    let total_writes = {
        let mut probe = Mem::default();
        probe.run("s0", &first, None);
        let cfg = AggregateConfig::default();
        let p = plan("s0", &second, &cfg);
        let loaded = probe.load(p.keys());
        apply(p, loaded, &cfg).unwrap().commit.len()
    };
    assert!(total_writes > 10);
    for crash_after in 0..=total_writes {
        for bisect in [false, true] {
            let mut m = Mem::default();
            m.run("s0", &first, None);
            m.run("s0", &second, Some(crash_after));
            if bisect {
                let (a, b) = second.split_at(second.len() / 2);
                m.run("s0", a, None);
                m.run("s0", b, None);
            } else {
                m.run("s0", &second, None);
            }
            assert_eq!(
                m.snapshot(),
                expected,
                "crash after {crash_after} writes, bisect {bisect}"
            );
        }
    }
    assert_eq!(clean.counter("s0", "duplicate_readings"), 1);
}

#[test]
fn an_item_that_is_not_what_its_key_says_refuses_the_batch() {
    let cfg = AggregateConfig::default();
    let batch = vec![rec(
        1,
        "d1",
        T0 + 1000,
        vec![reading(Some(1), T0 + 500, &[("t", 20.0)])],
    )];
    let p = plan("s0", &batch, &cfg);
    let keys = p.keys().to_vec();
    // Every planned item loaded as a counter: the dedup set, the device and
    // the windows cannot be read as what their keys name.
    let loaded = keys
        .iter()
        .map(|_| {
            Some(Stored {
                version: 1,
                item: Item {
                    applied: Default::default(),
                    state: ItemState::Counter(7),
                },
            })
        })
        .collect();
    match apply(p, loaded, &cfg) {
        Err(ApplyError::Unreadable { key, detail }) => {
            assert!(key.starts_with("x|d1/"), "{key}");
            assert_eq!(detail, "expected a dedup set, found a counter");
        }
        other => panic!("expected an unreadable item, got {other:?}"),
    }

    // A shell that loads fewer items than planned is refused, not trusted.
    let p = plan("s0", &batch, &cfg);
    let short = vec![None; keys.len() - 1];
    assert_eq!(
        apply(p, short, &cfg).err(),
        Some(ApplyError::LoadedCount {
            loaded: keys.len() - 1,
            keys: keys.len(),
        })
    );
}
