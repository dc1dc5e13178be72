//! The device item's bookkeeping: which coarser windows a device has
//! pending, and its entry in its fleet's member list.

use schemas::record::PackedView;
use schemas::state::{DeviceState, FleetMember, ItemState};
use schemas::{Presence, SeqNo};

use super::apply::Batcher;
use super::{ApplyError, mismatch};

impl Batcher<'_, '_> {
    /// Records in the device item each coarser window the reading enters,
    /// so that it is compacted once it can no longer change. Written only
    /// when the reading is the device's first in that window, which can
    /// only happen in a span new to this batch.
    pub(super) fn track_pending(
        &mut self,
        seq: SeqNo,
        r: &PackedView,
        ts: i64,
        dev: u32,
    ) -> Result<(), ApplyError> {
        // Not loaded: the reading's span existed before this batch, so its
        // windows are pending already (see `devices_to_load`).
        let Some(&slot) = self.device_slot.get(&dev) else {
            return Ok(());
        };
        let slot = slot as usize;
        let wanted: Vec<(i64, i64)> = self
            .units
            .iter()
            .map(|u| (*u, ts.div_euclid(*u) * u))
            .collect();
        let known = match &self.slots[slot].item.state {
            ItemState::Device(d) => {
                d.shard == self.plan.shard
                    && d.fleet == r.fleet
                    && wanted.iter().all(|w| d.pending.binary_search(w).is_ok())
            }
            _ => false,
        };
        if known {
            return Ok(());
        }
        let shard = &self.plan.shard;
        self.touch(slot, seq, |state| {
            if let ItemState::Empty = state {
                *state = ItemState::Device(DeviceState::default());
            }
            let ItemState::Device(d) = state else {
                return Err(mismatch("device", state));
            };
            if d.shard != *shard {
                d.shard = shard.clone();
            }
            if d.fleet != r.fleet {
                d.fleet = r.fleet.to_string();
            }
            for w in wanted {
                if let Err(i) = d.pending.binary_search(&w) {
                    d.pending.insert(i, w);
                }
            }
            Ok(())
        })?;
        Ok(())
    }

    /// Lists a device in its fleet when it starts a span: often enough for
    /// the list's `last_seen`, rarely enough not to cost a write per reading.
    pub(super) fn member(&mut self, dev: u32, slot: usize) -> Result<(), ApplyError> {
        let Some(&(received_at, seq)) = self.seen.get(&dev) else {
            return Ok(());
        };
        self.touch(slot, seq, |state| {
            let mut m = fleet_member(state)?;
            m.last_seen = m.last_seen.max(received_at);
            *state = ItemState::FleetMember(m);
            Ok(())
        })?;
        Ok(())
    }

    /// Folds a connect or disconnect into the device's member row; the
    /// latest by event time wins, so the order presence arrives in (IoT
    /// Core's lifecycle events may arrive out of order) does not matter.
    pub(super) fn presence(
        &mut self,
        seq: SeqNo,
        presence: &Presence,
        slot: Option<u32>,
    ) -> Result<(), ApplyError> {
        let Some(slot) = slot else {
            return Ok(());
        };
        self.touch(slot as usize, seq, |state| {
            let mut m = fleet_member(state)?;
            m.observe_presence(presence.at, &presence.event);
            *state = ItemState::FleetMember(m);
            Ok(())
        })?;
        Ok(())
    }
}

/// A member row as loaded, in its current shape.
fn fleet_member(state: &ItemState) -> Result<FleetMember, String> {
    match state {
        ItemState::Empty => Ok(FleetMember::default()),
        ItemState::Member(m) => Ok(m.clone().into()),
        ItemState::FleetMember(m) => Ok(m.clone()),
        other => Err(mismatch("fleet member", other)),
    }
}
