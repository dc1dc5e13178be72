//! Appending: [`EmbeddedLog`] as a [`StreamProducer`], handing each shard's
//! writer its part of a put.

use async_trait::async_trait;
use tokio::sync::oneshot;

use super::writer::AppendRequest;
use super::{EmbeddedLog, frame};
use crate::partition;
use crate::{ProduceError, PutOutcome, PutRecord, SeqNo, StreamProducer};

#[async_trait]
impl StreamProducer for EmbeddedLog {
    /// Any number: a put hands each shard's writer its records in one queued
    /// request before it first waits (or waits in the queue's line, which is
    /// first come, first served), and each writer stores requests in queue
    /// order.
    fn max_puts_in_order(&self) -> usize {
        usize::MAX
    }

    async fn put(&self, records: Vec<PutRecord>) -> Result<Vec<PutOutcome>, ProduceError> {
        let senders = match self.writers.read() {
            Ok(writers) => writers.clone().ok_or(ProduceError::Closed)?,
            Err(_) => return Err(ProduceError::Closed),
        };
        let mut outcomes: Vec<Option<PutOutcome>> = vec![None; records.len()];
        let mut by_shard: Vec<(Vec<usize>, Vec<PutRecord>)> = (0..self.shards.len())
            .map(|_| (Vec::new(), Vec::new()))
            .collect();
        // The shard of the record before: see `partition::shard_after`.
        let mut last_shard: Option<usize> = None;
        for (i, record) in records.into_iter().enumerate() {
            if let Err(message) = frame::check_record(&record.partition_key, &record.data) {
                outcomes[i] = Some(PutOutcome::Failed {
                    retryable: false,
                    message,
                });
                continue;
            }
            let previous = last_shard.and_then(|s| {
                let last = by_shard[s].1.last()?;
                Some((last.partition_key.as_str(), s as u32))
            });
            let shard = partition::shard_after(&record.partition_key, previous, self.config.shards)
                as usize;
            last_shard = Some(shard);
            by_shard[shard].0.push(i);
            by_shard[shard].1.push(record);
        }

        let mut pending = Vec::new();
        let mut sent = 0;
        let mut refused = 0;
        for (shard, (indices, records)) in by_shard.into_iter().enumerate() {
            if records.is_empty() {
                continue;
            }
            let (reply, answer) = oneshot::channel();
            sent += indices.len();
            match senders[shard].send(AppendRequest { records, reply }).await {
                Ok(()) => pending.push((shard, indices, answer)),
                Err(_) => {
                    refused += indices.len();
                    fail(&mut outcomes, &indices, "stream is closed");
                }
            }
        }
        for (shard, indices, answer) in pending {
            let Ok(reply) = answer.await else {
                fail(&mut outcomes, &indices, "the shard writer stopped");
                continue;
            };
            let shard_id = &self.shards[shard].id;
            for (n, i) in indices.iter().enumerate() {
                outcomes[*i] = Some(if n < reply.stored {
                    PutOutcome::Stored {
                        shard: shard_id.clone(),
                        seq: SeqNo::from(reply.first_seq + n as u64),
                    }
                } else {
                    PutOutcome::Failed {
                        retryable: true,
                        message: reply.error.clone().unwrap_or_default(),
                    }
                });
            }
        }
        if sent > 0 && refused == sent {
            return Err(ProduceError::Closed);
        }
        Ok(outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or(PutOutcome::Failed {
                    retryable: true,
                    message: "record was not handled".to_owned(),
                })
            })
            .collect())
    }
}

fn fail(outcomes: &mut [Option<PutOutcome>], indices: &[usize], message: &str) {
    for i in indices {
        outcomes[*i] = Some(PutOutcome::Failed {
            retryable: true,
            message: message.to_owned(),
        });
    }
}
