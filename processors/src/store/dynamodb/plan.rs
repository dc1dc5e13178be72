//! Which calls read a load's keys: pure, so its choices are tested without
//! a table.

use std::collections::BTreeMap;

use rollup::keys::ItemKey;

use super::BATCH_GET_MAX;

/// One read call of a load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Read {
    /// Up to 100 distinct keys by BatchGetItem.
    Keys {
        keys: Vec<(String, String)>,
        consistent: bool,
    },
    /// Every item of `pk` from `from` to `to` (both included) by Query.
    Range {
        pk: String,
        from: String,
        to: String,
        consistent: bool,
    },
}

/// Items only their device's batches write, whose stale read can only
/// cost a conflict and a reload, never a wrong write.
fn device_owned(key: &ItemKey) -> bool {
    matches!(
        key,
        ItemKey::Span { .. }
            | ItemKey::DeviceWindow { .. }
            | ItemKey::Device { .. }
            | ItemKey::Member { .. }
    )
}

/// Plans the calls that read `keys`: the spans or coarse windows of one
/// device that a load asks for together (a batch starting a span, a
/// compaction reading an hour's spans or a day's hours) lie next to each
/// other in sort-key order, so one Query reads them for the units of their
/// total size; the rest go by BatchGetItem, split by consistency since a
/// BatchGetItem sets it per table.
pub(super) fn plan_reads(keys: &[ItemKey], eventual_device_reads: bool) -> Vec<Read> {
    let consistent = |k: &ItemKey| !(eventual_device_reads && device_owned(k));
    let mut ranges: BTreeMap<String, (String, String, bool)> = BTreeMap::new();
    let mut singles: BTreeMap<(String, String), bool> = BTreeMap::new();
    for key in keys {
        let (pk, sk) = (key.pk(), key.sk());
        if matches!(key, ItemKey::Span { .. } | ItemKey::DeviceWindow { .. }) {
            let entry = ranges
                .entry(pk)
                .or_insert_with(|| (sk.clone(), sk.clone(), consistent(key)));
            if sk < entry.0 {
                entry.0 = sk;
            } else if sk > entry.1 {
                entry.1 = sk;
            }
        } else {
            singles.insert((pk, sk), consistent(key));
        }
    }
    let mut reads = Vec::new();
    for (pk, (from, to, consistent)) in ranges {
        if from == to {
            singles.insert((pk, from), consistent);
        } else {
            reads.push(Read::Range {
                pk,
                from,
                to,
                consistent,
            });
        }
    }
    for want in [true, false] {
        let keys: Vec<(String, String)> = singles
            .iter()
            .filter(|(_, c)| **c == want)
            .map(|(id, _)| id.clone())
            .collect();
        reads.extend(keys.chunks(BATCH_GET_MAX).map(|chunk| Read::Keys {
            keys: chunk.to_vec(),
            consistent: want,
        }));
    }
    reads
}
