//! The DynamoDB store, built on first use.
//!
//! Building the SDK client loads the TLS root certificates, which took most
//! of a function's start-up when measured (see `examples/cold_start.rs`).
//! Deferring it to the first invocation lets the function ask the Runtime
//! API for work sooner; the first invocation pays it once instead.

use async_trait::async_trait;
use aws::AwsConfig;
use schemas::state::Item;
use tokio::sync::OnceCell;

use crate::store::dynamodb::DynamoStore;
use rollup::keys::ItemKey;
use rollup::{Commit, LoadedItem};

use crate::store::{KeyedItem, Range, RollupQuery, RollupStore, Scan, StoreError};

pub struct LazyDynamoStore {
    aws: AwsConfig,
    table: String,
    /// The store, once something needed it.
    store: OnceCell<DynamoStore>,
}

impl LazyDynamoStore {
    pub fn new(aws: AwsConfig, table: impl Into<String>) -> Self {
        LazyDynamoStore {
            aws,
            table: table.into(),
            store: OnceCell::new(),
        }
    }

    async fn store(&self) -> &DynamoStore {
        self.store
            .get_or_init(|| DynamoStore::connect(&self.aws, &self.table))
            .await
    }
}

#[async_trait]
impl RollupStore for LazyDynamoStore {
    async fn load(&self, keys: &[ItemKey]) -> Result<Vec<Option<LoadedItem>>, StoreError> {
        self.store().await.load(keys).await
    }

    async fn commit(&self, commit: Commit) -> Result<(), StoreError> {
        self.store().await.commit(commit).await
    }
}

#[async_trait]
impl RollupQuery for LazyDynamoStore {
    async fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>, StoreError> {
        self.store().await.get(pk, sk).await
    }

    async fn range(&self, range: Range) -> Result<Vec<(String, Item)>, StoreError> {
        self.store().await.range(range).await
    }

    async fn scan_prefix(&self, scan: Scan) -> Result<Vec<KeyedItem>, StoreError> {
        self.store().await.scan_prefix(scan).await
    }
}
