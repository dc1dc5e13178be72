//! What the rollup store keeps per item, in the same encoding in every store
//! backend (postcard, behind a version byte).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::presence::PresenceEvent;
use crate::reading::ReadingId;
use crate::reject::RejectReason;
use crate::rollup::{Point, WindowAgg};
use crate::seq::SeqNo;

/// The version byte in front of every stored item. Version 2 keeps a
/// device's readings in span items (all metrics, dedup folded in) instead of
/// one item per metric, resolution and window.
pub const STATE_VERSION: u8 = 2;

/// One stored item: which stream records it already contains, and its state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Item {
    /// Per shard, the highest stream sequence number folded into this item.
    /// A record at or below it is never applied again: that is what makes a
    /// replayed batch change nothing.
    pub applied: AppliedMarks,
    pub state: ItemState,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub enum ItemState {
    #[default]
    Empty,
    /// A fleet window part: one metric, one resolution, one writing shard.
    Window(WindowAgg),
    /// A device's finest windows over one span, every metric, with the
    /// span's dedup set: the one item a reading of a quiet device writes.
    Span(SpanState),
    /// A device's coarser window, every metric, written once when it can no
    /// longer change.
    Windows(MetricWindows),
    Device(DeviceState),
    /// A fleet member row as written before presence existed; it reads as a
    /// [`FleetMember`] with no presence.
    Member(MemberState),
    Counter(u64),
    /// A shard's processed watermark: every record of the shard that arrived
    /// (`received_at`) at or before it has been applied.
    Watermark(i64),
    DeadLetter(DeadLetter),
    /// A device's entry in its fleet's list, with its last presence event:
    /// everything listing a fleet by status needs, in the rows that listing
    /// reads anyway.
    FleetMember(FleetMember),
    /// A window at one revision that crossed an alert rule's threshold,
    /// with its delivery state.
    Alert(AlertState),
    /// When an alert's notification was acknowledged (a webhook's 2xx), ms
    /// since the epoch: an item of its own beside the alert, written once,
    /// so that neither is ever rewritten.
    AlertDelivered(i64),
    /// What the store's items were first written with that every process
    /// using the store must share.
    Layout(StoreLayout),
}

/// How a store lays a device's readings out. A span start is part of every
/// span item's key, and a reading finds its dedup set by it: a processor
/// that cut spans another way would look for a duplicate in an item that
/// does not hold it, and count it again. So the first writer records its
/// layout, and a process with another refuses the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreLayout {
    /// ms of finest windows one span item holds.
    pub span_ms: i64,
    /// The stored resolutions, finest first, in ms.
    pub resolutions_ms: Vec<i64>,
}

impl Item {
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(256);
        buf.push(STATE_VERSION);
        // Serializing plain data into a Vec cannot fail.
        postcard::to_extend(self, buf).unwrap_or_else(|_| vec![STATE_VERSION])
    }

    pub fn decode(bytes: &[u8]) -> Result<Item, String> {
        match bytes.split_first() {
            Some((&STATE_VERSION, body)) => {
                postcard::from_bytes(body).map_err(|e| format!("stored item: {e}"))
            }
            Some((v, _)) => Err(format!(
                "stored item version {v}; this build reads {STATE_VERSION}"
            )),
            None => Err("stored item is empty".into()),
        }
    }
}

/// Highest applied stream sequence number per shard. Almost always one entry:
/// every item has a single writing shard, except across a resharding.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedMarks(pub Vec<(String, SeqNo)>);

impl AppliedMarks {
    pub fn get(&self, shard: &str) -> Option<SeqNo> {
        self.0.iter().find(|(s, _)| s == shard).map(|(_, seq)| *seq)
    }

    /// Whether the record at `seq` of `shard` is already folded in.
    pub fn contains(&self, shard: &str, seq: SeqNo) -> bool {
        self.get(shard).is_some_and(|applied| seq <= applied)
    }

    pub fn advance(&mut self, shard: &str, seq: SeqNo) {
        match self.0.iter_mut().find(|(s, _)| s == shard) {
            Some((_, applied)) => *applied = (*applied).max(seq),
            None => self.0.push((shard.to_string(), seq)),
        }
    }
}

/// The identities of a device's readings in one finest window, so that a
/// reading delivered twice is counted once whatever the arrival order.
/// Consecutive `seq`s collapse into ranges, so a well-behaved device costs a
/// few bytes per window.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupSet {
    /// Sorted, disjoint, non-adjacent inclusive ranges.
    seq_ranges: Vec<(u64, u64)>,
    /// Sorted `ts` of readings without a `seq`.
    ts: Vec<i64>,
}

impl DedupSet {
    pub fn contains(&self, id: ReadingId) -> bool {
        match id {
            ReadingId::Seq(s) => {
                let i = self.seq_ranges.partition_point(|(_, hi)| *hi < s);
                self.seq_ranges.get(i).is_some_and(|(lo, _)| *lo <= s)
            }
            ReadingId::Ts(t) => self.ts.binary_search(&t).is_ok(),
        }
    }

    /// Adds `id`; returns false if it was already there.
    pub fn insert(&mut self, id: ReadingId) -> bool {
        match id {
            ReadingId::Seq(s) => self.insert_seq(s),
            ReadingId::Ts(t) => match self.ts.binary_search(&t) {
                Ok(_) => false,
                Err(i) => {
                    self.ts.insert(i, t);
                    true
                }
            },
        }
    }

    fn insert_seq(&mut self, s: u64) -> bool {
        let i = self.seq_ranges.partition_point(|(_, hi)| *hi < s);
        if self.seq_ranges.get(i).is_some_and(|(lo, _)| *lo <= s) {
            return false;
        }
        let joins_left = i > 0 && self.seq_ranges[i - 1].1.checked_add(1) == Some(s);
        let joins_right = self
            .seq_ranges
            .get(i)
            .is_some_and(|(lo, _)| s.checked_add(1) == Some(*lo));
        match (joins_left, joins_right) {
            (true, true) => {
                self.seq_ranges[i - 1].1 = self.seq_ranges[i].1;
                self.seq_ranges.remove(i);
            }
            (true, false) => self.seq_ranges[i - 1].1 = s,
            (false, true) => self.seq_ranges[i].0 = s,
            (false, false) => self.seq_ranges.insert(i, (s, s)),
        }
        true
    }

    pub fn len(&self) -> u64 {
        let seqs: u64 = self.seq_ranges.iter().map(|(lo, hi)| hi - lo + 1).sum();
        seqs + self.ts.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.seq_ranges.is_empty() && self.ts.is_empty()
    }
}

/// A device's latest value per metric. It only moves forward in event time, so
/// a late or backfilled reading never hides a newer one.
///
/// The item is written rarely: when the device's readings first enter a
/// coarser window, and when such a window is compacted. `latest` and
/// `last_seen` hold what compacted windows held; readings since live in the
/// spans of the `pending` windows, which the API overlays.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceState {
    pub fleet: String,
    /// Latest `received_at` of any reading folded in here.
    pub last_seen: i64,
    /// Sorted by metric name.
    pub latest: Vec<(String, Point)>,
    /// The shard that writes this device, whose watermark makes its windows
    /// final.
    pub shard: String,
    /// Coarser windows holding readings and not yet compacted, as
    /// `(resolution ms, start)`, sorted.
    pub pending: Vec<(i64, i64)>,
}

impl DeviceState {
    pub fn observe(&mut self, metric: &str, p: Point) {
        match self
            .latest
            .binary_search_by(|(m, _)| m.as_str().cmp(metric))
        {
            Ok(i) => {
                let cur = &mut self.latest[i].1;
                if p.ts > cur.ts || (p.ts == cur.ts && p.value.total_cmp(&cur.value).is_gt()) {
                    *cur = p;
                }
            }
            Err(i) => self.latest.insert(i, (metric.to_string(), p)),
        }
    }
}

/// A device's finest windows over one span (a run of consecutive finest
/// windows), with every metric, and the identities of the readings in it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(from = "SpanWire")]
pub struct SpanState {
    pub fleet: String,
    /// Latest `received_at` of a reading in the span.
    pub last_seen: i64,
    pub dedup: DedupSet,
    /// Sorted by start. Shared, so that a copy of the span (the write-behind
    /// cache hands out one per load) costs a pointer per window, and a
    /// change copies only the window it changes: a reading changes one
    /// window of up to ten.
    pub windows: Vec<Arc<SpanWindow>>,
}

/// One finest window of a span.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpanWindow {
    pub start: i64,
    /// Sorted by metric name.
    pub metrics: Vec<MetricWindow>,
}

/// One metric's window, with the arrival times of its late readings so
/// that a coarser window can tell which of them were late for it too.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricWindow {
    pub metric: String,
    pub agg: WindowAgg,
    /// `received_at` of each reading that arrived after this window's end.
    pub late_at: Vec<i64>,
}

/// A span as stored. A quiet device's span is mostly windows of one on-time
/// value each, so the form is built for them: metric names once per span,
/// and such a window as its value and its offset in the window alone, a
/// tenth of a full aggregate. That keeps a quiet device's span inside one
/// DynamoDB write unit.
#[derive(Serialize, Deserialize)]
struct SpanWire {
    fleet: String,
    last_seen: i64,
    dedup: DedupSet,
    names: Vec<String>,
    windows: Vec<(i64, Vec<(u32, MetricWire)>)>,
}

#[derive(Serialize, Deserialize)]
enum MetricWire {
    One { offset: i64, value: f64 },
    Full { agg: WindowAgg, late_at: Vec<i64> },
}

/// [`SpanWire`] as it is written, borrowing from the span: encoding an item
/// happens at every flush of every span written, and serde's `into` would
/// clone the whole span first.
#[derive(Serialize)]
#[serde(rename = "SpanWire")]
struct SpanWireRef<'a> {
    fleet: &'a str,
    last_seen: i64,
    dedup: &'a DedupSet,
    names: &'a [&'a str],
    windows: WindowsWire<'a>,
}

/// A span's windows in [`SpanWire`]'s form, each metric by its index in
/// `names`.
struct WindowsWire<'a> {
    windows: &'a [Arc<SpanWindow>],
    names: &'a [&'a str],
}

struct WindowWire<'a> {
    window: &'a SpanWindow,
    names: &'a [&'a str],
}

#[derive(Serialize)]
#[serde(rename = "MetricWire")]
enum MetricWireRef<'a> {
    One {
        offset: i64,
        value: f64,
    },
    Full {
        agg: &'a WindowAgg,
        late_at: &'a [i64],
    },
}

impl Serialize for SpanState {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // Names in order of first appearance, as `SpanWire` lists them.
        let mut names: Vec<&str> = Vec::new();
        for m in self.windows.iter().flat_map(|w| &w.metrics) {
            if !names.contains(&m.metric.as_str()) {
                names.push(&m.metric);
            }
        }
        SpanWireRef {
            fleet: &self.fleet,
            last_seen: self.last_seen,
            dedup: &self.dedup,
            names: &names,
            windows: WindowsWire {
                windows: &self.windows,
                names: &names,
            },
        }
        .serialize(serializer)
    }
}

impl Serialize for WindowsWire<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.windows.iter().map(|w| {
            (
                w.start,
                WindowWire {
                    window: w,
                    names: self.names,
                },
            )
        }))
    }
}

impl Serialize for WindowWire<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let start = self.window.start;
        serializer.collect_seq(self.window.metrics.iter().map(|m| {
            // Every metric's name is in `names`: they were gathered from
            // these windows.
            let index = self
                .names
                .iter()
                .position(|n| *n == m.metric)
                .unwrap_or_default() as u32;
            let one = m.agg.count == 1 && m.agg.revision == 0 && m.late_at.is_empty();
            let wire = if one {
                MetricWireRef::One {
                    offset: m.agg.first.ts - start,
                    value: m.agg.first.value,
                }
            } else {
                MetricWireRef::Full {
                    agg: &m.agg,
                    late_at: &m.late_at,
                }
            };
            (index, wire)
        }))
    }
}

impl From<SpanWire> for SpanState {
    fn from(w: SpanWire) -> Self {
        let windows = w
            .windows
            .into_iter()
            .map(|(start, metrics)| {
                Arc::new(SpanWindow {
                    start,
                    metrics: metrics
                        .into_iter()
                        .map(|(index, m)| {
                            // An index past the names is a corrupt item; an
                            // empty name keeps it visible rather than panic.
                            let metric = w.names.get(index as usize).cloned().unwrap_or_default();
                            match m {
                                MetricWire::One { offset, value } => {
                                    let mut agg = WindowAgg::default();
                                    agg.add(start + offset, value, false);
                                    MetricWindow {
                                        metric,
                                        agg,
                                        late_at: Vec::new(),
                                    }
                                }
                                MetricWire::Full { agg, late_at } => MetricWindow {
                                    metric,
                                    agg,
                                    late_at,
                                },
                            }
                        })
                        .collect(),
                })
            })
            .collect();
        SpanState {
            fleet: w.fleet,
            last_seen: w.last_seen,
            dedup: w.dedup,
            windows,
        }
    }
}

impl SpanState {
    /// The window of `metric` starting at `start`, created empty if absent.
    pub fn window_mut(&mut self, start: i64, metric: &str) -> &mut MetricWindow {
        let w = match self.windows.binary_search_by_key(&start, |w| w.start) {
            Ok(i) => i,
            Err(i) => {
                self.windows.insert(
                    i,
                    Arc::new(SpanWindow {
                        start,
                        metrics: Vec::new(),
                    }),
                );
                i
            }
        };
        let metrics = &mut Arc::make_mut(&mut self.windows[w]).metrics;
        let m = match metrics.binary_search_by(|m| m.metric.as_str().cmp(metric)) {
            Ok(i) => i,
            Err(i) => {
                metrics.insert(
                    i,
                    MetricWindow {
                        metric: metric.to_string(),
                        agg: WindowAgg::default(),
                        late_at: Vec::new(),
                    },
                );
                i
            }
        };
        &mut metrics[m]
    }
}

/// A device's coarser window: one aggregate per metric, sorted by name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricWindows {
    pub metrics: Vec<(String, WindowAgg)>,
}

/// A device's entry in its fleet's device list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberState {
    pub last_seen: i64,
}

/// A device's entry in its fleet's list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetMember {
    /// The latest `received_at` of a reading, as of the device's latest
    /// span start (0 if it has sent none): the member row is written when a
    /// device starts a span, not per reading, so readings since live in the
    /// device's latest span.
    pub last_seen: i64,
    /// The latest connect or disconnect by event time.
    pub presence: Option<PresenceMark>,
}

/// A device's latest presence event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceMark {
    /// When it happened (the event's own time), ms since the epoch.
    pub at: i64,
    pub event: PresenceEvent,
}

impl FleetMember {
    /// Keeps `event` if it is at least as recent as the one held: by event
    /// time, and by stream order between equal times. Applying the same
    /// event twice changes nothing.
    pub fn observe_presence(&mut self, at: i64, event: &PresenceEvent) {
        if self.presence.as_ref().is_none_or(|p| at >= p.at) {
            self.presence = Some(PresenceMark {
                at,
                event: event.clone(),
            });
        }
    }
}

impl From<MemberState> for FleetMember {
    fn from(m: MemberState) -> Self {
        FleetMember {
            last_seen: m.last_seen,
            presence: None,
        }
    }
}

/// A refused message or reading, kept for a person to inspect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub received_at: i64,
    pub reason: RejectReason,
    pub detail: String,
    pub topic: Option<String>,
    pub client_id: Option<String>,
    pub device_id: Option<String>,
    pub fleet: Option<String>,
    /// The start of the refused payload or record (at most 1 KiB).
    pub payload_head: Vec<u8>,
    pub payload_len: u64,
    /// Where the refusal sits in the stream.
    pub shard: String,
    pub seq: SeqNo,
}

impl DeadLetter {
    /// A dead letter that names no message: no topic, client, device or
    /// payload. Refusals that have them set the fields after.
    pub fn new(
        received_at: i64,
        reason: RejectReason,
        detail: String,
        shard: String,
        seq: SeqNo,
    ) -> Self {
        DeadLetter {
            received_at,
            reason,
            detail,
            topic: None,
            client_id: None,
            device_id: None,
            fleet: None,
            payload_head: Vec::new(),
            payload_len: 0,
            shard,
            seq,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_set_collapses_ranges() {
        let mut d = DedupSet::default();
        for s in [5, 3, 4, 10, 6, 8, 9, 7, 0, u64::MAX] {
            assert!(d.insert(ReadingId::Seq(s)), "{s}");
        }
        assert_eq!(d.seq_ranges, vec![(0, 0), (3, 10), (u64::MAX, u64::MAX)]);
        for s in [0, 3, 7, 10, u64::MAX] {
            assert!(d.contains(ReadingId::Seq(s)));
            assert!(!d.insert(ReadingId::Seq(s)));
        }
        for s in [1, 2, 11, u64::MAX - 1] {
            assert!(!d.contains(ReadingId::Seq(s)));
        }
        assert!(d.insert(ReadingId::Ts(3)));
        assert!(!d.contains(ReadingId::Ts(4)));
        assert!(!d.insert(ReadingId::Ts(3)));
        assert_eq!(d.len(), 11);
    }

    #[test]
    fn dedup_set_agrees_with_a_plain_set() {
        let mut d = DedupSet::default();
        let mut plain = std::collections::BTreeSet::new();
        let mut x: u64 = 12345;
        for _ in 0..5000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let s = (x >> 33) % 700;
            assert_eq!(d.insert(ReadingId::Seq(s)), plain.insert(s));
        }
        for s in 0..800 {
            assert_eq!(d.contains(ReadingId::Seq(s)), plain.contains(&s));
        }
    }

    #[test]
    fn applied_marks_per_shard() {
        let mut a = AppliedMarks::default();
        let n = SeqNo::from;
        assert!(!a.contains("s0", n(0u64)));
        a.advance("s0", n(10u64));
        a.advance("s0", n(4u64));
        assert!(a.contains("s0", n(10u64)));
        assert!(!a.contains("s0", n(11u64)));
        assert!(!a.contains("s1", n(1u64)));
    }

    /// A quiet device's full span (ten one-minute windows of one reading,
    /// three metrics) fits one DynamoDB write unit with its keys.
    #[test]
    fn a_quiet_devices_span_fits_one_write_unit() {
        let mut span = SpanState {
            fleet: "fleet-0001".into(),
            last_seen: 1_764_240_599_000,
            ..SpanState::default()
        };
        for i in 0..10 {
            let start = 1_764_240_000_000 + i * 60_000;
            span.dedup.insert(ReadingId::Seq(1000 + i as u64));
            for m in ["temperature", "humidity", "pressure"] {
                span.window_mut(start, m)
                    .agg
                    .add(start + 17_345, 1013.25 + i as f64 / 7.0, false);
            }
        }
        let mut item = Item::default();
        item.applied
            .advance("shard-0003", SeqNo::from(123_456_789u64));
        item.state = ItemState::Span(span.clone());
        let bytes = item.encode();
        // The key (`s|device`, 15-digit sk) and DynamoDB's attribute names
        // take about 60 more.
        assert!(bytes.len() + 60 <= 1024, "{} bytes", bytes.len());
        let ItemState::Span(back) = Item::decode(&bytes).unwrap().state else {
            panic!("not a span")
        };
        assert_eq!(back, span);
    }

    #[test]
    fn a_single_value_window_is_stored_small() {
        let mut one = SpanState::default();
        one.window_mut(0, "temperature").agg.add(5, 21.5, false);
        let mut full = one.clone();
        full.window_mut(0, "temperature").agg.add(6, 21.5, false);
        let small = Item {
            state: ItemState::Span(one),
            ..Item::default()
        }
        .encode()
        .len();
        let big = Item {
            state: ItemState::Span(full),
            ..Item::default()
        }
        .encode()
        .len();
        assert!(small * 2 < big, "{small} vs {big}");
    }

    /// The span as the owned form wrote it before it was written borrowed.
    fn owned_wire(s: SpanState) -> SpanWire {
        let mut names: Vec<String> = Vec::new();
        let windows = s
            .windows
            .into_iter()
            .map(Arc::unwrap_or_clone)
            .map(|w| {
                let metrics = w
                    .metrics
                    .into_iter()
                    .map(|m| {
                        let index = match names.iter().position(|n| *n == m.metric) {
                            Some(i) => i,
                            None => {
                                names.push(m.metric);
                                names.len() - 1
                            }
                        };
                        let one = m.agg.count == 1 && m.agg.revision == 0 && m.late_at.is_empty();
                        let wire = if one {
                            MetricWire::One {
                                offset: m.agg.first.ts - w.start,
                                value: m.agg.first.value,
                            }
                        } else {
                            MetricWire::Full {
                                agg: m.agg,
                                late_at: m.late_at,
                            }
                        };
                        (index as u32, wire)
                    })
                    .collect();
                (w.start, metrics)
            })
            .collect();
        SpanWire {
            fleet: s.fleet,
            last_seen: s.last_seen,
            dedup: s.dedup,
            names,
            windows,
        }
    }

    #[test]
    fn spans_are_written_as_the_owned_form_wrote_them() {
        // Metrics in a different order per window, a window of one value, a
        // full one and one with a late reading: every branch of the form.
        let mut span = SpanState {
            fleet: "f".into(),
            last_seen: 99,
            ..SpanState::default()
        };
        span.dedup.insert(ReadingId::Seq(4));
        span.window_mut(60_000, "t").agg.add(60_001, 2.5, false);
        span.window_mut(0, "h").agg.add(5, 1.0, false);
        span.window_mut(0, "h").agg.add(6, 3.0, false);
        span.window_mut(0, "t").agg.add(7, 4.0, true);
        span.window_mut(0, "t").late_at.push(70_000);
        span.window_mut(120_000, "p").agg.add(120_009, -1.0, false);
        for state in [span, SpanState::default()] {
            let new = postcard::to_allocvec(&state).unwrap();
            let old = postcard::to_allocvec(&owned_wire(state.clone())).unwrap();
            assert_eq!(new, old);
            assert_eq!(postcard::from_bytes::<SpanState>(&new).unwrap(), state);
        }
    }

    #[test]
    fn member_rows_of_either_shape_read_back() {
        let old = Item {
            state: ItemState::Member(MemberState { last_seen: 5 }),
            ..Item::default()
        };
        let ItemState::Member(m) = Item::decode(&old.encode()).unwrap().state else {
            panic!("not a member")
        };
        let mut member = FleetMember::from(m);
        assert_eq!(member.last_seen, 5);
        let lost = PresenceEvent::Disconnected {
            reason: "CONNECTION_LOST".into(),
        };
        member.observe_presence(20, &lost);
        // An older event arriving later changes nothing; a newer one wins.
        member.observe_presence(10, &PresenceEvent::Connected);
        assert_eq!(member.presence.as_ref().unwrap().event, lost);
        member.observe_presence(30, &PresenceEvent::Connected);
        let new = Item {
            state: ItemState::FleetMember(member.clone()),
            ..Item::default()
        };
        let ItemState::FleetMember(back) = Item::decode(&new.encode()).unwrap().state else {
            panic!("not a fleet member")
        };
        assert_eq!(back, member);
        assert_eq!(back.presence.unwrap().at, 30);
    }

    #[test]
    fn latest_only_moves_forward() {
        let mut d = DeviceState::default();
        d.observe("t", Point { ts: 10, value: 1.0 });
        d.observe("t", Point { ts: 5, value: 9.0 });
        d.observe("a", Point { ts: 1, value: 2.0 });
        assert_eq!(d.latest[0].0, "a");
        assert_eq!(d.latest[1].1, Point { ts: 10, value: 1.0 });
    }

    #[test]
    fn items_round_trip() {
        let mut item = Item::default();
        item.applied.advance("shard-0", SeqNo::from(77u64));
        let mut set = DedupSet::default();
        set.insert(ReadingId::Seq(1));
        let mut span = SpanState {
            dedup: set.clone(),
            ..SpanState::default()
        };
        span.window_mut(60_000, "t").agg.add(60_001, 2.5, false);
        let full = span.window_mut(0, "t");
        full.agg.add(1, 1.0, true);
        full.late_at.push(70_000);
        item.state = ItemState::Span(span.clone());
        let back = Item::decode(&item.encode()).unwrap();
        assert_eq!(back.applied, item.applied);
        let ItemState::Span(got) = back.state else {
            panic!("not a span")
        };
        assert_eq!(got.dedup, set);
        assert_eq!(got.windows.len(), 2);
        assert_eq!(got.windows[1].metrics[0].agg.first.value, 2.5);
        assert_eq!(got.windows[0].metrics[0].late_at, vec![70_000]);
        assert!(Item::decode(&[]).is_err());
        assert!(Item::decode(&[9, 0]).is_err());
    }
}

/// One alert: what fired. The key (rule, window start, revision) makes it
/// one item per revision however often the window is evaluated; its
/// delivery is recorded beside it ([`ItemState::AlertDelivered`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertState {
    pub rule: String,
    pub fleet: String,
    /// The device, for a rule on one device's windows.
    pub device: Option<String>,
    pub metric: String,
    /// The window's resolution, as written (`1m`).
    pub resolution: String,
    pub aggregate: String,
    /// `>`, `>=`, `<` or `<=`.
    pub comparison: String,
    pub threshold: f64,
    pub window_start: i64,
    pub window_end: i64,
    pub revision: u64,
    pub value: f64,
    pub late_count: u64,
    /// When the evaluator first found it, ms since the epoch.
    pub fired_at: i64,
}
