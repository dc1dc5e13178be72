//! The rounds between plan and apply: each takes the items loaded for the
//! last and lists the next. After the first, the watermark refuses what it
//! has made final and the device items of devices that start a span are
//! listed; after those, what compacting each pending window needs.

use schemas::state::ItemState;

use super::plan::{Body, Plan};
use super::{ApplyError, Key, WATERMARK_SLOT, mismatch};
use crate::commit::LoadedItem;
use crate::config::AggregateConfig;

impl Plan<'_> {
    /// Takes the items of the last [`Plan::keys`], in order, and lists the
    /// next round's, if any.
    pub fn receive(
        &mut self,
        loaded: Vec<Option<LoadedItem>>,
        config: &AggregateConfig,
    ) -> Result<(), ApplyError> {
        let wanted = self.keys().len();
        if loaded.len() != wanted {
            return Err(ApplyError::LoadedCount {
                loaded: loaded.len(),
                keys: wanted,
            });
        }
        self.loaded.extend(loaded);
        while self.keys().is_empty() && self.rounds < 2 {
            let from = self.keys.len();
            match self.rounds {
                0 => {
                    self.after_first_round(config)?;
                    self.list_presence_devices();
                }
                _ => {
                    self.plan_compactions(config)?;
                    self.resolve_presence_fleets()?;
                }
            }
            self.rounds += 1;
            self.extend_keys(from);
        }
        Ok(())
    }

    /// Reads the watermark, refuses what it has made final, and lists the
    /// device items (and fleet entries) of devices that start a span.
    fn after_first_round(&mut self, config: &AggregateConfig) -> Result<(), ApplyError> {
        self.loaded_watermark = match self.loaded[WATERMARK_SLOT as usize]
            .as_ref()
            .map(|s| &s.item.state)
        {
            None | Some(ItemState::Empty) => None,
            Some(ItemState::Watermark(w)) => Some(*w),
            Some(other) => return Err(self.unreadable(WATERMARK_SLOT, "watermark", other)),
        };
        let from_records = self
            .min_received
            .map(|m| m.saturating_sub(config.watermark_slack_ms));
        self.watermark = self.loaded_watermark.max(from_records).unwrap_or(i64::MIN);
        self.refuse_final(self.watermark, config);
        let (new_span, replayed) = self.devices_to_load();
        for (dev, fleet) in self.devices_seen.clone() {
            if new_span.contains(&dev) || replayed.contains(&dev) {
                let slot = self.add_key(Key::Device { dev });
                self.device_slots.push((dev, slot));
            }
            if new_span.contains(&dev) {
                let slot = self.add_key(Key::Member { fleet, dev });
                self.members.push((dev, slot));
            }
        }
        Ok(())
    }

    /// Lists the device item of each presence record that names no fleet:
    /// the item holds the fleet the device publishes in.
    fn list_presence_devices(&mut self) {
        for index in 0..self.records.len() {
            let Body::Presence {
                presence,
                member: None,
            } = &self.records[index].body
            else {
                continue;
            };
            let dev = self.devices.id(&presence.device_id);
            let slot = self.add_key(Key::Device { dev });
            self.presence_fleets.push((index, dev, slot));
        }
    }

    /// Lists the member row of each presence record whose fleet its device
    /// item names. A device with no item has sent no accepted reading, so no
    /// fleet lists it, and its presence has nowhere to go: once it publishes,
    /// its readings list it, online.
    fn resolve_presence_fleets(&mut self) -> Result<(), ApplyError> {
        for (index, dev, slot) in std::mem::take(&mut self.presence_fleets) {
            let fleet = match self.loaded[slot as usize].as_ref().map(|s| &s.item.state) {
                None | Some(ItemState::Empty) => continue,
                Some(ItemState::Device(d)) => self.fleets.id(&d.fleet),
                Some(other) => return Err(self.unreadable(slot, "device", other)),
            };
            let member = self.add_key(Key::Member { fleet, dev });
            if let Body::Presence { member: m, .. } = &mut self.records[index].body {
                *m = Some(member);
            }
        }
        Ok(())
    }

    /// Devices with an accepted reading in a span not stored yet, and
    /// devices whose spans already hold a record of this batch (a replay:
    /// their device item may have missed what the span holds). A device
    /// whose spans all exist and hold none of the batch has every window
    /// of the batch pending already, so its item is neither read nor
    /// written.
    fn devices_to_load(&self) -> (rustc_hash::FxHashSet<u32>, rustc_hash::FxHashSet<u32>) {
        let mut new_span = rustc_hash::FxHashSet::with_capacity_and_hasher(
            self.devices_seen.len(),
            Default::default(),
        );
        let mut replayed = rustc_hash::FxHashSet::default();
        for record in &self.records {
            let Body::Readings {
                dev,
                spans,
                refusals,
                ..
            } = &record.body
            else {
                continue;
            };
            for (span, v) in spans.iter().zip(refusals) {
                if v.is_some() {
                    continue;
                }
                match &self.loaded[*span as usize] {
                    None => {
                        new_span.insert(*dev);
                    }
                    Some(s) if s.item.applied.contains(&self.shard, record.seq) => {
                        replayed.insert(*dev);
                    }
                    Some(_) => {}
                }
            }
        }
        (new_span, replayed)
    }

    pub(super) fn unreadable(&self, slot: u32, expected: &str, found: &ItemState) -> ApplyError {
        let key = &self.keys[slot as usize];
        ApplyError::Unreadable {
            key: format!("{}/{}", key.pk(), key.sk()),
            detail: mismatch(expected, found),
        }
    }
}
