//! The lease table: per (consumer, shard) one DynamoDB item holding the
//! shard's lease and the consumer's checkpoint, as the KCL keeps them; and
//! per (consumer, process) a heartbeat item, so that a process that holds no
//! lease yet still counts when the shards are shared out.
//!
//! | `pk`     | `sk`               | attributes                                  |
//! |----------|--------------------|---------------------------------------------|
//! | consumer | shard id           | `checkpoint`, `owner`, `lease_counter`      |
//! | consumer | `worker#<owner>`   | `lease_counter`                             |
//!
//! (`owner` is a reserved word in DynamoDB's expressions, hence `#owner`.)
//!
//! `checkpoint` is the last sequence number the consumer is done with, or
//! `SHARD_END` once it finished a closed shard, which is what lets the
//! shard's children start. `owner` names the process holding the lease
//! (absent: free); every take and renewal bumps `lease_counter`, and a
//! lease whose counter has not moved for a lease duration, measured on the
//! observer's own clock, is expired (the KCL's rule: no two clocks are
//! compared).
//!
//! Every checkpoint write is conditional on the checkpoint this reader last
//! saw and, for a leased reader, on still owning the lease: a process that
//! lost its lease finds out at its next checkpoint and stops, instead of
//! rewinding the new owner.

use std::collections::HashMap;

use async_trait::async_trait;
use aws::client::describe;
use aws::tables;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue};

use crate::ReadError;
use crate::lease::LeaseStore;
pub use crate::lease::{Checkpoint, Heartbeat, Lease, LeaseSnapshot};

const SHARD_END: &str = "SHARD_END";
/// Heartbeat items' sort keys start with this; shard ids never do.
const WORKER_PREFIX: &str = "worker#";

fn checkpoint_attr(checkpoint: &Checkpoint) -> AttributeValue {
    AttributeValue::S(match checkpoint {
        Checkpoint::At(seq) => seq.clone(),
        Checkpoint::ShardEnd => SHARD_END.to_string(),
    })
}

fn checkpoint_of(value: &str) -> Checkpoint {
    if value == SHARD_END {
        Checkpoint::ShardEnd
    } else {
        Checkpoint::At(value.to_string())
    }
}

/// The lease table: a DynamoDB table with string keys `pk`, `sk`.
#[derive(Debug, Clone)]
pub struct LeaseTable {
    client: Client,
    table: String,
}

type Item = HashMap<String, AttributeValue>;

fn s(value: &str) -> AttributeValue {
    AttributeValue::S(value.to_string())
}

fn n(value: u64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

fn counter_of(item: &Item) -> u64 {
    item.get("lease_counter")
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn string_of<'a>(item: &'a Item, key: &str) -> Option<&'a str> {
    item.get(key)
        .and_then(|v| v.as_s().ok())
        .map(String::as_str)
}

/// `Ok(false)` for a failed condition, the error for anything else.
fn condition_held<T, E>(result: Result<T, SdkError<E>>, what: &str) -> Result<bool, ReadError>
where
    E: std::error::Error + ConditionFailed + 'static,
{
    match result {
        Ok(_) => Ok(true),
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_condition_failed()) =>
        {
            Ok(false)
        }
        Err(e) => Err(ReadError::Io(format!("{what}: {}", describe(&e)))),
    }
}

/// The DynamoDB errors that carry ConditionalCheckFailed.
trait ConditionFailed {
    fn is_condition_failed(&self) -> bool;
}

impl ConditionFailed for aws_sdk_dynamodb::operation::update_item::UpdateItemError {
    fn is_condition_failed(&self) -> bool {
        self.is_conditional_check_failed_exception()
    }
}

impl LeaseTable {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        LeaseTable {
            client,
            table: table.into(),
        }
    }

    pub fn table_name(&self) -> &str {
        &self.table
    }

    /// Creates the table unless it exists.
    pub async fn ensure_table(&self) -> Result<(), ReadError> {
        tables::ensure_table(&self.client, &self.table, None)
            .await
            .map_err(ReadError::Io)
    }

    /// `consumer`'s item `sk`, read consistently; `doing` names the read in
    /// an error.
    async fn read(&self, consumer: &str, sk: &str, doing: &str) -> Result<Option<Item>, ReadError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", s(consumer))
            .key("sk", s(sk))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| ReadError::Io(format!("{doing}: {}", describe(&e))))?;
        Ok(out.item)
    }

    /// An update of `consumer`'s item `sk`, to which each caller adds its
    /// expression and condition.
    fn update(&self, consumer: &str, sk: &str) -> UpdateItemFluentBuilder {
        self.client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(consumer))
            .key("sk", s(sk))
    }

    async fn owned_by(&self, consumer: &str, shard: &str, owner: &str) -> Result<bool, ReadError> {
        let item = self.read(consumer, shard, "reading a lease").await?;
        Ok(item.as_ref().and_then(|i| string_of(i, "owner")) == Some(owner))
    }

    /// Applies `expression` to `owner`'s lease on `shard`, bumping its
    /// counter, only while `owner` holds it. `Ok(false)`: it does not.
    async fn update_owned(
        &self,
        consumer: &str,
        shard: &str,
        owner: &str,
        expression: &str,
        doing: &str,
    ) -> Result<bool, ReadError> {
        let update = self
            .update(consumer, shard)
            .update_expression(expression)
            .condition_expression("#owner = :me")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":me", s(owner))
            .expression_attribute_values(":one", n(1));
        condition_held(update.send().await, doing)
    }
}

/// The lease table's operations, each a conditional DynamoDB write or a
/// consistent read.
#[async_trait]
impl LeaseStore for LeaseTable {
    async fn get(&self, consumer: &str, shard: &str) -> Result<Option<Checkpoint>, ReadError> {
        let item = self.read(consumer, shard, "reading checkpoint").await?;
        Ok(item
            .as_ref()
            .and_then(|item| string_of(item, "checkpoint"))
            .map(checkpoint_of))
    }

    async fn set(
        &self,
        consumer: &str,
        shard: &str,
        owner: Option<&str>,
        expected: Option<&Checkpoint>,
        new: &Checkpoint,
    ) -> Result<(), ReadError> {
        let mut update = self
            .update(consumer, shard)
            .update_expression("SET checkpoint = :new")
            .expression_attribute_values(":new", checkpoint_attr(new));
        let checkpoint_condition = match expected {
            None => "attribute_not_exists(checkpoint)",
            Some(old) => {
                update = update.expression_attribute_values(":old", checkpoint_attr(old));
                "checkpoint = :old"
            }
        };
        update = match owner {
            None => update.condition_expression(checkpoint_condition),
            Some(owner) => update
                .condition_expression(format!("#owner = :me AND {checkpoint_condition}"))
                .expression_attribute_values(":me", s(owner))
                .expression_attribute_names("#owner", "owner"),
        };
        if condition_held(update.send().await, "writing checkpoint")? {
            return Ok(());
        }
        match owner {
            Some(owner) if !self.owned_by(consumer, shard, owner).await? => {
                Err(ReadError::LeaseLost(shard.to_string()))
            }
            _ => Err(ReadError::Io(format!(
                "another reader moved the checkpoint of {consumer} in {shard}; this one stops"
            ))),
        }
    }

    async fn snapshot(&self, consumer: &str) -> Result<LeaseSnapshot, ReadError> {
        let mut out = LeaseSnapshot::default();
        let mut start: Option<Item> = None;
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("pk = :pk")
                .expression_attribute_values(":pk", s(consumer))
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| ReadError::Io(format!("reading leases: {}", describe(&e))))?;
            for item in page.items() {
                let Some(sk) = string_of(item, "sk") else {
                    continue;
                };
                match sk.strip_prefix(WORKER_PREFIX) {
                    Some(owner) => out.heartbeats.push(Heartbeat {
                        owner: owner.to_string(),
                        counter: counter_of(item),
                    }),
                    None => out.leases.push(Lease {
                        shard: sk.to_string(),
                        owner: string_of(item, "owner").map(str::to_string),
                        counter: counter_of(item),
                        checkpoint: string_of(item, "checkpoint").map(checkpoint_of),
                    }),
                }
            }
            match page.last_evaluated_key() {
                Some(key) if !key.is_empty() => start = Some(key.clone()),
                _ => return Ok(out),
            }
        }
    }

    async fn take(
        &self,
        consumer: &str,
        shard: &str,
        owner: &str,
        seen: Option<u64>,
    ) -> Result<bool, ReadError> {
        let update = self
            .update(consumer, shard)
            .update_expression("SET #owner = :me, lease_counter = :next")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":me", s(owner))
            .expression_attribute_values(":next", n(seen.map_or(1, |c| c + 1)));
        let update = match seen {
            None => update.condition_expression("attribute_not_exists(lease_counter)"),
            Some(c) => update
                .condition_expression("lease_counter = :seen")
                .expression_attribute_values(":seen", n(c)),
        };
        condition_held(update.send().await, "taking a lease")
    }

    async fn renew(&self, consumer: &str, shard: &str, owner: &str) -> Result<bool, ReadError> {
        self.update_owned(
            consumer,
            shard,
            owner,
            "ADD lease_counter :one",
            "renewing a lease",
        )
        .await
    }

    async fn release(&self, consumer: &str, shard: &str, owner: &str) -> Result<bool, ReadError> {
        self.update_owned(
            consumer,
            shard,
            owner,
            "REMOVE #owner ADD lease_counter :one",
            "releasing a lease",
        )
        .await
    }

    async fn heartbeat(&self, consumer: &str, owner: &str) -> Result<(), ReadError> {
        self.update(consumer, &format!("{WORKER_PREFIX}{owner}"))
            .update_expression("ADD lease_counter :one")
            .expression_attribute_values(":one", n(1))
            .return_values(ReturnValue::None)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| ReadError::Io(format!("writing a heartbeat: {}", describe(&e))))
    }
}
