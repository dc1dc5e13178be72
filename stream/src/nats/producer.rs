//! Appending: JetStream publishes, one per record, each reported `Stored`
//! only once its PubAck came back.
//!
//! A put publishes every record before it waits for any ack, so a put of many
//! records costs about one round trip. Each publish carries a message id
//! derived from the record's key and bytes (`Nats-Msg-Id`): a record put
//! again within the stream's duplicate window, because an ack was lost or the
//! caller retried a `Failed` record that did land, is stored once and acked
//! with its first sequence number. Two records alike in key and bytes are
//! one record then; every record iotpipe builds carries its arrival time and
//! its whole message, so those are the same message, whose readings the store
//! would count once anyway.

use std::fmt::Write as _;

use async_nats::HeaderMap;
use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use sha2::{Digest, Sha256};

use super::{NatsStream, subject};
use crate::partition;
use crate::{ProduceError, PutOutcome, PutRecord, SeqNo};

/// The header that carries a record's partition key, which a reader returns.
pub(super) const KEY_HEADER: &str = "Iotpipe-Partition-Key";

/// Publishes of one put awaiting their acks at most; well under the
/// client's pool of ack permits (5,000), which concurrent puts share.
const MAX_ACKS_PENDING: usize = 1024;

/// Kinesis's limit, kept so that a key valid here is valid on every backend.
const MAX_PARTITION_KEY_CHARS: usize = 256;

pub(super) async fn put(
    stream: &NatsStream,
    records: Vec<PutRecord>,
) -> Result<Vec<PutOutcome>, ProduceError> {
    let mut outcomes: Vec<Option<PutOutcome>> = vec![None; records.len()];
    let mut acks = Vec::with_capacity(records.len().min(MAX_ACKS_PENDING));
    {
        let _turn = stream.publish_turn.lock().await;
        // The key and partition of the record before: see
        // `partition::shard_after`.
        let mut previous: Option<(String, u32)> = None;
        for (i, record) in records.into_iter().enumerate() {
            if acks.len() == MAX_ACKS_PENDING {
                // The client lends each unanswered publish a permit; a put
                // larger than its pool would wait on its own acks forever.
                settle(std::mem::take(&mut acks), &mut outcomes).await;
            }
            if let Err(message) = check_key(&record.partition_key) {
                outcomes[i] = Some(PutOutcome::Failed {
                    retryable: false,
                    message,
                });
                continue;
            }
            let partition = partition::shard_after(
                &record.partition_key,
                previous.as_ref().map(|(k, p)| (k.as_str(), *p)),
                stream.partitions,
            );
            let mut headers = HeaderMap::new();
            headers.insert(KEY_HEADER, record.partition_key.as_str());
            let publish = PublishMessage::build()
                .payload(record.data.clone())
                .headers(headers)
                .message_id(message_id(&record));
            match stream
                .js
                .send_publish(subject(&stream.name, partition), publish)
                .await
            {
                Ok(ack) => acks.push((i, partition, ack)),
                Err(e) => outcomes[i] = Some(failed(e.kind(), &e)),
            }
            previous = Some((record.partition_key, partition));
        }
    }
    settle(acks, &mut outcomes).await;
    Ok(outcomes
        .into_iter()
        .map(|o| {
            o.unwrap_or(PutOutcome::Failed {
                retryable: true,
                message: "no outcome".to_string(),
            })
        })
        .collect())
}

/// Waits for `acks` and records what each says.
async fn settle(acks: Vec<(usize, u32, PublishAckFuture)>, outcomes: &mut [Option<PutOutcome>]) {
    let acked = futures::future::join_all(
        acks.into_iter()
            .map(|(i, partition, ack)| async move { (i, partition, ack.await) }),
    )
    .await;
    for (i, partition, ack) in acked {
        outcomes[i] = Some(match ack {
            Ok(ack) => PutOutcome::Stored {
                shard: super::shard_id(partition),
                seq: SeqNo::from(ack.sequence),
            },
            Err(e) => failed(e.kind(), &e),
        });
    }
}

/// A key that fits in a header value and in every backend's limits.
fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("the partition key is empty".to_string());
    }
    if key.chars().count() > MAX_PARTITION_KEY_CHARS {
        return Err(format!(
            "the partition key is over {MAX_PARTITION_KEY_CHARS} characters"
        ));
    }
    if key.chars().any(char::is_control) {
        // A header line cannot carry it.
        return Err("the partition key has a control character".to_string());
    }
    Ok(())
}

/// The record's message id: the first 128 bits of SHA-256 over its key and
/// bytes, in hex. The key's length goes first so that no two (key, bytes)
/// pairs hash the same input.
pub(super) fn message_id(record: &PutRecord) -> String {
    let mut hash = Sha256::new();
    hash.update((record.partition_key.len() as u64).to_be_bytes());
    hash.update(record.partition_key.as_bytes());
    hash.update(&record.data);
    let digest = hash.finalize();
    let mut id = String::with_capacity(32);
    for byte in &digest[..16] {
        let _ = write!(id, "{byte:02x}");
    }
    id
}

/// A publish that got no PubAck. Whether it was stored is unknown for a
/// timeout, so it is retryable: the message id makes the retry harmless.
fn failed(kind: PublishErrorKind, error: &dyn std::fmt::Display) -> PutOutcome {
    let retryable = match kind {
        PublishErrorKind::MaxPayloadExceeded
        | PublishErrorKind::WrongLastMessageId
        | PublishErrorKind::WrongLastSequence => false,
        PublishErrorKind::StreamNotFound
        | PublishErrorKind::TimedOut
        | PublishErrorKind::BrokenPipe
        | PublishErrorKind::MaxAckPending
        | PublishErrorKind::Other => true,
    };
    PutOutcome::Failed {
        retryable,
        message: format!("publishing to JetStream: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn record(key: &str, data: &'static [u8]) -> PutRecord {
        PutRecord {
            partition_key: key.to_string(),
            data: Bytes::from_static(data),
        }
    }

    #[test]
    fn message_ids_follow_key_and_bytes() {
        let id = message_id(&record("dev-1", b"abc"));
        assert_eq!(id.len(), 32);
        assert_eq!(id, message_id(&record("dev-1", b"abc")));
        assert_ne!(id, message_id(&record("dev-1", b"abd")));
        assert_ne!(id, message_id(&record("dev-2", b"abc")));
        // The key's length keeps the boundary between key and bytes.
        assert_ne!(
            message_id(&record("dev-1a", b"bc")),
            message_id(&record("dev-1", b"abc"))
        );
    }

    #[test]
    fn keys_a_header_cannot_carry_are_refused() {
        assert!(check_key("dev-1").is_ok());
        assert!(check_key("").is_err());
        assert!(check_key("dev\r\nNats-Msg-Id: x").is_err());
        assert!(check_key(&"k".repeat(257)).is_err());
    }
}
