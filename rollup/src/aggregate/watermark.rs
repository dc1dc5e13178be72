//! The processed watermark of a shard with nothing to read.

use schemas::state::{Item, ItemState};

use super::{ApplyError, mismatch};
use crate::commit::{Condition, LoadedItem, Write};
use crate::config::AggregateConfig;
use crate::keys::ItemKey;

/// The watermark write of a shard that has nothing to read at `now`: every
/// record it will still deliver arrives after `now` less the slack, so
/// nothing below that can change through it. Without this an idle shard
/// would hold every fleet window short of final. `None` if it would not
/// move the watermark.
pub fn idle_watermark(
    shard: &str,
    loaded: Option<LoadedItem>,
    now: i64,
    config: &AggregateConfig,
) -> Result<Option<Write>, ApplyError> {
    let claim = now.saturating_sub(config.watermark_slack_ms);
    let (condition, mut item) = match loaded {
        Some(s) => (Condition::Version(s.version), s.item),
        None => (Condition::Absent, Item::default()),
    };
    match item.state {
        ItemState::Empty => {}
        ItemState::Watermark(w) if w < claim => {}
        ItemState::Watermark(_) => return Ok(None),
        ref other => {
            return Err(ApplyError::Unreadable {
                key: format!("{}/{shard}", crate::keys::WATERMARK_PK),
                detail: mismatch("watermark", other),
            });
        }
    }
    item.state = ItemState::Watermark(claim);
    Ok(Some(Write {
        key: ItemKey::Watermark {
            shard: shard.to_string(),
        },
        condition,
        item,
        expires_at: None,
    }))
}
