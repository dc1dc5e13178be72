//! The layout a store's items are written with, which every process that
//! writes or reads the store must share.
//!
//! A span item's key holds its span's start, and a reading finds its dedup
//! set by it: a processor that cut spans another way would look for a
//! duplicate in an item that does not hold it and count it twice, and a
//! query would merge the wrong items. The first process to open a store
//! records its layout (`ItemKey::Layout`); every later one compares and
//! refuses the store on a difference, before it reads or writes anything
//! else.

use rollup::keys::ItemKey;
use rollup::{AggregateConfig, Commit, Condition, Write};
use schemas::state::{Item, ItemState, StoreLayout};

use super::{RollupQuery, RollupStore, StoreError, watermarks};

/// Checks `config`'s layout against the one `query`'s store recorded, and
/// passes a store that has recorded none: for a process that only reads,
/// such as the query function, whose role may not write. A reader of a
/// store nobody has written yet has nothing to misread.
pub async fn check(query: &dyn RollupQuery, config: &AggregateConfig) -> Result<(), StoreError> {
    let key = ItemKey::Layout;
    match query.get(&key.pk(), &key.sk()).await? {
        Some(item) => recorded(item.state, &config.layout()),
        None => Ok(()),
    }
}

/// Records `config`'s layout in a store that has none, or checks it against
/// the one recorded. A store with processed records but no layout was
/// written before layouts were recorded, by builds whose span was always
/// the default one: that is the layout it gets.
pub async fn ensure(
    writer: &dyn RollupStore,
    query: &dyn RollupQuery,
    config: &AggregateConfig,
) -> Result<(), StoreError> {
    let want = config.layout();
    // Two processes opening a new store at once: one write wins, the other
    // conflicts and compares with it on its next turn.
    for _ in 0..3 {
        if let Some(loaded) = writer.load(&[ItemKey::Layout]).await?.pop().flatten() {
            return recorded(loaded.item.state, &want);
        }
        let first = match watermarks(query).await?.is_empty() {
            true => want.clone(),
            false => AggregateConfig {
                span: None,
                ..config.clone()
            }
            .layout(),
        };
        let commit = Commit {
            writes: vec![Write {
                key: ItemKey::Layout,
                condition: Condition::Absent,
                item: Item {
                    applied: Default::default(),
                    state: ItemState::Layout(first.clone()),
                },
                expires_at: None,
            }],
            then: Vec::new(),
        };
        match writer.commit(commit).await {
            Ok(()) => return agree(&first, &want),
            Err(StoreError::Conflict(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::Conflict(
        "the store's layout kept changing while it was read".into(),
    ))
}

/// Whether the recorded layout item `state` is `want`.
fn recorded(state: ItemState, want: &StoreLayout) -> Result<(), StoreError> {
    match state {
        ItemState::Layout(have) => agree(&have, want),
        other => Err(StoreError::Corrupt {
            key: "layout".into(),
            detail: format!("holds {other:?}"),
        }),
    }
}

fn agree(have: &StoreLayout, want: &StoreLayout) -> Result<(), StoreError> {
    if have == want {
        return Ok(());
    }
    Err(StoreError::Layout(format!(
        "the rollup store was written with spans of {} and resolutions {}; this process is \
         configured for spans of {} and resolutions {}: set aggregate.span and \
         aggregate.resolutions (SPAN and RESOLUTIONS for the functions) to the store's, or \
         start a new store",
        duration(have.span_ms),
        resolutions(&have.resolutions_ms),
        duration(want.span_ms),
        resolutions(&want.resolutions_ms),
    )))
}

fn duration(ms: i64) -> String {
    rollup::config::format_duration_ms(ms)
}

fn resolutions(ms: &[i64]) -> String {
    ms.iter()
        .map(|&r| duration(r))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use schemas::Resolution;

    fn with_span(span: Option<i64>) -> AggregateConfig {
        AggregateConfig {
            span,
            ..AggregateConfig::default()
        }
    }

    #[tokio::test]
    async fn the_first_layout_is_kept_and_another_is_refused() {
        let store = MemoryStore::new();
        let minute = Some(Resolution::MINUTE);
        ensure(&store, &store, &with_span(minute)).await.unwrap();
        // Again, as every restart does.
        ensure(&store, &store, &with_span(minute)).await.unwrap();
        let err = ensure(&store, &store, &with_span(None)).await.unwrap_err();
        assert!(matches!(err, StoreError::Layout(_)), "{err}");
        assert!(!err.is_retryable());
        let text = err.to_string();
        assert!(
            text.contains("written with spans of 1m and resolutions 1m,1h,1d"),
            "{text}"
        );
        assert!(text.contains("configured for spans of 10m"), "{text}");
        let hourly = AggregateConfig {
            resolutions: vec![Resolution::DEFAULTS[0], Resolution::DEFAULTS[1]],
            retention_ms: vec![None, None],
            span: minute,
            ..AggregateConfig::default()
        };
        let err = ensure(&store, &store, &hourly).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("configured for spans of 1m and resolutions 1m,1h:"),
            "{err}"
        );
    }

    /// A reader writes nothing: it passes a store with no layout, and
    /// refuses one recorded otherwise.
    #[tokio::test]
    async fn a_reader_compares_and_never_records() {
        let store = MemoryStore::new();
        check(&store, &with_span(Some(Resolution::MINUTE)))
            .await
            .unwrap();
        assert!(store.dump().is_empty(), "a reader wrote {:?}", store.dump());
        ensure(&store, &store, &with_span(None)).await.unwrap();
        check(&store, &with_span(None)).await.unwrap();
        let err = check(&store, &with_span(Some(Resolution::MINUTE)))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Layout(_)), "{err}");
    }

    /// A store some earlier build wrote (a watermark, no layout) was cut
    /// into default spans, whatever this process is configured for.
    #[tokio::test]
    async fn a_store_written_before_layouts_has_the_default_span() {
        let store = MemoryStore::new();
        let watermark = Write {
            key: ItemKey::Watermark {
                shard: "shard-0000".into(),
            },
            condition: Condition::Absent,
            item: Item {
                applied: Default::default(),
                state: ItemState::Watermark(1),
            },
            expires_at: None,
        };
        store
            .commit(Commit {
                writes: vec![watermark],
                then: Vec::new(),
            })
            .await
            .unwrap();
        let err = ensure(&store, &store, &with_span(Some(Resolution::MINUTE)))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("written with spans of 10m"),
            "{err}"
        );
        ensure(&store, &store, &with_span(None)).await.unwrap();
    }
}
