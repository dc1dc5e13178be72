//! The core driven directly, with a plain map standing in for the store so
//! that a crash can be placed between any two writes.

use std::collections::BTreeMap;

use bytes::Bytes;
use schemas::record::{RejectedMessage, StreamRecord};
use schemas::shard::Record;
use schemas::state::{DeviceState, Item, ItemState, SpanState};
use schemas::{Metric, PackedRecord, Reading, RejectReason, Rejection, Resolution, WindowAgg};

use super::*;
use crate::commit::{Condition, LoadedItem, Write};

const T0: i64 = 1_764_240_000_000; // 2025-11-27T10:40:00Z, a minute boundary.
const MIN: i64 = Resolution::MINUTE;

/// The items, and the config the core runs with over them.
#[derive(Default, Clone)]
struct Mem(BTreeMap<(String, String), (u64, Item)>, AggregateConfig);

impl Mem {
    fn load(&self, keys: &[ItemKey]) -> Vec<Option<LoadedItem>> {
        keys.iter()
            .map(|k| {
                self.0.get(&(k.pk(), k.sk())).map(|(v, item)| LoadedItem {
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

    /// Plans, loads every round and applies a batch.
    fn applied(&self, shard: &str, records: &[Record]) -> AppliedBatch {
        fold(shard, records, &self.1, |keys| self.load(keys)).unwrap()
    }

    /// Runs a batch, stopping after `crash_after` writes if given.
    fn run(&mut self, shard: &str, records: &[Record], crash_after: Option<usize>) -> BatchStats {
        let out = self.applied(shard, records);
        let all: Vec<&Write> = out.commit.writes.iter().chain(&out.commit.then).collect();
        let n = crash_after.unwrap_or(all.len()).min(all.len());
        for w in &all[..n] {
            self.write(w);
        }
        out.stats
    }

    fn state(&self, pk: &str, sk: &str) -> Option<&ItemState> {
        self.0
            .get(&(pk.to_string(), sk.to_string()))
            .map(|(_, item)| &item.state)
    }

    fn span(&self, device: &str, start: i64) -> Option<SpanState> {
        let cfg = &self.1;
        let sk = crate::keys::time_sk(cfg.span_start(start));
        match self.state(&crate::keys::span_pk(device), &sk)? {
            ItemState::Span(s) => Some(s.clone()),
            _ => None,
        }
    }

    /// A device's window as the API answers it: from its span, from the
    /// compacted item, or merged from the spans while not compacted.
    fn window(&self, device: &str, metric: &str, res: &str, start: i64) -> Option<WindowAgg> {
        let cfg = &self.1;
        let res: Resolution = res.parse().unwrap();
        if res == cfg.finest() {
            let span = self.span(device, start)?;
            return crate::span::finest_windows(&span, metric)
                .find(|(s, _)| *s == start)
                .map(|(_, agg)| agg.clone());
        }
        let pk = crate::keys::device_window_pk(device, res);
        let windows = match self.state(&pk, &crate::keys::time_sk(start)) {
            Some(ItemState::Windows(w)) => w.clone(),
            _ => {
                let spans: Vec<SpanState> = (0..res.ms() / cfg.span_ms())
                    .filter_map(|i| self.span(device, start + i * cfg.span_ms()))
                    .collect();
                crate::span::coarse_window(res.ms(), start, &spans)
            }
        };
        windows
            .metrics
            .into_iter()
            .find(|(m, _)| m == metric)
            .map(|(_, agg)| agg)
    }

    fn compacted(&self, device: &str, res: &str, start: i64) -> bool {
        let pk = crate::keys::device_window_pk(device, res.parse().unwrap());
        matches!(
            self.state(&pk, &crate::keys::time_sk(start)),
            Some(ItemState::Windows(_))
        )
    }

    fn device(&self, device: &str) -> Option<DeviceState> {
        match self.state(&crate::keys::device_pk(device), crate::keys::DEVICE_SK)? {
            ItemState::Device(d) => Some(d.clone()),
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

    /// Everything but versions, in a comparable form. A fleet member and a
    /// watermark are written only when they change, so the record that last
    /// wrote them depends on how batches were cut: their marks are left out.
    fn snapshot(&self) -> Vec<((String, String), Vec<u8>)> {
        self.0
            .iter()
            .map(|(k, (_, item))| {
                let mut item = item.clone();
                if k.0.starts_with("m|") || k.0 == crate::keys::WATERMARK_PK {
                    item.applied = Default::default();
                }
                (k.clone(), item.encode())
            })
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

/// A record of `device` holding one reading of `t`, `seq` in the shard
/// and the device's, received at the time it was taken.
fn one(seq: u64, device: &str, at: i64, value: f64) -> Record {
    rec(
        seq.into(),
        device,
        at,
        vec![reading(Some(seq), at, &[("t", value)])],
    )
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
    let w = m.window("d1", "t", "1m", T0).unwrap();
    assert_eq!((w.count, w.sum, w.min, w.max), (2, 42.0, 20.0, 22.0));
    assert_eq!(w.first.value, 20.0);
    assert_eq!(w.last.value, 22.0);
    assert_eq!(w.late_count, 0);
    let h = m
        .window("d1", "t", "1h", Resolution::DEFAULTS[1].window_start(T0))
        .unwrap();
    assert_eq!((h.count, h.sum), (3, 60.0));
    let d = m
        .window("d1", "t", "1d", Resolution::DEFAULTS[2].window_start(T0))
        .unwrap();
    assert_eq!(d.count, 3);
    assert_eq!(m.window("d1", "h", "1m", T0).unwrap().count, 1);
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
    let w = m.window("d1", "t", "1m", T0).unwrap();
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
    let w = m.window("d1", "t", "1m", T0).unwrap();
    assert_eq!((w.count, w.late_count, w.revision), (2, 2, 2));
    let h = m.window("d1", "t", "1h", h0).unwrap();
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
        probe.applied("s0", &second).commit.len()
    };
    assert!(total_writes >= 8, "{total_writes}");
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
    let counter = || {
        Some(LoadedItem {
            version: 1,
            item: Item {
                applied: Default::default(),
                state: ItemState::Counter(7),
            },
        })
    };
    // The watermark is read after the first round.
    let mut p = plan("s0", &batch, &cfg);
    let loaded = p.keys().iter().map(|_| counter()).collect();
    match p.receive(loaded, &cfg) {
        Err(ApplyError::Unreadable { key, detail }) => {
            assert_eq!(key, "k/s0");
            assert_eq!(detail, "expected a watermark, found a counter");
        }
        other => panic!("expected an unreadable item, got {other:?}"),
    }
    // A span that holds something else refuses the batch in apply.
    let mut p = plan("s0", &batch, &cfg);
    let loaded = p
        .keys()
        .iter()
        .map(|k| {
            if k.pk().starts_with("s|") {
                counter()
            } else {
                None
            }
        })
        .collect();
    p.receive(loaded, &cfg).unwrap();
    while !p.keys().is_empty() {
        let none = vec![None; p.keys().len()];
        p.receive(none, &cfg).unwrap();
    }
    match apply(p, &cfg) {
        Err(ApplyError::Unreadable { key, detail }) => {
            assert!(key.starts_with("s|d1/"), "{key}");
            assert_eq!(detail, "expected a span, found a counter");
        }
        other => panic!("expected an unreadable item, got {other:?}"),
    }

    // A shell that loads fewer items than planned is refused, not trusted,
    // and so is one that applies before loading every round.
    let mut p = plan("s0", &batch, &cfg);
    let n = p.keys().len();
    assert_eq!(
        p.receive(vec![None; n - 1], &cfg).err(),
        Some(ApplyError::LoadedCount {
            loaded: n - 1,
            keys: n,
        })
    );
    assert!(matches!(
        apply(plan("s0", &batch, &cfg), &cfg),
        Err(ApplyError::LoadedCount { .. })
    ));
}

/// A fleet of quiet devices: once each device has its span, device item and
/// fleet entry, a batch with one reading per device writes one item per
/// device, whatever the number of metrics and resolutions.
#[test]
fn a_reading_of_a_quiet_device_writes_one_item() {
    let mut m = Mem::default();
    let devices = 50;
    let batch = |n: u128, at: i64| -> Vec<Record> {
        (0..devices)
            .map(|d| {
                rec(
                    n * 1000 + d,
                    &format!("d{d}"),
                    at + 100,
                    vec![reading(
                        Some(n as u64),
                        at,
                        &[("t", 1.0), ("h", 2.0), ("p", 3.0)],
                    )],
                )
            })
            .collect()
    };
    m.run("s0", &batch(1, T0), None);
    let second = m.applied("s0", &batch(2, T0 + MIN));
    let per_device = second
        .commit
        .writes
        .iter()
        .chain(&second.commit.then)
        .filter(|w| w.key.pk().contains("|d"))
        .count();
    assert_eq!(per_device, devices as usize, "one span per device");
    // Fleet windows, counters and the watermark: per batch, not per device.
    assert!(second.commit.len() <= devices as usize + 3 * 3 + 3);
}

/// Every written window expires its retention after its own end: a span
/// after its last finest window, a fleet window after its resolution's;
/// with the finest windows kept forever, spans are too.
#[test]
fn written_items_expire_their_retention_after_their_end() {
    let mut config = AggregateConfig::default();
    let batch = [rec(
        1,
        "d0",
        T0 + 7 * MIN + 100,
        vec![reading(Some(1), T0 + 7 * MIN, &[("t", 1.0)])],
    )];
    for forever in [false, true] {
        if forever {
            config.retention_ms[0] = None;
        }
        let out = fold("s0", &batch, &config, |keys| vec![None; keys.len()]).unwrap();
        let writes: Vec<&Write> = out.commit.writes.iter().chain(&out.commit.then).collect();
        let expiry_of = |pk: &str| {
            let w = writes.iter().find(|w| w.key.pk() == pk);
            w.unwrap_or_else(|| panic!("no write to {pk}")).expires_at
        };
        let span_end = config.span_start(T0) + config.span_ms();
        let span_keep = config.span_retention_ms();
        assert_eq!(span_keep.is_none(), forever);
        assert_eq!(
            expiry_of(&crate::keys::span_pk("d0")),
            span_keep.map(|keep| span_end + keep),
            "forever: {forever}"
        );
        let hour = config.retention_of("1h".parse().unwrap());
        assert_eq!(
            expiry_of(&fwin("t", "1h")),
            hour.map(|keep| T0 - T0 % Resolution::HOUR + Resolution::HOUR + keep)
        );
    }
}

/// A device's hour is written once, after it can no longer change, and reads
/// the same as it did merged from spans.
#[test]
fn a_coarser_window_is_compacted_once_it_cannot_change() {
    let cfg = AggregateConfig::default();
    let mut m = Mem::default();
    let h0 = Resolution::DEFAULTS[1].window_start(T0);
    let hour = Resolution::HOUR;
    m.run(
        "s0",
        &[
            rec(1, "d1", T0 + 10, vec![reading(Some(1), T0, &[("t", 1.0)])]),
            rec(
                2,
                "d1",
                T0 + 25 * MIN,
                vec![reading(Some(2), T0 + 20 * MIN, &[("t", 3.0)])],
            ),
        ],
        None,
    );
    let merged = m.window("d1", "t", "1h", h0).unwrap();
    assert!(!m.compacted("d1", "1h", h0));
    assert!(m.device("d1").unwrap().pending.contains(&(hour, h0)));
    // Not yet: the hour's end plus the lateness is not below the watermark.
    let just_before = h0 + 2 * hour + cfg.watermark_slack_ms - 1;
    m.run("s0", &[one(3, "d1", just_before, 5.0)], None);
    assert!(!m.compacted("d1", "1h", h0));
    // Final now; the device's next batch that starts a span compacts it.
    let after = h0 + 2 * hour + cfg.span_ms() + 1000;
    m.run("s0", &[one(4, "d1", after, 6.0)], None);
    assert!(m.compacted("d1", "1h", h0));
    assert_eq!(m.window("d1", "t", "1h", h0).unwrap(), merged);
    let d = m.device("d1").unwrap();
    assert!(!d.pending.contains(&(hour, h0)));
    assert!(
        d.pending
            .contains(&(hour, Resolution::DEFAULTS[1].window_start(after)))
    );
    // Once compacted, the device's item is no longer read while its spans
    // exist: one more reading in the same span writes the span alone.
    let next = after + 1000;
    let out = m.applied("s0", &[one(5, "d1", next, 7.0)]);
    let own: Vec<String> = out
        .commit
        .writes
        .iter()
        .chain(&out.commit.then)
        .map(|w| w.key.pk())
        .filter(|pk| pk.contains("d1"))
        .collect();
    assert_eq!(own, vec!["s|d1".to_string()]);
    // The day is still open, and still counts the hour's readings.
    let day = m
        .window("d1", "t", "1d", Resolution::DEFAULTS[2].window_start(T0))
        .unwrap();
    assert_eq!(day.count, 4);
}

/// Spans are how a device's readings are laid out, not what they add up
/// to: with one-minute spans a device's hour is merged from, then compacted
/// out of, its sixty spans, and every window reads as with the default
/// ten-minute spans, before and after the compaction.
#[test]
fn one_minute_spans_make_the_same_windows_as_ten_minute_ones() {
    let h0 = Resolution::DEFAULTS[1].window_start(T0);
    let at = |min: i64| T0 + min * MIN;
    let after = h0 + 2 * Resolution::HOUR + 10 * MIN + 1000;
    let run = |span: Option<i64>| {
        let cfg = AggregateConfig {
            span,
            ..AggregateConfig::default()
        };
        let mut m = Mem(BTreeMap::new(), cfg);
        // Off the ten-minute marks, and one delivered twice in another
        // batch: a span that missed it would count it again.
        let first = [
            rec(
                1,
                "d1",
                at(3) + 10,
                vec![reading(Some(1), at(3), &[("t", 1.0)])],
            ),
            rec(
                2,
                "d1",
                at(17) + 5,
                vec![reading(Some(2), at(17), &[("t", 3.0)])],
            ),
        ];
        m.run("s0", &first, None);
        let again = [rec(
            3,
            "d1",
            at(18),
            vec![reading(Some(1), at(3), &[("t", 1.0)])],
        )];
        let stats = m.run("s0", &again, None);
        assert_eq!(stats.duplicate_readings, 1, "{span:?}");
        let merged = m.window("d1", "t", "1h", h0).unwrap();
        let minutes = [at(3), at(17)].map(|s| m.window("d1", "t", "1m", s).unwrap());
        m.run("s0", &[one(4, "d1", after, 6.0)], None);
        assert!(m.compacted("d1", "1h", h0), "{span:?}");
        assert_eq!(m.window("d1", "t", "1h", h0).unwrap(), merged, "{span:?}");
        let spans = m.0.keys().filter(|(pk, _)| pk == "s|d1").count();
        (merged, minutes, spans)
    };
    let (ten, one) = (run(None), run(Some(MIN)));
    assert_eq!(ten.0.count, 2);
    assert_eq!((ten.0, ten.1), (one.0, one.1));
    // Three spans with the default layout (10:40, 10:50, and the one
    // after), three minutes with one-minute spans.
    assert_eq!((ten.2, one.2), (3, 3));
}

/// A record that reaches the stream after the watermark passed its window
/// (further out of order than the slack) is refused: the window may already
/// be compacted and must not change.
#[test]
fn a_reading_behind_the_watermark_is_refused_not_folded() {
    let cfg = AggregateConfig::default();
    // Another device's record arrives at `arrival` and moves the watermark;
    // then a record stamped 1 ms before its window's bound is read.
    let stamped = T0 + MIN + cfg.allowed_lateness_ms - 1;
    let after_watermark_from = |arrival: i64| {
        let mut m = Mem::default();
        m.run("s0", &[one(1, "d2", arrival, 1.0)], None);
        let stats = m.run(
            "s0",
            &[rec(
                2,
                "d1",
                stamped,
                vec![reading(Some(1), T0, &[("t", 9.0)])],
            )],
            None,
        );
        (m, stats)
    };
    let slack_ends = T0 + MIN + cfg.allowed_lateness_ms + cfg.watermark_slack_ms;
    let (m, stats) = after_watermark_from(slack_ends + 5_000);
    assert_eq!(stats.accepted_readings, 0);
    assert_eq!(stats.rejected, vec![(RejectReason::TooLate, 1)]);
    assert!(m.window("d1", "t", "1m", T0).is_none());
    // Within the slack the same record is accepted.
    let (_, stats) = after_watermark_from(slack_ends - 5_000);
    assert_eq!(stats.accepted_readings, 1);
}

fn presence_rec(seq: u128, device: &str, fleet: Option<&str>, at: i64, online: bool) -> Record {
    let event = if online {
        schemas::PresenceEvent::Connected
    } else {
        schemas::PresenceEvent::Disconnected {
            reason: schemas::presence::CONNECTION_LOST.into(),
        }
    };
    let data = schemas::Presence {
        device_id: device.into(),
        fleet: fleet.map(str::to_string),
        client_id: device.into(),
        at,
        event,
    }
    .encode();
    Record {
        seq: seq.into(),
        partition_key: device.into(),
        data: Bytes::from(data),
        arrival_ms: at,
    }
}

fn member(m: &Mem, device: &str) -> Option<schemas::state::FleetMember> {
    match m.state(&crate::keys::member_pk("f"), device)? {
        ItemState::FleetMember(f) => Some(f.clone()),
        _ => None,
    }
}

/// Presence lands in the device's member row, beside what its readings
/// wrote there; a presence that names no fleet finds it in the device item,
/// and an older event replayed or arriving late changes nothing.
#[test]
fn presence_is_folded_into_the_member_row_once_and_latest_wins() {
    let mut m = Mem::default();
    let batch = vec![
        rec(1, "d1", T0 + 100, vec![reading(Some(1), T0, &[("t", 1.0)])]),
        presence_rec(2, "d1", Some("f"), T0 + 200, false),
    ];
    let stats = m.run("s0", &batch, None);
    assert_eq!(stats.accepted_readings, 1);
    let row = member(&m, "d1").unwrap();
    assert_eq!(row.last_seen, T0 + 100);
    let mark = row.presence.unwrap();
    assert_eq!(mark.at, T0 + 200);
    assert!(mark.event.is_offline());
    let before = m.snapshot();
    m.run("s0", &batch, None);
    assert_eq!(m.snapshot(), before, "a replay changed the store");

    // IoT Core's events name no fleet: the device item's is used. An
    // older event arriving after a newer one is ignored.
    m.run(
        "s0",
        &[
            presence_rec(3, "d1", None, T0 + 300, true),
            presence_rec(4, "d1", None, T0 + 250, false),
        ],
        None,
    );
    let mark = member(&m, "d1").unwrap().presence.unwrap();
    assert_eq!(mark.at, T0 + 300);
    assert_eq!(mark.event, schemas::PresenceEvent::Connected);

    // A device no fleet lists has nowhere to show its presence.
    let stats = m.run("s0", &[presence_rec(5, "d9", None, T0, false)], None);
    assert_eq!(stats.records, 1);
    assert!(m.0.keys().all(|(_, sk)| sk != "d9"));
}
