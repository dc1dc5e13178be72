use super::plan::{Read, plan_reads};
use super::*;
use rollup::keys::time_sk;

fn span(device: &str, start: i64) -> ItemKey {
    ItemKey::Span {
        device: device.into(),
        start,
    }
}

#[test]
fn a_devices_spans_asked_together_are_one_range_and_the_rest_one_batch() {
    let keys = [
        span("a", 600_000),
        span("b", 0),
        span("a", 0),
        span("a", 1_200_000),
        ItemKey::Device { device: "a".into() },
        ItemKey::Watermark { shard: "s0".into() },
        span("a", 600_000),
    ];
    let reads = plan_reads(&keys, true);
    assert_eq!(
        reads,
        vec![
            Read::Range {
                pk: "s|a".into(),
                from: time_sk(0),
                to: time_sk(1_200_000),
                consistent: false,
            },
            Read::Keys {
                keys: vec![("k".into(), "s0".into())],
                consistent: true,
            },
            Read::Keys {
                keys: vec![("d|a".into(), "-".into()), ("s|b".into(), time_sk(0)),],
                consistent: false,
            },
        ]
    );
}

#[test]
fn after_a_conflict_every_read_is_strongly_consistent() {
    let keys = [span("a", 0), span("a", 600_000), span("b", 0)];
    let reads = plan_reads(&keys, false);
    assert!(reads.iter().all(|r| match r {
        Read::Keys { consistent, .. } | Read::Range { consistent, .. } => *consistent,
    }));
}

#[test]
fn a_batch_get_names_each_key_once_and_at_most_a_hundred() {
    let keys: Vec<ItemKey> = (0..250)
        .flat_map(|i| {
            [
                ItemKey::Device {
                    device: format!("d{i}"),
                },
                ItemKey::Device {
                    device: format!("d{i}"),
                },
            ]
        })
        .collect();
    let reads = plan_reads(&keys, true);
    let sizes: Vec<usize> = reads
        .iter()
        .map(|r| match r {
            Read::Keys { keys, .. } => keys.len(),
            Read::Range { .. } => 0,
        })
        .collect();
    assert_eq!(sizes, vec![100, 100, 50]);
}
