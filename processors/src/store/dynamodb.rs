//! The DynamoDB rollup store: one table, keyed exactly like the logical
//! table in `keys` (`pk` S, `sk` S).
//!
//! Each item carries `v` (N, its version, 1 on insert and +1 per write), `s`
//! (B, [`Item::encode`]) and, when it expires, `ttl` (N, seconds since the
//! epoch, rounded up so that DynamoDB never deletes early).
//!
//! - `load`: several spans or coarse windows of one device by one Query
//!   (metered on their total size, where BatchGetItem rounds every item up
//!   to 4 KB), everything else by BatchGetItem, 100 keys per call,
//!   unprocessed keys retried. A device's own items (spans, windows, device
//!   and member items) read eventually consistent, at half the read units:
//!   every write is conditional on the version read, so a stale read can
//!   only turn into a conflict, and after a conflict every load reads
//!   strongly consistent until a commit succeeds. Shared items (fleet
//!   windows, watermarks, counters) always read strongly consistent.
//! - `commit`: one conditional PutItem per write, a bounded number in
//!   flight. Every write of `writes` has succeeded before the first of
//!   `then` starts. A commit is not atomic across items, and needs not be:
//!   applied marks make a partial commit safe to retry (see ARCHITECTURE.md).
//! - Queries read eventually consistent, as a dashboard may lag a second.
//! - `scan_prefix` scans the whole table. The API does not call it (a
//!   fleet's devices are a `range` of its member partition, a Query), and the
//!   deployed query function has no permission to Scan.
//!
//! Throttling and 5xx answers are retried with backoff and full jitter
//! before a call reports [`StoreError::Unavailable`].

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use aws::AwsConfig;
use aws::backoff::Backoff;
use aws::client::{describe, is_retryable};
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;
use futures::{StreamExt, TryStreamExt};
use schemas::state::Item;

use rollup::{Commit, Condition, LoadedItem, Write};

use super::{KeyedItem, Range, RollupQuery, RollupStore, Scan, StoreError};
use rollup::keys::ItemKey;

mod plan;
mod read;

use plan::plan_reads;

/// BatchGetItem takes at most 100 keys.
const BATCH_GET_MAX: usize = 100;
/// The attribute DynamoDB's TTL is enabled on.
pub const TTL_ATTRIBUTE: &str = "ttl";

/// How the store talks to DynamoDB.
#[derive(Debug, Clone)]
pub struct DynamoConfig {
    /// PutItem calls in flight per commit phase: enough to hide round trips,
    /// few enough not to burst a table's partition into throttling.
    pub max_concurrent_writes: usize,
    /// BatchGetItem calls in flight per load.
    pub max_concurrent_reads: usize,
    /// Attempts of one call on throttling or a 5xx, counting the first.
    pub max_attempts: u32,
    pub backoff: Backoff,
    /// Read a device's own items eventually consistent (half the read units)
    /// while no commit has conflicted; `false` reads everything strongly
    /// consistent.
    pub eventual_device_reads: bool,
}

impl Default for DynamoConfig {
    fn default() -> Self {
        DynamoConfig {
            max_concurrent_writes: 16,
            max_concurrent_reads: 4,
            max_attempts: 6,
            backoff: Backoff::new(Duration::from_millis(25), Duration::from_secs(2)),
            eventual_device_reads: true,
        }
    }
}

#[derive(Debug, Clone)]
pub struct DynamoStore {
    client: Client,
    table: String,
    cfg: DynamoConfig,
    /// Set by a commit that failed a condition, cleared by one that
    /// succeeded: the retry after a conflict must see what beat it, which an
    /// eventually consistent read may not.
    strong_reads: Arc<AtomicBool>,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("{what}: {e}"))
}

/// Expression attribute names: `ttl` is a reserved word, and naming all of
/// them keeps every expression uniform.
fn names() -> HashMap<String, String> {
    [("#pk", "pk"), ("#sk", "sk"), ("#v", "v"), ("#s", "s")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

fn string_attr<'a>(item: &'a HashMap<String, AttributeValue>, name: &str) -> Option<&'a str> {
    item.get(name)
        .and_then(|v| v.as_s().ok())
        .map(String::as_str)
}

/// Decodes a stored item into (pk, sk, version, item).
/// Where the next page of a Query or Scan starts; `None` for the first.
type PageKey = Option<HashMap<String, AttributeValue>>;

/// Every item of a paged Query or Scan, decoded: `page` fetches the page
/// that starts at its key, and returns its items and the next page's key.
async fn every_page<F, Fut>(mut page: F) -> Result<Vec<(String, String, u64, Item)>, StoreError>
where
    F: FnMut(PageKey) -> Fut,
    Fut: Future<Output = Result<(Vec<HashMap<String, AttributeValue>>, PageKey), StoreError>>,
{
    let mut rows = Vec::new();
    let mut start = None;
    loop {
        let (items, next) = page(start).await?;
        for item in &items {
            rows.push(decode(item)?);
        }
        match next {
            Some(key) => start = Some(key),
            None => return Ok(rows),
        }
    }
}

fn decode(
    item: &HashMap<String, AttributeValue>,
) -> Result<(String, String, u64, Item), StoreError> {
    let pk = string_attr(item, "pk").unwrap_or_default().to_string();
    let sk = string_attr(item, "sk").unwrap_or_default().to_string();
    let corrupt = |detail: String| StoreError::Corrupt {
        key: format!("{pk}/{sk}"),
        detail,
    };
    let version = item
        .get("v")
        .and_then(|v| v.as_n().ok())
        .ok_or_else(|| corrupt("no version attribute `v`".to_string()))?
        .parse::<u64>()
        .map_err(|e| corrupt(format!("version: {e}")))?;
    let bytes = item
        .get("s")
        .and_then(|v| v.as_b().ok())
        .ok_or_else(|| corrupt("no state attribute `s`".to_string()))?;
    let decoded = Item::decode(bytes.as_ref()).map_err(corrupt)?;
    Ok((pk, sk, version, decoded))
}

/// What a single write attempt came to.
enum WriteError {
    ConditionFailed,
    Retryable(String),
    Fatal(String),
}

impl DynamoStore {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        DynamoStore {
            client,
            table: table.into(),
            cfg: DynamoConfig::default(),
            strong_reads: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Builds a client from `aws` for table `table`; creates nothing (see
    /// [`DynamoStore::create_table`]).
    pub async fn connect(aws: &AwsConfig, table: &str) -> Self {
        DynamoStore::new(Client::new(&aws.load().await), table)
    }

    pub fn with_config(mut self, cfg: DynamoConfig) -> Self {
        self.cfg = cfg;
        self
    }

    pub fn table_name(&self) -> &str {
        &self.table
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Creates the table unless it exists: on-demand billing, TTL on `ttl`.
    pub async fn create_table(&self) -> Result<(), StoreError> {
        aws::tables::ensure_table(&self.client, &self.table, Some(TTL_ATTRIBUTE))
            .await
            .map_err(StoreError::Unavailable)
    }

    /// Runs `call` until it succeeds, fails for good, or runs out of
    /// attempts on retryable errors.
    async fn retrying<T, E, F, Fut>(&self, what: &str, mut call: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, SdkError<E>>>,
        E: std::error::Error + aws_sdk_dynamodb::error::ProvideErrorMetadata + 'static,
    {
        let mut failures = 0;
        loop {
            match call().await {
                Ok(out) => return Ok(out),
                Err(e) if is_retryable(&e) && failures + 1 < self.cfg.max_attempts => {
                    failures += 1;
                    let delay = self.cfg.backoff.delay(failures, &mut rand::rng());
                    tracing::debug!(what, error = %describe(&e), delay_ms = delay.as_millis() as u64, "DynamoDB call failed; retrying.");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(unavailable(what, describe(&e))),
            }
        }
    }

    async fn put_once(&self, w: &Write) -> Result<(), WriteError> {
        let (pk, sk) = (w.key.pk(), w.key.sk());
        let version = match w.condition {
            Condition::Version(v) => v + 1,
            Condition::Absent | Condition::InsertOnce => 1,
        };
        let mut put = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("pk", s(pk))
            .item("sk", s(sk))
            .item("v", AttributeValue::N(version.to_string()))
            .item("s", AttributeValue::B(Blob::new(w.item.encode())));
        if let Some(ms) = w.expires_at {
            let secs = (ms.max(0) as u64).div_ceil(1000);
            put = put.item(TTL_ATTRIBUTE, AttributeValue::N(secs.to_string()));
        }
        put = match w.condition {
            Condition::Version(v) => put
                .condition_expression("#v = :v")
                .expression_attribute_names("#v", "v")
                .expression_attribute_values(":v", AttributeValue::N(v.to_string())),
            Condition::Absent | Condition::InsertOnce => put
                .condition_expression("attribute_not_exists(#pk)")
                .expression_attribute_names("#pk", "pk"),
        };
        match put.send().await {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
            {
                Err(WriteError::ConditionFailed)
            }
            Err(e) if is_retryable(&e) => Err(WriteError::Retryable(describe(&e))),
            Err(e) => Err(WriteError::Fatal(describe(&e))),
        }
    }

    /// One write, retried on throttling; a failed condition is a conflict,
    /// except for `InsertOnce`, where it means the item is already there.
    async fn put(&self, w: &Write) -> Result<(), StoreError> {
        let mut failures = 0;
        loop {
            match self.put_once(w).await {
                Ok(()) => return Ok(()),
                Err(WriteError::ConditionFailed) if w.condition == Condition::InsertOnce => {
                    return Ok(());
                }
                Err(WriteError::ConditionFailed) => {
                    return Err(StoreError::Conflict(format!(
                        "{}/{}",
                        w.key.pk(),
                        w.key.sk()
                    )));
                }
                Err(WriteError::Retryable(e)) if failures + 1 < self.cfg.max_attempts => {
                    failures += 1;
                    let delay = self.cfg.backoff.delay(failures, &mut rand::rng());
                    tracing::debug!(error = %e, "PutItem failed; retrying.");
                    tokio::time::sleep(delay).await;
                }
                Err(WriteError::Retryable(e) | WriteError::Fatal(e)) => {
                    return Err(unavailable("PutItem", e));
                }
            }
        }
    }

    /// Writes `writes` with bounded concurrency; stops at the first failure.
    async fn put_all(&self, writes: &[Write]) -> Result<(), StoreError> {
        futures::stream::iter(writes.iter().map(Ok))
            .try_for_each_concurrent(self.cfg.max_concurrent_writes.max(1), |w| self.put(w))
            .await
    }

    /// Pages of a Query or Scan, as items.
    async fn query_page(
        &self,
        range: &Range,
        start: Option<HashMap<String, AttributeValue>>,
        limit: usize,
    ) -> Result<
        (
            Vec<HashMap<String, AttributeValue>>,
            Option<HashMap<String, AttributeValue>>,
        ),
        StoreError,
    > {
        // BETWEEN includes both ends and a key value cannot be empty: an
        // empty `from` means "no lower bound", and the caller drops `to`.
        let (condition, bounds): (&str, Vec<(&str, &str)>) = if range.from.is_empty() {
            ("#pk = :pk AND #sk <= :b", vec![(":b", range.to.as_str())])
        } else {
            (
                "#pk = :pk AND #sk BETWEEN :a AND :b",
                vec![(":a", range.from.as_str()), (":b", range.to.as_str())],
            )
        };
        let out = self
            .retrying("Query", || {
                let mut q = self
                    .client
                    .query()
                    .table_name(&self.table)
                    .key_condition_expression(condition)
                    .expression_attribute_names("#pk", "pk")
                    .expression_attribute_names("#sk", "sk")
                    .expression_attribute_values(":pk", s(range.pk.clone()))
                    .scan_index_forward(!range.descending)
                    .limit(limit.clamp(1, i32::MAX as usize) as i32)
                    .set_exclusive_start_key(start.clone());
                for (name, value) in &bounds {
                    q = q.expression_attribute_values(*name, s(*value));
                }
                q.send()
            })
            .await?;
        Ok((out.items.unwrap_or_default(), out.last_evaluated_key))
    }
}

#[async_trait]
impl RollupStore for DynamoStore {
    async fn load(&self, keys: &[ItemKey]) -> Result<Vec<Option<LoadedItem>>, StoreError> {
        let ids: Vec<(String, String)> = keys.iter().map(|k| (k.pk(), k.sk())).collect();
        let eventual = self.cfg.eventual_device_reads && !self.strong_reads.load(Ordering::Relaxed);
        // The plan names each key once: BatchGetItem refuses a request that
        // names a key twice. A range may also return items nobody asked for;
        // they are dropped below.
        let reads = plan_reads(keys, eventual);
        let found: Vec<Vec<(String, String, u64, Item)>> = futures::stream::iter(reads)
            .map(|read| self.read(read))
            .buffer_unordered(self.cfg.max_concurrent_reads.max(1))
            .try_collect()
            .await?;
        let by_key: HashMap<(String, String), LoadedItem> = found
            .into_iter()
            .flatten()
            .map(|(pk, sk, version, item)| ((pk, sk), LoadedItem { version, item }))
            .collect();
        Ok(ids.iter().map(|id| by_key.get(id).cloned()).collect())
    }

    async fn commit(&self, commit: Commit) -> Result<(), StoreError> {
        let result = match self.put_all(&commit.writes).await {
            Ok(()) => self.put_all(&commit.then).await,
            Err(e) => Err(e),
        };
        match &result {
            Ok(()) => self.strong_reads.store(false, Ordering::Relaxed),
            Err(StoreError::Conflict(_)) => self.strong_reads.store(true, Ordering::Relaxed),
            Err(_) => {}
        }
        result
    }
}

#[async_trait]
impl RollupQuery for DynamoStore {
    async fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>, StoreError> {
        let out = self
            .retrying("GetItem", || {
                self.client
                    .get_item()
                    .table_name(&self.table)
                    .key("pk", s(pk))
                    .key("sk", s(sk))
                    .send()
            })
            .await?;
        out.item()
            .map(|item| decode(item).map(|(_, _, _, item)| item))
            .transpose()
    }

    async fn range(&self, range: Range) -> Result<Vec<(String, Item)>, StoreError> {
        if range.limit == 0 || range.to.is_empty() || range.from >= range.to {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        let mut start = None;
        loop {
            // One more than needed: the item at `to`, if any, is read too
            // (BETWEEN includes it) and dropped here.
            let want = range.limit - out.len() + 1;
            let (items, next) = self.query_page(&range, start, want).await?;
            for item in &items {
                let (_, sk, _, decoded) = decode(item)?;
                if sk != range.to && out.len() < range.limit {
                    out.push((sk, decoded));
                }
            }
            match next {
                Some(key) if out.len() < range.limit => start = Some(key),
                _ => return Ok(out),
            }
        }
    }

    async fn scan_prefix(&self, scan: Scan) -> Result<Vec<KeyedItem>, StoreError> {
        let prefix = &scan.pk_prefix;
        let mut rows = every_page(|start| async move {
            let out = self
                .retrying("Scan", || {
                    let call = self
                        .client
                        .scan()
                        .table_name(&self.table)
                        .set_exclusive_start_key(start.clone());
                    if prefix.is_empty() {
                        call.send()
                    } else {
                        call.filter_expression("begins_with(#pk, :prefix)")
                            .expression_attribute_names("#pk", "pk")
                            .expression_attribute_values(":prefix", s(prefix))
                            .send()
                    }
                })
                .await?;
            Ok((out.items.unwrap_or_default(), out.last_evaluated_key))
        })
        .await?;
        rows.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        Ok(rows
            .into_iter()
            .filter(|(pk, sk, _, _)| {
                scan.after
                    .as_ref()
                    .is_none_or(|(apk, ask)| (pk, sk) > (apk, ask))
            })
            .take(scan.limit)
            .map(|(pk, sk, _, item)| (pk, sk, item))
            .collect())
    }
}

#[cfg(test)]
mod tests;
