//! The DynamoDB store, built on first use.
//!
//! Building the SDK client loads the TLS root certificates, which took most
//! of a function's start-up when measured (see `examples/cold_start.rs`).
//! Deferring it to the first invocation lets the function ask the Runtime
//! API for work sooner; the first invocation pays it once instead.
//!
//! The first use also checks the table's layout against the function's
//! configuration (`store::layout`): one read for the life of the process,
//! and on a new table the aggregate function records it. A table written
//! with another span fails every invocation with the reason, and is asked
//! again on the next, until the configuration agrees.

use async_trait::async_trait;
use aws::AwsConfig;
use rollup::AggregateConfig;
use schemas::state::Item;
use tokio::sync::OnceCell;

use crate::store::dynamodb::DynamoStore;
use rollup::keys::ItemKey;
use rollup::{Commit, LoadedItem};

use crate::store::{KeyedItem, Range, RollupQuery, RollupStore, Scan, StoreError, layout};

pub struct LazyDynamoStore {
    aws: AwsConfig,
    table: String,
    /// What the table's layout must agree with.
    config: AggregateConfig,
    /// Whether a table without a layout gets this one: not by the query
    /// function, whose role only reads.
    records_layout: bool,
    /// The store, once something needed it.
    store: OnceCell<DynamoStore>,
}

impl LazyDynamoStore {
    /// For a function that writes the table: records `config`'s layout in
    /// a table that has none.
    pub fn new(aws: AwsConfig, table: impl Into<String>, config: AggregateConfig) -> Self {
        LazyDynamoStore {
            aws,
            table: table.into(),
            config,
            records_layout: true,
            store: OnceCell::new(),
        }
    }

    /// For a function that only reads the table: compares the layout when
    /// one is recorded, and writes nothing.
    pub fn reading(aws: AwsConfig, table: impl Into<String>, config: AggregateConfig) -> Self {
        LazyDynamoStore {
            records_layout: false,
            ..Self::new(aws, table, config)
        }
    }

    async fn store(&self) -> Result<&DynamoStore, StoreError> {
        self.store
            .get_or_try_init(|| async {
                let store = DynamoStore::connect(&self.aws, &self.table).await;
                match self.records_layout {
                    true => layout::ensure(&store, &store, &self.config).await?,
                    false => layout::check(&store, &self.config).await?,
                }
                Ok(store)
            })
            .await
    }
}

#[async_trait]
impl RollupStore for LazyDynamoStore {
    async fn load(&self, keys: &[ItemKey]) -> Result<Vec<Option<LoadedItem>>, StoreError> {
        self.store().await?.load(keys).await
    }

    async fn commit(&self, commit: Commit) -> Result<(), StoreError> {
        self.store().await?.commit(commit).await
    }
}

#[async_trait]
impl RollupQuery for LazyDynamoStore {
    async fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>, StoreError> {
        self.store().await?.get(pk, sk).await
    }

    async fn range(&self, range: Range) -> Result<Vec<(String, Item)>, StoreError> {
        self.store().await?.range(range).await
    }

    async fn scan_prefix(&self, scan: Scan) -> Result<Vec<KeyedItem>, StoreError> {
        self.store().await?.scan_prefix(scan).await
    }
}
