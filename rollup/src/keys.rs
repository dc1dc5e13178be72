//! Item keys: one logical table in every store, keyed like the DynamoDB design
//! (a partition key `pk` and a sort key `sk`, both strings).
//!
//! | item | pk | sk |
//! |---|---|---|
//! | device span (finest windows, every metric, dedup) | `s\|{device}` | `{span start:015}` |
//! | device coarser window (every metric) | `w\|d\|{device}\|{res}` | `{start:015}` |
//! | fleet window part | `w\|f\|{fleet}\|{metric}\|{res}` | `{start:015}\|{shard}` |
//! | device (latest, pending windows) | `d\|{device}` | `-` |
//! | fleet member | `m\|{fleet}` | `{device}` |
//! | counter | `c` | `{shard}\|{name}` |
//! | processed watermark | `k` | `{shard}` |
//! | dead letter | `l\|{reason}` | `{received_at:015}\|{shard}\|{seq:078}\|{index:05}` |
//! | alert | `a\|{rule}` | `{window start:015}\|{revision:010}` |
//! | alert delivered | `a\|{rule}` | `{window start:015}\|{revision:010}\|d` |
//! | the store's layout | `v` | `-` |
//!
//! `|` cannot occur in ids or metric names, so keys never collide, and the
//! zero-padded numbers make string order time order, which is what range
//! queries need. Fleet windows are split by writing shard so that every item
//! has exactly one writer: a hot fleet window never serialises the pipeline,
//! and the query merges the parts.

use schemas::{RejectReason, Resolution, SeqNo};

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ItemKey {
    Span {
        device: String,
        start: i64,
    },
    DeviceWindow {
        device: String,
        res: Resolution,
        start: i64,
    },
    FleetWindow {
        fleet: String,
        metric: String,
        res: Resolution,
        start: i64,
        part: String,
    },
    Device {
        device: String,
    },
    Member {
        fleet: String,
        device: String,
    },
    Counter {
        shard: String,
        name: String,
    },
    Watermark {
        shard: String,
    },
    DeadLetter {
        reason: RejectReason,
        received_at: i64,
        shard: String,
        seq: SeqNo,
        index: u32,
    },
    /// A window at one revision that fired a rule: written once.
    Alert {
        rule: String,
        start: i64,
        revision: u64,
    },
    /// That alert's notification was delivered: written once, right after
    /// the alert in its partition.
    AlertDelivered {
        rule: String,
        start: i64,
        revision: u64,
    },
    /// The span and resolutions the store's items were written with.
    Layout,
}

impl ItemKey {
    pub fn pk(&self) -> String {
        match self {
            ItemKey::Span { device, .. } => span_pk(device),
            ItemKey::DeviceWindow { device, res, .. } => device_window_pk(device, *res),
            ItemKey::FleetWindow {
                fleet, metric, res, ..
            } => fleet_window_pk(fleet, metric, *res),
            ItemKey::Device { device } => device_pk(device),
            ItemKey::Member { fleet, .. } => member_pk(fleet),
            ItemKey::Counter { .. } => COUNTER_PK.to_string(),
            ItemKey::Watermark { .. } => WATERMARK_PK.to_string(),
            ItemKey::DeadLetter { reason, .. } => dead_letter_pk(*reason),
            ItemKey::Alert { rule, .. } | ItemKey::AlertDelivered { rule, .. } => alert_pk(rule),
            ItemKey::Layout => LAYOUT_PK.to_string(),
        }
    }

    pub fn sk(&self) -> String {
        match self {
            ItemKey::DeviceWindow { start, .. } | ItemKey::Span { start, .. } => time_sk(*start),
            ItemKey::FleetWindow { start, part, .. } => {
                let mut sk = String::with_capacity(TIME_SK_MAX + 1 + part.len());
                push_time_sk(&mut sk, *start);
                sk.push('|');
                sk.push_str(part);
                sk
            }
            ItemKey::Device { .. } | ItemKey::Layout => DEVICE_SK.to_string(),
            ItemKey::Member { device, .. } => device.clone(),
            ItemKey::Counter { shard, name } => format!("{shard}|{name}"),
            ItemKey::Watermark { shard } => shard.clone(),
            ItemKey::DeadLetter {
                received_at,
                shard,
                seq,
                index,
                ..
            } => format!(
                "{}|{shard}|{}|{index:05}",
                time_sk(*received_at),
                seq.padded()
            ),
            ItemKey::Alert {
                start, revision, ..
            } => format!("{}|{revision:010}", time_sk(*start)),
            ItemKey::AlertDelivered {
                start, revision, ..
            } => format!("{}|{revision:010}|d", time_sk(*start)),
        }
    }
}

impl ItemKey {
    /// Items a commit writes after all others (`Commit::then`): spans hold
    /// the dedup sets, a device item drops a pending window only once its
    /// compacted item is written, and a watermark moves only once
    /// everything below it is.
    pub fn is_written_last(&self) -> bool {
        matches!(
            self,
            ItemKey::Span { .. } | ItemKey::Device { .. } | ItemKey::Watermark { .. }
        )
    }
}

pub const DEVICE_SK: &str = "-";
/// Every shard's counters share one partition, so that totals are one query
/// in every store; each counter still has a single writer.
pub const COUNTER_PK: &str = "c";
pub const MEMBER_PK_PREFIX: &str = "m|";
/// Every shard's watermark in one partition: `final` reads them all at once.
pub const WATERMARK_PK: &str = "k";
pub const LAYOUT_PK: &str = "v";

// The keys of a device's items are made for every new entry of the
// processors' cache (a fleet's every device, the first time it is seen) and
// for every item a flush writes: `concat` makes them in one allocation,
// where `format!` cost several times as much.
pub fn span_pk(device: &str) -> String {
    ["s|", device].concat()
}

pub fn device_window_pk(device: &str, res: Resolution) -> String {
    format!("w|d|{device}|{res}")
}

pub fn fleet_window_pk(fleet: &str, metric: &str, res: Resolution) -> String {
    format!("w|f|{fleet}|{metric}|{res}")
}

pub fn device_pk(device: &str) -> String {
    ["d|", device].concat()
}

pub fn member_pk(fleet: &str) -> String {
    [MEMBER_PK_PREFIX, fleet].concat()
}

pub fn dead_letter_pk(reason: RejectReason) -> String {
    format!("l|{reason}")
}

pub const ALERT_PK_PREFIX: &str = "a|";

pub fn alert_pk(rule: &str) -> String {
    format!("{ALERT_PK_PREFIX}{rule}")
}

/// A time as a sort key: 15 digits hold every accepted timestamp.
pub fn time_sk(ms: i64) -> String {
    let mut sk = String::with_capacity(TIME_SK_MAX);
    push_time_sk(&mut sk, ms);
    sk
}

/// The digits of a time sort key, zero-padded so that keys sort by time.
const TIME_SK_DIGITS: usize = 15;
/// The most digits [`time_sk`] writes (`u64::MAX` has 20; a time in ms has
/// 13 until the year 2286).
const TIME_SK_MAX: usize = 20;

/// Appends `ms` as [`time_sk`] writes it, a negative time as 0; without
/// `format!`, for the reason given at [`span_pk`].
fn push_time_sk(out: &mut String, ms: i64) {
    let mut buf = itoa::Buffer::new();
    let digits = buf.format(u64::try_from(ms).unwrap_or(0));
    out.extend(std::iter::repeat_n(
        '0',
        TIME_SK_DIGITS.saturating_sub(digits.len()),
    ));
    out.push_str(digits);
}

/// The window start at the front of a window sort key.
pub fn start_of_sk(sk: &str) -> Option<i64> {
    sk.get(..TIME_SK_DIGITS)?.parse().ok()
}

/// The counter names kept per shard.
pub mod counters {
    use schemas::RejectReason;

    pub const ACCEPTED: &str = "accepted_readings";
    pub const DUPLICATE: &str = "duplicate_readings";

    pub fn rejected(reason: RejectReason) -> String {
        format!("rejected:{reason}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_written_keys_read_as_format_wrote_them() {
        for ms in [
            i64::MIN,
            -5,
            0,
            7,
            60_000,
            1_764_900_000_123,
            999_999_999_999_999,
            1_000_000_000_000_000,
            i64::MAX,
        ] {
            assert_eq!(time_sk(ms), format!("{:015}", ms.max(0)), "{ms}");
        }
        let part = ItemKey::FleetWindow {
            fleet: "f".into(),
            metric: "t".into(),
            res: "1m".parse().unwrap(),
            start: 120_000,
            part: "shard-0001".into(),
        };
        assert_eq!(part.sk(), "000000000120000|shard-0001");
        assert_eq!(span_pk("dev-1"), "s|dev-1");
        assert_eq!(device_pk("dev-1"), "d|dev-1");
        assert_eq!(member_pk("fleet-1"), "m|fleet-1");
    }

    #[test]
    fn sort_keys_order_by_time() {
        let r: Resolution = "1m".parse().unwrap();
        let a = ItemKey::FleetWindow {
            fleet: "f".into(),
            metric: "t".into(),
            res: r,
            start: 60_000,
            part: "shard-0003".into(),
        };
        let b = ItemKey::FleetWindow {
            fleet: "f".into(),
            metric: "t".into(),
            res: r,
            start: 120_000,
            part: "shard-0000".into(),
        };
        assert_eq!(a.pk(), "w|f|f|t|1m");
        assert!(a.sk() < b.sk());
        assert_eq!(start_of_sk(&a.sk()), Some(60_000));
        let d = ItemKey::DeviceWindow {
            device: "d".into(),
            res: r,
            start: 253_402_300_740_000,
        };
        assert_eq!(d.sk(), "253402300740000");
        let alert = |revision| ItemKey::Alert {
            rule: "hot".into(),
            start: 60_000,
            revision,
        };
        assert_eq!(alert(1).pk(), "a|hot");
        assert_eq!(alert(1).sk(), "000000000060000|0000000001");
        assert!(alert(1).sk() < alert(10).sk());
        assert_eq!(start_of_sk(&alert(1).sk()), Some(60_000));
        let delivered = ItemKey::AlertDelivered {
            rule: "hot".into(),
            start: 60_000,
            revision: 1,
        };
        assert_eq!(delivered.pk(), "a|hot");
        assert!(alert(1).sk() < delivered.sk() && delivered.sk() < alert(2).sk());
    }
}
