//! The reads of a load: BatchGetItem for scattered keys, Query for a
//! device's neighbouring items, each retried on throttling.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::KeysAndAttributes;
use schemas::state::Item;

use super::plan::Read;
use super::{DynamoStore, StoreError, decode, every_page, names, s, unavailable};

impl DynamoStore {
    /// Loads up to 100 distinct keys with one BatchGetItem, plus retries of
    /// what DynamoDB left unprocessed.
    async fn load_chunk(
        &self,
        keys: Vec<(String, String)>,
        consistent: bool,
    ) -> Result<Vec<(String, String, u64, Item)>, StoreError> {
        let mut pending = KeysAndAttributes::builder()
            .set_keys(Some(
                keys.into_iter()
                    .map(|(pk, sk)| {
                        HashMap::from([("pk".to_string(), s(pk)), ("sk".to_string(), s(sk))])
                    })
                    .collect(),
            ))
            .consistent_read(consistent)
            .projection_expression("#pk, #sk, #v, #s")
            .set_expression_attribute_names(Some(names()))
            .build()
            .map_err(|e| unavailable("BatchGetItem", e))?;
        let mut found = Vec::new();
        let mut starved = 0;
        loop {
            let request = pending.clone();
            let out = self
                .retrying("BatchGetItem", || {
                    self.client
                        .batch_get_item()
                        .request_items(&self.table, request.clone())
                        .send()
                })
                .await?;
            for item in out
                .responses()
                .and_then(|r| r.get(&self.table))
                .into_iter()
                .flatten()
            {
                found.push(decode(item)?);
            }
            match out
                .unprocessed_keys()
                .and_then(|u| u.get(&self.table))
                .filter(|k| !k.keys().is_empty())
            {
                None => return Ok(found),
                Some(rest) => {
                    // DynamoDB hands back what it could not read under
                    // throttling; back off as for a throttled call.
                    starved += 1;
                    if starved >= self.cfg.max_attempts {
                        return Err(StoreError::Unavailable(format!(
                            "BatchGetItem left {} keys unprocessed {starved} times",
                            rest.keys().len()
                        )));
                    }
                    let delay = self.cfg.backoff.delay(starved, &mut rand::rng());
                    pending = rest.clone();
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Reads every item of one partition between two sort keys, both
    /// included, by Query pages.
    async fn load_range(
        &self,
        pk: String,
        from: String,
        to: String,
        consistent: bool,
    ) -> Result<Vec<(String, String, u64, Item)>, StoreError> {
        let (pk, from, to) = (&pk, &from, &to);
        every_page(|start| async move {
            let out = self
                .retrying("Query", || {
                    self.client
                        .query()
                        .table_name(&self.table)
                        .key_condition_expression("#pk = :pk AND #sk BETWEEN :a AND :b")
                        .projection_expression("#pk, #sk, #v, #s")
                        .set_expression_attribute_names(Some(names()))
                        .expression_attribute_values(":pk", s(pk.clone()))
                        .expression_attribute_values(":a", s(from.clone()))
                        .expression_attribute_values(":b", s(to.clone()))
                        .consistent_read(consistent)
                        .set_exclusive_start_key(start.clone())
                        .send()
                })
                .await?;
            Ok((out.items.unwrap_or_default(), out.last_evaluated_key))
        })
        .await
    }

    pub(super) async fn read(
        &self,
        read: Read,
    ) -> Result<Vec<(String, String, u64, Item)>, StoreError> {
        match read {
            Read::Keys { keys, consistent } => self.load_chunk(keys, consistent).await,
            Read::Range {
                pk,
                from,
                to,
                consistent,
            } => self.load_range(pk, from, to, consistent).await,
        }
    }
}
