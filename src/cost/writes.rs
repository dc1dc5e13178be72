//! The rollup store's write pattern, per reading: which items a batch reads
//! and writes, how big they are, and so how many DynamoDB units they take.
//!
//! A device's readings land in span items (a run of finest windows holding
//! every metric and the span's dedup set); its coarse windows are written
//! once each, by compaction, when they can no longer change; a device item
//! (latest values, coarse windows not yet compacted) is read per batch and
//! written only when that list changes; a member item lists the device in
//! its fleet. Fleet windows, counters and the watermark are written per
//! batch and shared by all its readings.
//!
//! Item sizes are a rough model of the encoding: the byte constants below,
//! and a quantile sketch of about `min(n, 10 + 15 ln n)` bins for `n`
//! readings. They decide the units: a write takes one WRU per KB, a
//! strongly consistent read one RRU per 4 KB, each at least one. A device's
//! own items (spans, coarse windows, device and member items) are read
//! eventually consistent, at half a unit per 4 KB (the store reads strongly
//! only after a conflict), and the spans a compaction merges by one Query,
//! metered on their total size; fleet windows, counters and the watermark
//! are read strongly consistent, one item at a time.

/// Seconds of the finest, hourly and daily windows.
pub const FINEST_S: f64 = 60.0;
pub const HOUR_S: f64 = 3600.0;
pub const DAY_S: f64 = 86_400.0;

/// Keys, applied mark, dedup ranges, fleet and last-seen of an item.
const ITEM_FIXED_B: f64 = 60.0;
/// A finest window's header inside a span item.
const WINDOW_HEADER_B: f64 = 10.0;
/// A metric's name: once per span item (windows refer to it by index), once
/// per metric in other items.
const METRIC_NAME_B: f64 = 12.0;
/// A window's reference to its metric's name inside a span item.
const METRIC_INDEX_B: f64 = 1.0;
/// One reading's offset in its window and value: a finest window of a quiet
/// device, stored without the rest of an aggregate.
const SINGLE_VALUE_B: f64 = 12.0;
/// Count, sum, sum of squares, min, max, first, last, revision, ...
const AGGREGATE_B: f64 = 90.0;
const SKETCH_BIN_B: f64 = 3.0;
/// A coarse window the device item lists until it is compacted.
const OPEN_WINDOW_B: f64 = 16.0;
/// Open coarse windows a device item lists at once: this hour and day, and
/// the previous ones until their lateness has passed.
const OPEN_WINDOWS: f64 = 4.0;
/// DynamoDB bills this much storage per item on top of its attributes.
pub const ITEM_OVERHEAD_B: f64 = 100.0;
/// Counters (accepted, duplicate) and the shard's watermark.
const BATCH_BOOKKEEPING_ITEMS: f64 = 3.0;

/// What the store keeps and how a device reports.
#[derive(Debug, Clone)]
pub struct StoreShape {
    pub metrics: u64,
    /// Stored resolutions: 1 (finest only), 2 (and hours) or 3 (and days).
    pub resolutions: u64,
    pub fleets: u64,
    pub devices: u64,
    /// Seconds of a span; a multiple of the finest window.
    pub span_s: f64,
    /// Readings each device produces a second.
    pub readings_per_device_s: f64,
    /// Messages each device publishes a second.
    pub msgs_per_device_s: f64,
}

/// One shard's Lambda batch, on average.
#[derive(Debug, Clone, Copy)]
pub struct BatchShape {
    /// Seconds of stream one invocation of a shard covers.
    pub period_s: f64,
    /// Devices whose records go to the shard.
    pub devices: f64,
    /// Distinct devices among the batch's records.
    pub present: f64,
    pub records: f64,
    pub readings: f64,
}

/// Reads and writes of one kind of item, per reading.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemCost {
    pub item: &'static str,
    pub writes: f64,
    pub wru: f64,
    pub rru: f64,
    /// Average bytes the item has when written.
    pub bytes: f64,
}

/// Every item kind a reading costs, per reading.
#[derive(Debug, Clone, Default)]
pub struct WritePattern {
    pub items: Vec<ItemCost>,
}

impl WritePattern {
    /// Items written per reading.
    pub fn writes(&self) -> f64 {
        self.total(|i| i.writes)
    }

    pub fn wru(&self) -> f64 {
        self.total(|i| i.wru)
    }

    pub fn rru(&self) -> f64 {
        self.total(|i| i.rru)
    }

    // Folded from +0.0: an empty sum of floats is -0.0, printed "-0.000".
    fn total(&self, of: impl Fn(&ItemCost) -> f64) -> f64 {
        self.items.iter().map(of).fold(0.0, |a, b| a + b)
    }

    /// The same mix of items and sizes at `writes` items per reading: a
    /// measured figure in place of the modelled one.
    pub fn scaled_to(&self, writes: f64) -> WritePattern {
        let modelled = self.writes();
        let k = if modelled > 0.0 {
            writes / modelled
        } else {
            0.0
        };
        WritePattern {
            items: self
                .items
                .iter()
                .map(|i| ItemCost {
                    writes: i.writes * k,
                    wru: i.wru * k,
                    rru: i.rru * k,
                    ..i.clone()
                })
                .collect(),
        }
    }
}

/// Write units of one write of `bytes`.
pub fn wru(bytes: f64) -> f64 {
    (bytes / 1024.0).ceil().max(1.0)
}

/// Read units of one strongly consistent read of `bytes` (a missing item
/// still costs one).
pub fn rru(bytes: f64) -> f64 {
    (bytes / 4096.0).ceil().max(1.0)
}

/// Read units of one eventually consistent read of `bytes`, an item by
/// BatchGetItem or the items of one Query together: half the strong price.
pub fn rru_eventual(bytes: f64) -> f64 {
    rru(bytes) / 2.0
}

/// Sketch bins for `n` readings (rough).
fn bins(n: f64) -> f64 {
    let n = n.max(1.0);
    n.min(10.0 + 15.0 * n.ln())
}

/// A full aggregate of `n` readings of one metric.
fn aggregate_bytes(n: f64) -> f64 {
    AGGREGATE_B + SKETCH_BIN_B * bins(n)
}

/// Item sizes in bytes, at the store shape's rates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sizes {
    /// A span item once its span is over.
    pub span: f64,
    pub hour: f64,
    pub day: f64,
    pub device: f64,
    pub member: f64,
    /// A fleet window of each resolution, finest first.
    pub fleet: [f64; 3],
}

impl StoreShape {
    /// Of windows `len_s` long, the share that holds a reading of a device.
    fn filled(&self, len_s: f64) -> f64 {
        (self.readings_per_device_s * len_s).min(1.0)
    }

    /// A finest window's bytes per metric. A device of one reading a window
    /// stores it as it is; windows of a busier device hold a full aggregate
    /// (with `q` readings a window on average, `2 - q` of them hold one).
    fn finest_value_bytes(&self) -> f64 {
        let q = (self.readings_per_device_s * FINEST_S).max(1.0);
        let single = (2.0 - q).clamp(0.0, 1.0);
        single * SINGLE_VALUE_B + (1.0 - single) * aggregate_bytes(q.max(2.0))
    }

    /// A whole-metric-set item of `n` readings per metric (hours, days).
    fn coarse_bytes(&self, n: f64) -> f64 {
        ITEM_FIXED_B + self.metrics as f64 * (METRIC_NAME_B + aggregate_bytes(n))
    }

    pub fn sizes(&self) -> Sizes {
        let m = self.metrics as f64;
        let windows = (self.span_s / FINEST_S) * self.filled(FINEST_S);
        let window = WINDOW_HEADER_B + m * (METRIC_INDEX_B + self.finest_value_bytes());
        let per_fleet = self.devices as f64 / self.fleets.max(1) as f64;
        let fleet = |len_s: f64| {
            ITEM_FIXED_B + aggregate_bytes(per_fleet * self.readings_per_device_s * len_s)
        };
        Sizes {
            span: ITEM_FIXED_B + m * METRIC_NAME_B + windows * window,
            hour: self.coarse_bytes(self.readings_per_device_s * HOUR_S),
            day: self.coarse_bytes(self.readings_per_device_s * DAY_S),
            device: ITEM_FIXED_B
                + m * (METRIC_NAME_B + SINGLE_VALUE_B)
                + OPEN_WINDOWS * OPEN_WINDOW_B,
            member: ITEM_FIXED_B,
            fleet: [fleet(FINEST_S), fleet(HOUR_S), fleet(DAY_S)],
        }
    }

    /// Spans that hold a reading of a device, per reading.
    fn spans_per_reading(&self) -> f64 {
        self.filled(self.span_s) / self.span_s / self.readings_per_device_s
    }

    /// Distinct spans a device's readings in one batch fall in: its readings
    /// cover about `period (1 - 1/m)` of the batch's `m` messages, plus the
    /// time the readings of one message span.
    fn spans_per_device_batch(&self, b: &BatchShape) -> f64 {
        let msgs = (b.records / b.present).max(1.0);
        let per_msg = (b.readings / b.records).max(1.0);
        let mut range_s = b.period_s * (1.0 - 1.0 / msgs);
        if self.msgs_per_device_s > 0.0 {
            range_s += (1.0 - 1.0 / per_msg) / self.msgs_per_device_s;
        }
        (1.0 + range_s / self.span_s).min(msgs * per_msg)
    }
}

/// An item of one device that grows from `fixed` bytes to `full` over `n`
/// writes, each read first (eventually consistent): per write, its average
/// write units, read units and bytes.
fn growing_item(fixed: f64, full: f64, n: f64) -> (f64, f64, f64) {
    let n = n.round().clamp(1.0, 10_000.0) as u32;
    let at = |j: u32| fixed + (full - fixed) * f64::from(j) / f64::from(n);
    let (mut w, mut r, mut bytes) = (0.0, 0.0, 0.0);
    for j in 1..=n {
        w += wru(at(j));
        // The first read finds nothing, and still costs a (half) unit.
        r += rru_eventual(if j == 1 { 0.0 } else { at(j - 1) });
        bytes += at(j);
    }
    let n = f64::from(n);
    (w / n, r / n, bytes / n)
}

/// The write pattern of the store at this shape, per reading.
pub fn model(s: &StoreShape, b: &BatchShape) -> WritePattern {
    if s.readings_per_device_s <= 0.0 || b.readings <= 0.0 {
        return WritePattern::default();
    }
    let z = s.sizes();
    let mut items = span_items(s, b, &z);
    items.extend(device_items(s, b, &z));
    items.push(fleet_windows(s, b, &z));
    items.push(ItemCost::read_then_written(
        "counters, watermark",
        BATCH_BOOKKEEPING_ITEMS / b.readings,
        ITEM_FIXED_B,
    ));
    WritePattern { items }
}

impl ItemCost {
    /// `writes` writes per reading of an item of `bytes`, each read first,
    /// strongly consistent.
    fn read_then_written(item: &'static str, writes: f64, bytes: f64) -> ItemCost {
        ItemCost {
            item,
            writes,
            wru: writes * wru(bytes),
            rru: writes * rru(bytes),
            bytes,
        }
    }

    /// The same for an item of one device: read eventually consistent.
    fn device_read_then_written(item: &'static str, writes: f64, bytes: f64) -> ItemCost {
        ItemCost {
            rru: writes * rru_eventual(bytes),
            ..ItemCost::read_then_written(item, writes, bytes)
        }
    }
}

/// Span items, one write per distinct span per device and batch, and the
/// member item written with each new span; each read first.
fn span_items(s: &StoreShape, b: &BatchShape, z: &Sizes) -> Vec<ItemCost> {
    let span_writes = b.present * s.spans_per_device_batch(b) / b.readings;
    let spans = s.spans_per_reading();
    // A span is written `span_writes / spans` times over its life, growing.
    let (w, r, bytes) = growing_item(ITEM_FIXED_B, z.span, span_writes / spans);
    vec![
        ItemCost {
            item: "span items",
            writes: span_writes,
            wru: span_writes * w,
            rru: span_writes * r,
            bytes,
        },
        ItemCost::device_read_then_written("member items", spans, z.member),
    ]
}

/// The device item, and the hours and days compacted from its spans.
fn device_items(s: &StoreShape, b: &BatchShape, z: &Sizes) -> Vec<ItemCost> {
    let rho = s.readings_per_device_s;
    // Coarse windows a device opens and compacts, per reading.
    let hours = if s.resolutions >= 2 {
        s.filled(HOUR_S) / HOUR_S / rho
    } else {
        0.0
    };
    let days = if s.resolutions >= 3 {
        s.filled(DAY_S) / DAY_S / rho
    } else {
        0.0
    };
    // Read only by a batch that starts one of the device's spans (its other
    // spans' windows are pending already); written on entering a new hour
    // (a new day always enters a new hour too) and on each compaction.
    let device_writes = hours + hours + days;
    let starts = s.spans_per_reading().min(b.present / b.readings);
    let mut items = vec![ItemCost {
        item: "device item",
        writes: device_writes,
        wru: device_writes * wru(z.device),
        rru: starts * rru_eventual(z.device),
        bytes: z.device,
    }];
    // A compaction reads the spans it merges by one Query, metered on their
    // total size.
    let spans_in = |len_s: f64| len_s / s.span_s * s.filled(s.span_s) * z.span;
    // Each hour reads the hour's span items and writes one item; a day is
    // compacted from its spans too, as the API merges it.
    for (item, count, bytes, len_s) in [
        ("hour items (compaction)", hours, z.hour, HOUR_S),
        ("day items (compaction)", days, z.day, DAY_S),
    ] {
        if count > 0.0 {
            items.push(ItemCost {
                item,
                writes: count,
                wru: count * wru(bytes),
                rru: count * rru_eventual(spans_in(len_s)),
                bytes,
            });
        }
    }
    items
}

/// Fleet windows, as before the reshaping: every batch rewrites each fleet
/// window its readings fall in, for every metric and resolution.
fn fleet_windows(s: &StoreShape, b: &BatchShape, z: &Sizes) -> ItemCost {
    let fleets = s.fleets.max(1) as f64;
    // Distinct fleets among the batch's devices.
    let touched = fleets * (1.0 - (1.0 - 1.0 / fleets).powf(b.present));
    let resolutions = s.resolutions.clamp(1, 3) as usize;
    let per = touched * s.metrics as f64 / b.readings;
    let sizes = &z.fleet[..resolutions];
    ItemCost {
        item: "fleet windows",
        writes: per * resolutions as f64,
        wru: per * sizes.iter().map(|&x| wru(x)).sum::<f64>(),
        rru: per * sizes.iter().map(|&x| rru(x)).sum::<f64>(),
        bytes: sizes.iter().sum::<f64>() / resolutions as f64,
    }
}

/// How long each kind of item is kept, in seconds.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub span_s: f64,
    pub hour_s: f64,
    pub day_s: f64,
    /// Which of 1m, 1h, 1d are kept forever: their figure above is the
    /// horizon the bill is priced at.
    pub forever: [bool; 3],
}

impl Retention {
    /// Reads a retention per resolution as the config file's
    /// `aggregate.retention` writes it (`1m=30d,1h=400d,1d=forever`) for the
    /// first `levels` of 1m, 1h, 1d. `forever` is priced at what accumulates
    /// over `forever_horizon_s`; a level not stored holds nothing.
    pub fn parse(text: &str, levels: u64, forever_horizon_s: f64) -> Result<Self, String> {
        let stored = &schemas::Resolution::DEFAULTS[..levels.clamp(1, 3) as usize];
        let keep = rollup::config::parse_retention(text, stored)?;
        let secs = |i: usize| match keep.get(i).copied() {
            Some(Some(ms)) => ms as f64 / 1000.0,
            Some(None) => forever_horizon_s,
            None => 0.0,
        };
        Ok(Retention {
            span_s: secs(0),
            hour_s: secs(1),
            day_s: secs(2),
            forever: [0, 1, 2].map(|i| keep.get(i) == Some(&None)),
        })
    }
}

/// Bytes the table holds once every retention is full, DynamoDB's
/// per-item overhead included.
pub fn stored_bytes(s: &StoreShape, keep: &Retention) -> f64 {
    if s.readings_per_device_s <= 0.0 {
        return 0.0;
    }
    let z = s.sizes();
    let with = |bytes: f64| bytes + ITEM_OVERHEAD_B;
    let levels = s.resolutions.clamp(1, 3);
    let mut per_device = with(z.device) + with(z.member);
    per_device += keep.span_s * s.filled(s.span_s) / s.span_s * with(z.span);
    let mut per_fleet_metric = keep.span_s / FINEST_S * with(z.fleet[0]);
    if levels >= 2 {
        per_device += keep.hour_s * s.filled(HOUR_S) / HOUR_S * with(z.hour);
        per_fleet_metric += keep.hour_s / HOUR_S * with(z.fleet[1]);
    }
    if levels >= 3 {
        per_device += keep.day_s * s.filled(DAY_S) / DAY_S * with(z.day);
        per_fleet_metric += keep.day_s / DAY_S * with(z.fleet[2]);
    }
    s.devices as f64 * per_device + (s.fleets * s.metrics) as f64 * per_fleet_metric
}
