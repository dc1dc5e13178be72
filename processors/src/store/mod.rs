//! The rollup store: the two roles the core needs, and their backends.
//!
//! - [`RollupStore`]: what a processor does with a batch: load the items it
//!   touches, then commit new versions conditionally.
//! - [`RollupQuery`]: what the query API reads.
//! - `sqlite`: the embedded backend; `cached`: a write-behind cache in front
//!   of it; `memory`: for tests and benchmarks.
//! - `dynamodb`: the AWS backend, one DynamoDB table.
//! - `postgres`: a PostgreSQL server, one table, for fleets beyond one
//!   machine without AWS.
//! - `layout`: the span and resolutions a store was first written with,
//!   which every process opening it must share.
//!
//! The suite every backend runs and the fault-injecting wrapper are test
//! support, in the dev-only `testkit` crate.
//!
//! **Architecture Invariant:** every write is conditional on the version that
//! was loaded, and every item has a single writing shard; a failed condition
//! means another process is writing the same shard, and the batch is retried
//! from a fresh load rather than merged blindly.

pub mod cached;
pub mod dynamodb;
pub mod layout;
pub mod memory;
pub mod postgres;
pub mod sqlite;
#[cfg(test)]
mod test_items;

use async_trait::async_trait;
use rollup::keys::ItemKey;
use rollup::{Commit, LoadedItem};
use schemas::state::Item;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A write's condition failed: someone else wrote the item. Reload and retry.
    #[error("conditional write failed for {0}")]
    Conflict(String),
    /// The store could not be reached or refused for now (throttling). Retry.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A stored item cannot be read by this build.
    #[error("stored item {key} is unreadable: {detail}")]
    Corrupt { key: String, detail: String },
    /// The store was written with another layout than this process's
    /// (see [`layout`]); nothing may be read or written until they agree.
    #[error("{0}")]
    Layout(String),
}

impl StoreError {
    pub fn is_retryable(&self) -> bool {
        !matches!(self, StoreError::Corrupt { .. } | StoreError::Layout(_))
    }
}

#[async_trait]
pub trait RollupStore: Send + Sync + 'static {
    /// Loads the items at `keys`, in order; `None` where none exists.
    async fn load(&self, keys: &[ItemKey]) -> Result<Vec<Option<LoadedItem>>, StoreError>;

    /// Writes a batch's items; see [`Commit`] for the order guarantee.
    async fn commit(&self, commit: Commit) -> Result<(), StoreError>;

    /// Makes every committed item durable. Stores that write through (all but
    /// the write-behind cache) are durable when `commit` returns; the shard
    /// loop checkpoints only after this. Returns the items it wrote, for
    /// write amplification.
    async fn flush(&self) -> Result<usize, StoreError> {
        Ok(0)
    }

    /// Items committed but not yet flushed: what the flush policy bounds.
    /// Always 0 for stores that write through.
    fn unflushed(&self) -> usize {
        0
    }
}

/// Every shard's processed watermark, by shard: what makes windows final
/// (the query API) and what the sweep of quiet devices compacts up to.
pub async fn watermarks(
    query: &dyn RollupQuery,
) -> Result<std::collections::HashMap<String, i64>, StoreError> {
    let rows = query
        .range(Range {
            pk: rollup::keys::WATERMARK_PK.into(),
            from: String::new(),
            // Above every shard id: the whole partition.
            to: "\u{10FFFF}".into(),
            limit: 100_000,
            descending: false,
        })
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(shard, item)| match item.state {
            schemas::state::ItemState::Watermark(w) => Some((shard, w)),
            _ => None,
        })
        .collect())
}

/// A page of a scan over partitions whose key starts with `pk_prefix`: at
/// most `limit` items after `after` = (pk, sk), or from the first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    pub pk_prefix: String,
    pub after: Option<(String, String)>,
    pub limit: usize,
}

impl Scan {
    pub fn new(
        pk_prefix: impl Into<String>,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Self {
        Scan {
            pk_prefix: pk_prefix.into(),
            after,
            limit,
        }
    }

    /// Where the scan starts in a map ordered by (pk, sk).
    pub fn start(&self) -> std::ops::Bound<(String, String)> {
        match &self.after {
            Some(key) => std::ops::Bound::Excluded(key.clone()),
            None => std::ops::Bound::Included((self.pk_prefix.clone(), String::new())),
        }
    }
}

/// An item with its keys, as a scan returns it: (pk, sk, item).
pub type KeyedItem = (String, String, Item);

/// A range of one partition, `from <= sk < to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub pk: String,
    pub from: String,
    pub to: String,
    pub limit: usize,
    pub descending: bool,
}

#[async_trait]
pub trait RollupQuery: Send + Sync + 'static {
    async fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>, StoreError>;

    /// Items of `range.pk` with sort keys in `[from, to)`, at most `limit`.
    async fn range(&self, range: Range) -> Result<Vec<(String, Item)>, StoreError>;

    /// Items of every partition whose key starts with `scan.pk_prefix`,
    /// ordered by (pk, sk), starting after `scan.after` when given.
    async fn scan_prefix(&self, scan: Scan) -> Result<Vec<KeyedItem>, StoreError>;
}
