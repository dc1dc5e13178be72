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
        arrival_slack_ms: 0,
        watermark_slack_ms: 0,
        segments: Vec::new(),
        offline: Vec::new(),
        storms: Vec::new(),
        replay: None,
        template: None,
        liveness: None,
    }
}

#[test]
fn segments_change_the_rhythm() {
    let mut p = plan();
    // 1 s steady at 5/s, 1 s burst at 20/s, 2 s ramp at 5/s.
    p.segments = vec![
        Segment {
            start_us: 0,
            end_us: 1_000_000,
            period_us: 200_000,
            ramp: false,
        },
        Segment {
            start_us: 1_000_000,
            end_us: 2_000_000,
            period_us: 50_000,
            ramp: false,
        },
        Segment {
            start_us: 2_000_000,
            end_us: 4_000_000,
            period_us: 200_000,
            ramp: true,
        },
    ];
    assert!((0..4).all(|i| p.messages_within(i, 1_000_000) == 5));
    assert!((0..4).all(|i| p.messages_within(i, 2_000_000) == 25));
    // In the ramp device i starts at 2 s + i * 0.5 s.
    let total: Vec<u64> = (0..4).map(|i| p.messages_within(i, 4_000_000)).collect();
    assert_eq!(total, [35, 33, 30, 28]);
    let rel = |i, k| (p.due_us(i, k) - p.run_start_ms * 1000) / 1000;
    assert_eq!(rel(1, 0), 50);
    assert_eq!(rel(1, 5), 1_012);
    assert_eq!(rel(1, 25), 2_500);
    assert_eq!(rel(3, 25), 3_500);
    // Dues never go backwards.
    for i in 0..4 {
        let dues: Vec<i64> = (0..total[i as usize]).map(|k| p.due_us(i, k)).collect();
        assert!(dues.windows(2).all(|w| w[0] < w[1]), "device {i}");
    }
}

#[test]
fn offline_devices_send_their_backlog_in_batches() {
    let mut p = plan();
    p.devices = 40;
    p.faults.duplicate_rate = 0.3;
    p.offline = vec![OfflineWindow {
        start_us: 1_000_000,
        end_us: 3_000_000,
        fraction: 0.5,
        batch: 4,
        salt: 1,
    }];
    let offline: Vec<u32> = (0..40)
        .filter(|i| !p.offline_windows(*i).is_empty())
        .collect();
    assert!((10..30).contains(&offline.len()), "{offline:?}");
    let i = offline[0];
    let msgs: Vec<Message> = p.messages(i, 0, 20).collect();
    let seqs: Vec<u64> = msgs
        .iter()
        .flat_map(|m| m.readings.iter().map(|r| r.seq))
        .collect();
    assert_eq!(
        seqs,
        (0..20).collect::<Vec<_>>(),
        "every reading, once, in order"
    );
    let end_ms = p.run_start_ms + 3_000;
    let backlog: Vec<&Message> = msgs
        .iter()
        .filter(|m| m.due_ms == end_ms && m.readings[0].ts < end_ms)
        .collect();
    // 10 readings were due in [1 s, 3 s): batches of 4, 4 and 2.
    let sizes: Vec<usize> = backlog.iter().map(|m| m.readings.len()).collect();
    assert_eq!(sizes, [4, 4, 2]);
    for m in &backlog {
        for r in &m.readings {
            assert_eq!(
                r.ts,
                p.due_us(i, r.seq).div_euclid(1000),
                "original timestamps"
            );
        }
    }
    let sends: Vec<Send> = p.sends(i, 0, 20).collect();
    let dup_in_backlog = sends.iter().any(|s| {
        matches!(&s.kind, SendKind::Duplicate(m) if m.readings[0].ts < end_ms && m.due_ms == end_ms)
    });
    assert!(!dup_in_backlog, "no faults in a backlog");
    assert_eq!(p.telemetry_sends(i, 20), msgs.len() as u64);
    let online = (0..40).find(|i| p.offline_windows(*i).is_empty()).unwrap();
    assert_eq!(p.telemetry_sends(online, 20), 20);
    assert!(p.messages(online, 0, 20).all(|m| m.readings.len() == 1));
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
