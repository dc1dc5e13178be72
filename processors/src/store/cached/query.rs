//! Queries read through the cache: what is applied is visible before it is
//! flushed, so the cache's entries win over the inner store's rows.

use std::collections::BTreeMap;
use std::ops::Bound;

use async_trait::async_trait;
use schemas::state::Item;

use super::CachedStore;
use super::entries::State;
use crate::store::{KeyedItem, Range, RollupQuery, RollupStore, Scan, StoreError};

/// Cache entries with values in `[from, to)` of one partition, newest state.
fn overlay(state: &State, pk: &str, from: &str, to: &str) -> Vec<(String, Item)> {
    if from >= to {
        return Vec::new();
    }
    let lo = Bound::Included((pk.to_string(), from.to_string()));
    let hi = Bound::Excluded((pk.to_string(), to.to_string()));
    state
        .order
        .range((lo, hi))
        .filter_map(|((_, sk), key)| {
            let value = state.entries.get(key)?.value.clone()?;
            Some((sk.clone(), value))
        })
        .collect()
}

#[async_trait]
impl<S: RollupStore + RollupQuery> RollupQuery for CachedStore<S> {
    async fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>, StoreError> {
        let cached = {
            let state = self.lock();
            state
                .get_by_id(&(pk.to_string(), sk.to_string()))
                .map(|e| e.value.clone())
        };
        match cached {
            Some(value) => Ok(value),
            None => self.inner.get(pk, sk).await,
        }
    }

    async fn range(&self, range: Range) -> Result<Vec<(String, Item)>, StoreError> {
        let stored = self.inner.range(range.clone()).await?;
        let cached = overlay(&self.lock(), &range.pk, &range.from, &range.to);
        if cached.is_empty() {
            return Ok(stored);
        }
        let mut merged: BTreeMap<String, Item> = stored.into_iter().collect();
        // The cache holds every change not yet flushed, so it wins.
        merged.extend(cached);
        let rows: Vec<(String, Item)> = if range.descending {
            merged.into_iter().rev().take(range.limit).collect()
        } else {
            merged.into_iter().take(range.limit).collect()
        };
        Ok(rows)
    }

    async fn scan_prefix(&self, scan: Scan) -> Result<Vec<KeyedItem>, StoreError> {
        let limit = scan.limit;
        let cached: Vec<KeyedItem> = {
            let state = self.lock();
            state
                .order
                .range((scan.start(), Bound::Unbounded))
                .take_while(|((pk, _), _)| pk.starts_with(&scan.pk_prefix))
                .filter_map(|((pk, sk), key)| {
                    let value = state.entries.get(key)?.value.clone()?;
                    Some((pk.clone(), sk.clone(), value))
                })
                .take(limit)
                .collect()
        };
        let stored = self.inner.scan_prefix(scan).await?;
        let mut merged: BTreeMap<(String, String), Item> = stored
            .into_iter()
            .map(|(pk, sk, item)| ((pk, sk), item))
            .collect();
        merged.extend(cached.into_iter().map(|(pk, sk, item)| ((pk, sk), item)));
        Ok(merged
            .into_iter()
            .take(limit)
            .map(|((pk, sk), item)| (pk, sk, item))
            .collect())
    }
}
