//! Compacting the pending windows of a device that stopped publishing.
//!
//! A device's coarser windows are compacted by its own next batch that
//! starts a span (see [`crate::aggregate`]). A device that goes quiet has no
//! such batch, and its last windows would stay pending: merged from spans by
//! the API for as long as spans are kept, then gone. A shell's periodic
//! sweep finds such devices and calls these two steps around a load, with
//! the same compaction the batch uses.

use schemas::state::{DeviceState, Item, ItemState, SpanState};

use crate::aggregate::{ApplyError, Expiry};
use crate::commit::{Commit, Condition, LoadedItem, Write};
use crate::config::AggregateConfig;
use crate::keys::ItemKey;
use crate::span;

/// The pending windows of `state` that can no longer change at `watermark`.
fn final_windows(state: &DeviceState, watermark: i64, config: &AggregateConfig) -> Vec<(i64, i64)> {
    state
        .pending
        .iter()
        .copied()
        .filter(|(res_ms, start)| config.is_final(start.saturating_add(*res_ms), watermark))
        .collect()
}

/// The items a sweep of `device` needs: for each pending window that can no
/// longer change, its spans and its compacted item. Empty if there is
/// nothing to compact.
pub fn sweep_keys(
    device: &str,
    state: &DeviceState,
    watermark: i64,
    config: &AggregateConfig,
) -> Vec<ItemKey> {
    let mut keys = Vec::new();
    for (res_ms, start) in final_windows(state, watermark, config) {
        keys.extend(config.spans_of(res_ms, start).map(|start| ItemKey::Span {
            device: device.to_string(),
            start,
        }));
        if let Some(res) = config.resolutions[1..].iter().find(|r| r.ms() == res_ms) {
            keys.push(ItemKey::DeviceWindow {
                device: device.to_string(),
                res: *res,
                start,
            });
        }
    }
    keys
}

/// The writes that compact what [`sweep_keys`] listed: each compacted
/// window (conditional on what was loaded), then the device item without
/// those windows (conditional on its version, so a batch of the device
/// that wrote meanwhile wins and the sweep tries again later).
pub fn sweep(
    device: &str,
    stored: &LoadedItem,
    watermark: i64,
    keys: &[ItemKey],
    loaded: Vec<Option<LoadedItem>>,
    config: &AggregateConfig,
) -> Result<Option<Commit>, ApplyError> {
    let unreadable = |key: &ItemKey, detail: String| ApplyError::Unreadable {
        key: format!("{}/{}", key.pk(), key.sk()),
        detail,
    };
    let device_key = ItemKey::Device {
        device: device.to_string(),
    };
    let ItemState::Device(state) = &stored.item.state else {
        return Err(unreadable(&device_key, "expected a device".into()));
    };
    if loaded.len() != keys.len() {
        return Err(ApplyError::LoadedCount {
            loaded: loaded.len(),
            keys: keys.len(),
        });
    }
    let windows = final_windows(state, watermark, config);
    if windows.is_empty() {
        return Ok(None);
    }
    let mut device = state.clone();
    let mut commit = Commit::default();
    let expiry = Expiry::new(config);
    for (res_ms, start) in windows {
        let mut spans: Vec<SpanState> = Vec::new();
        let mut out: Option<(&ItemKey, &Option<LoadedItem>)> = None;
        for (key, item) in keys.iter().zip(&loaded) {
            match key {
                ItemKey::Span { start: s, .. } if *s >= start && *s < start + res_ms => {
                    match item.as_ref().map(|i| &i.item.state) {
                        None | Some(ItemState::Empty) => {}
                        Some(ItemState::Span(span)) => spans.push(span.clone()),
                        Some(_) => return Err(unreadable(key, "expected a span".into())),
                    }
                }
                ItemKey::DeviceWindow { res, start: s, .. }
                    if res.ms() == res_ms && *s == start =>
                {
                    out = Some((key, item));
                }
                _ => {}
            }
        }
        let merged = span::coarse_window(res_ms, start, &spans);
        if let Some((key, current)) = out
            && !merged.metrics.is_empty()
        {
            let same = matches!(
                current.as_ref().map(|c| &c.item.state),
                Some(ItemState::Windows(w)) if *w == merged
            );
            if !same {
                commit.writes.push(Write {
                    key: key.clone(),
                    condition: current
                        .as_ref()
                        .map_or(Condition::Absent, |c| Condition::Version(c.version)),
                    item: Item {
                        applied: current
                            .as_ref()
                            .map(|c| c.item.applied.clone())
                            .unwrap_or_default(),
                        state: ItemState::Windows(merged.clone()),
                    },
                    expires_at: expiry.of(key),
                });
            }
        }
        span::settle(&mut device, (res_ms, start), &spans, &merged);
    }
    commit.then.push(Write {
        key: device_key,
        condition: Condition::Version(stored.version),
        item: Item {
            applied: stored.item.applied.clone(),
            state: ItemState::Device(device),
        },
        expires_at: None,
    });
    Ok(Some(commit))
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::Resolution;

    fn stored(state: ItemState) -> LoadedItem {
        LoadedItem {
            version: 3,
            item: Item {
                applied: Default::default(),
                state,
            },
        }
    }

    #[test]
    fn a_final_pending_hour_is_compacted_and_dropped_from_the_device() {
        let config = AggregateConfig::default();
        let hour = Resolution::HOUR;
        let h0 = 1_764_237_600_000;
        let device = DeviceState {
            pending: vec![(hour, h0), (Resolution::DAY, 1_764_201_600_000)],
            ..DeviceState::default()
        };
        let mut span = SpanState::default();
        span.window_mut(h0, "t").agg.add(h0 + 5, 2.0, false);
        // Not final yet: nothing to do.
        let early = h0 + hour + config.allowed_lateness_ms - 1;
        assert!(sweep_keys("d", &device, early, &config).is_empty());
        let watermark = h0 + hour + config.allowed_lateness_ms;
        let keys = sweep_keys("d", &device, watermark, &config);
        assert_eq!(keys.len(), 7, "six spans and the hour");
        let loaded = keys
            .iter()
            .map(|k| match k {
                ItemKey::Span { start, .. } if *start == h0 => {
                    Some(stored(ItemState::Span(span.clone())))
                }
                _ => None,
            })
            .collect();
        let d = stored(ItemState::Device(device));
        let commit = sweep("d", &d, watermark, &keys, loaded, &config)
            .unwrap()
            .unwrap();
        assert_eq!(commit.writes.len(), 1);
        assert_eq!(commit.writes[0].condition, Condition::Absent);
        let ItemState::Windows(w) = &commit.writes[0].item.state else {
            panic!("not a window")
        };
        assert_eq!(w.metrics[0].1.sum, 2.0);
        let ItemState::Device(after) = &commit.then[0].item.state else {
            panic!("not a device")
        };
        assert_eq!(after.pending, vec![(Resolution::DAY, 1_764_201_600_000)]);
        assert_eq!(after.latest[0].1.value, 2.0);
        assert_eq!(commit.then[0].condition, Condition::Version(3));
    }
}
