//! Compacting a device's coarser windows: once a pending window can no
//! longer change, the batch that loads its device item lists the window's
//! spans and writes the merged window once.

use schemas::SeqNo;
use schemas::state::ItemState;

use super::apply::Batcher;
use super::plan::Plan;
use super::{ApplyError, Key, mismatch};
use crate::config::AggregateConfig;
use crate::span;

/// A coarser window of one device to compact in this batch.
#[derive(Debug)]
pub(super) struct Compaction {
    pub(super) dev: u32,
    pub(super) res_ms: i64,
    pub(super) start: i64,
    /// The slots of every span the window covers.
    pub(super) spans: Vec<u32>,
    /// The slot of the compacted item; `None` for a unit that is not a
    /// stored resolution (the span itself, when there is one resolution).
    pub(super) out: Option<u32>,
}

impl Plan<'_> {
    /// Lists, for each loaded device item, the spans of every pending window
    /// that can no longer change, and its compacted item.
    pub(super) fn plan_compactions(&mut self, config: &AggregateConfig) -> Result<(), ApplyError> {
        for (dev, slot) in self.device_slots.clone() {
            let pending = match self.loaded[slot as usize].as_ref().map(|s| &s.item.state) {
                None | Some(ItemState::Empty) => Vec::new(),
                Some(ItemState::Device(d)) => d.pending.clone(),
                Some(other) => return Err(self.unreadable(slot, "device", other)),
            };
            for (res_ms, start) in pending {
                if !config.is_final(start.saturating_add(res_ms), self.watermark) {
                    continue;
                }
                let spans = config
                    .spans_of(res_ms, start)
                    .map(|start| self.add_key(Key::Span { dev, start }))
                    .collect();
                let out = config
                    .resolutions
                    .iter()
                    .position(|r| r.ms() == res_ms)
                    .filter(|i| *i > 0)
                    .map(|i| {
                        self.add_key(Key::DeviceWindow {
                            dev,
                            res: i as u8,
                            start,
                        })
                    });
                self.compactions.push(Compaction {
                    dev,
                    res_ms,
                    start,
                    spans,
                    out,
                });
            }
        }
        Ok(())
    }
}

impl Batcher<'_, '_> {
    /// Writes a device's coarser window that can no longer change, once, and
    /// moves what its spans say about the device's latest values into the
    /// device item.
    pub(super) fn compact(&mut self, c: &Compaction, seq: SeqNo) -> Result<(), ApplyError> {
        let mut spans = Vec::with_capacity(c.spans.len());
        for &slot in &c.spans {
            match &self.slots[slot as usize].item.state {
                ItemState::Empty => {}
                ItemState::Span(s) => spans.push(s.clone()),
                other => {
                    return Err(ApplyError::Unreadable {
                        key: self.key_name(slot as usize),
                        detail: mismatch("span", other),
                    });
                }
            }
        }
        let windows = span::coarse_window(c.res_ms, c.start, &spans);
        if let Some(out) = c.out
            && !windows.metrics.is_empty()
        {
            let compacted = windows.clone();
            self.touch(out as usize, seq, |state| {
                *state = ItemState::Windows(compacted);
                Ok(())
            })?;
        }
        let Some(&slot) = self.device_slot.get(&c.dev) else {
            return Err(ApplyError::Unplanned {
                key: format!("device {}", c.dev),
            });
        };
        let key = (c.res_ms, c.start);
        self.touch(slot as usize, seq, |state| {
            let ItemState::Device(d) = state else {
                return Err(mismatch("device", state));
            };
            span::settle(d, key, &spans, &windows);
            Ok(())
        })?;
        Ok(())
    }
}
