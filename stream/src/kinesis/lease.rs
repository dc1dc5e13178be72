//! Checkpoints of Kinesis consumers, one DynamoDB item per (consumer, shard).
//!
//! `pk` is the consumer, `sk` the shard id, `checkpoint` the last sequence
//! number the consumer is done with, or `SHARD_END` once it finished a
//! closed shard, which is what lets the shard's children start.
//!
//! Every write is conditional on the checkpoint this process last saw, so
//! two readers of the same (consumer, shard) cannot both move it: the one
//! that lost finds out at its next checkpoint instead of silently rewinding
//! the other.

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::AttributeValue;

use super::client::describe;
use super::tables;
use crate::ReadError;

const SHARD_END: &str = "SHARD_END";

/// Where a consumer stands in a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checkpoint {
    /// Done with every record up to this Kinesis sequence number.
    At(String),
    /// Done with the whole shard, which is closed.
    ShardEnd,
}

impl Checkpoint {
    fn as_attr(&self) -> AttributeValue {
        AttributeValue::S(match self {
            Checkpoint::At(seq) => seq.clone(),
            Checkpoint::ShardEnd => SHARD_END.to_string(),
        })
    }

    fn from_attr(value: &str) -> Self {
        if value == SHARD_END {
            Checkpoint::ShardEnd
        } else {
            Checkpoint::At(value.to_string())
        }
    }
}

/// The lease table: a DynamoDB table with string keys `pk`, `sk`.
#[derive(Debug, Clone)]
pub struct LeaseTable {
    client: Client,
    table: String,
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

    /// The consumer's checkpoint in `shard`, read consistently.
    pub async fn get(&self, consumer: &str, shard: &str) -> Result<Option<Checkpoint>, ReadError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(consumer.to_string()))
            .key("sk", AttributeValue::S(shard.to_string()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| ReadError::Io(format!("reading checkpoint: {}", describe(&e))))?;
        Ok(out
            .item()
            .and_then(|item| item.get("checkpoint"))
            .and_then(|v| v.as_s().ok())
            .map(|s| Checkpoint::from_attr(s)))
    }

    /// Moves the checkpoint from `expected` (what this reader last saw;
    /// `None`: no checkpoint yet) to `new`.
    pub async fn set(
        &self,
        consumer: &str,
        shard: &str,
        expected: Option<&Checkpoint>,
        new: &Checkpoint,
    ) -> Result<(), ReadError> {
        let mut put = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("pk", AttributeValue::S(consumer.to_string()))
            .item("sk", AttributeValue::S(shard.to_string()))
            .item("checkpoint", new.as_attr());
        put = match expected {
            None => put.condition_expression("attribute_not_exists(pk)"),
            Some(old) => put
                .condition_expression("checkpoint = :old")
                .expression_attribute_values(":old", old.as_attr()),
        };
        match put.send().await {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
            {
                Err(ReadError::Io(format!(
                    "another reader moved the checkpoint of {consumer} in {shard}; this one stops"
                )))
            }
            Err(e) => Err(ReadError::Io(format!(
                "writing checkpoint: {}",
                describe(&e)
            ))),
        }
    }
}
