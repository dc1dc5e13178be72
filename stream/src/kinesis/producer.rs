//! The Kinesis producer: PutRecords in batches, partial failures retried, a
//! partition key's records stored in the order they were given.
//!
//! PutRecords processes every entry of a request independently: when an
//! entry fails (throttling on its shard, an internal failure), later entries
//! of the same request may still be stored. Sending two records of one key in
//! one request could therefore store the second without the first. So each
//! request carries at most one record per key, the oldest one not yet
//! stored; a key's next record goes only after that one is stored. Keys are
//! independent: while one key backs off, the others go on.
//!
//! Throughput per key is then one record per round trip, which suits iotpipe:
//! a device's readings travel packed into few records. A record refused for
//! good before sending (too large, a bad key) holds nothing back, as it will
//! never be stored; a record the stream keeps failing fails the key's later
//! records of the call too, unsent.
//!
//! Those decisions are `put_plan`'s, which does no I/O and reads no clock;
//! [`put_ordered`] only sends each round's requests and hands back results.

use std::time::Duration;

use async_trait::async_trait;
use aws::backoff::Backoff;
use aws::client::{describe, is_retryable};
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use futures::StreamExt;
use tokio::time::Instant;

use super::put_plan::{PutPlan, Step};
use crate::{ProduceError, PutOutcome, PutRecord};

/// Kinesis's limits on PutRecords.
pub const MAX_REQUEST_RECORDS: usize = 500;
pub const MAX_REQUEST_BYTES: usize = 5 * 1024 * 1024;
/// A record's data plus its partition key.
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;
pub const MAX_PARTITION_KEY_CHARS: usize = 256;

/// How the producer sends and retries.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// Attempts per record before it is reported failed (retryable), counting
    /// the first.
    pub max_attempts: u32,
    /// Delay caps between attempts of a record, with full jitter.
    pub backoff: Backoff,
    /// PutRecords requests in flight at once for one `put` call; more keys
    /// than one request holds are sent side by side.
    pub max_concurrent_requests: usize,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            max_attempts: 10,
            backoff: Backoff::new(Duration::from_millis(50), Duration::from_secs(2)),
            max_concurrent_requests: 4,
        }
    }
}

/// What happened to one entry of a PutRecords request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum EntryResult {
    Stored { shard: String, seq: String },
    Failed { code: String, message: String },
}

/// A PutRecords request that failed as a whole: nothing in it was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CallFailure {
    pub retryable: bool,
    pub message: String,
}

/// The one call the producer makes, so that the ordering and retry logic can
/// be tested against scripted failures.
#[async_trait]
pub(crate) trait PutRecordsApi: Send + Sync {
    /// One result per entry, in order.
    async fn put_records(&self, entries: &[&PutRecord]) -> Result<Vec<EntryResult>, CallFailure>;
}

/// PutRecords on a stream through the SDK.
pub(crate) struct SdkPutRecords<'a> {
    pub client: &'a aws_sdk_kinesis::Client,
    pub stream_name: &'a str,
}

#[async_trait]
impl PutRecordsApi for SdkPutRecords<'_> {
    async fn put_records(&self, entries: &[&PutRecord]) -> Result<Vec<EntryResult>, CallFailure> {
        let mut request = self.client.put_records().stream_name(self.stream_name);
        for record in entries {
            let entry = PutRecordsRequestEntry::builder()
                .data(Blob::new(record.data.to_vec()))
                .partition_key(&record.partition_key)
                .build()
                .map_err(|e| CallFailure {
                    retryable: false,
                    message: e.to_string(),
                })?;
            request = request.records(entry);
        }
        let output = request.send().await.map_err(|e| CallFailure {
            retryable: is_retryable(&e),
            message: describe(&e),
        })?;
        if output.records().len() != entries.len() {
            // Which entry a result belongs to is unknowable now; retrying the
            // request may duplicate, never lose.
            return Err(CallFailure {
                retryable: true,
                message: format!(
                    "PutRecords returned {} results for {} records",
                    output.records().len(),
                    entries.len()
                ),
            });
        }
        Ok(output
            .records()
            .iter()
            .map(
                |r| match (r.shard_id(), r.sequence_number(), r.error_code()) {
                    (Some(shard), Some(seq), None) => EntryResult::Stored {
                        shard: shard.to_string(),
                        seq: seq.to_string(),
                    },
                    (_, _, code) => EntryResult::Failed {
                        code: code.unwrap_or("InternalFailure").to_string(),
                        message: r.error_message().unwrap_or("no message").to_string(),
                    },
                },
            )
            .collect())
    }
}

/// Stores `records` through `api`, as described in the module docs: the
/// plan decides each round's requests, this sends them side by side and
/// hands each result back.
pub(crate) async fn put_ordered(
    api: &dyn PutRecordsApi,
    records: &[PutRecord],
    cfg: &ProducerConfig,
) -> Result<Vec<PutOutcome>, ProduceError> {
    let mut plan = PutPlan::new(records, cfg, Instant::now());
    loop {
        let now = Instant::now();
        let requests = match plan.next_step(now) {
            Step::Send(requests) => requests,
            Step::WaitUntil(at) => {
                tokio::time::sleep_until(at).await;
                continue;
            }
            Step::Done => return plan.finish(),
        };
        let results: Vec<_> = futures::stream::iter(requests)
            .map(|request| async move {
                let entries: Vec<&PutRecord> =
                    request.records.iter().map(|&i| &records[i]).collect();
                let result = api.put_records(&entries).await;
                (request, result)
            })
            .buffer_unordered(cfg.max_concurrent_requests.max(1))
            .collect()
            .await;
        // A thread's generator is not Send: take it only between awaits.
        let mut rng = rand::rng();
        for (request, result) in results {
            plan.settle(&request, result, now, &mut rng);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use bytes::Bytes;

    use super::*;
    use crate::kinesis::fates;

    type Script = Box<dyn Fn(&str, u32) -> Option<&'static str> + Send + Sync>;

    /// A scripted stream: every shard is "s", sequence numbers count up, and
    /// `fail` decides which sends of which records fail.
    struct Scripted {
        next_seq: Mutex<u64>,
        /// Every entry sent, per request.
        sent: Mutex<Vec<Vec<String>>>,
        /// Records stored, in store order.
        stored: Mutex<Vec<String>>,
        /// (data, attempt number from 1) → failure code; attempts count per data.
        fail: Script,
        attempts: Mutex<std::collections::HashMap<String, u32>>,
        call_failures: Mutex<u32>,
    }

    impl Scripted {
        fn new(fail: impl Fn(&str, u32) -> Option<&'static str> + Send + Sync + 'static) -> Self {
            Scripted {
                next_seq: Mutex::new(1),
                sent: Mutex::default(),
                stored: Mutex::default(),
                fail: Box::new(fail),
                attempts: Mutex::default(),
                call_failures: Mutex::new(0),
            }
        }
    }

    #[async_trait]
    impl PutRecordsApi for Scripted {
        async fn put_records(
            &self,
            entries: &[&PutRecord],
        ) -> Result<Vec<EntryResult>, CallFailure> {
            {
                let mut left = self.call_failures.lock().unwrap();
                if *left > 0 {
                    *left -= 1;
                    return Err(CallFailure {
                        retryable: true,
                        message: "connection reset".into(),
                    });
                }
            }
            let data: Vec<String> = entries
                .iter()
                .map(|r| String::from_utf8(r.data.to_vec()).unwrap())
                .collect();
            self.sent.lock().unwrap().push(data.clone());
            Ok(data
                .into_iter()
                .map(|d| {
                    let attempt = {
                        let mut a = self.attempts.lock().unwrap();
                        let n = a.entry(d.clone()).or_default();
                        *n += 1;
                        *n
                    };
                    match (self.fail)(&d, attempt) {
                        Some(code) => EntryResult::Failed {
                            code: code.into(),
                            message: "scripted".into(),
                        },
                        None => {
                            let mut seq = self.next_seq.lock().unwrap();
                            *seq += 1;
                            self.stored.lock().unwrap().push(d);
                            EntryResult::Stored {
                                shard: "s".into(),
                                seq: seq.to_string(),
                            }
                        }
                    }
                })
                .collect())
        }
    }

    fn rec(key: &str, n: usize) -> PutRecord {
        PutRecord {
            partition_key: key.into(),
            data: Bytes::from(format!("{key}/{n}")),
        }
    }

    fn stored_order(api: &Scripted, key: &str) -> Vec<String> {
        api.stored
            .lock()
            .unwrap()
            .iter()
            .filter(|d| d.starts_with(&format!("{key}/")))
            .cloned()
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_waits_for_its_failed_record_while_others_go_on() {
        // a/0 is throttled twice; b's records never fail.
        let api = Scripted::new(|d, attempt| {
            (d == "a/0" && attempt <= 2).then_some("ProvisionedThroughputExceededException")
        });
        let records = vec![
            rec("a", 0),
            rec("b", 0),
            rec("a", 1),
            rec("b", 1),
            rec("a", 2),
        ];
        let out = put_ordered(&api, &records, &ProducerConfig::default())
            .await
            .unwrap();
        assert!(
            out.iter().all(|o| matches!(o, PutOutcome::Stored { .. })),
            "{out:?}"
        );
        assert_eq!(stored_order(&api, "a"), ["a/0", "a/1", "a/2"]);
        assert_eq!(stored_order(&api, "b"), ["b/0", "b/1"]);
        for request in api.sent.lock().unwrap().iter() {
            let a = request.iter().filter(|d| d.starts_with("a/")).count();
            assert!(a <= 1, "two records of one key in one request: {request:?}");
        }
        // b did not wait for a's backoff: both of b's went before a/1.
        let stored = api.stored.lock().unwrap().clone();
        let pos = |d: &str| stored.iter().position(|s| s == d).unwrap();
        assert!(pos("b/1") < pos("a/1"), "{stored:?}");
        // Sequence numbers follow store order.
        let seq = |i: usize| match &out[i] {
            PutOutcome::Stored { seq, .. } => *seq,
            other => panic!("{other:?}"),
        };
        assert!(seq(0) < seq(2) && seq(2) < seq(4));
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_that_keeps_failing_fails_its_key_and_nothing_else() {
        let api = Scripted::new(|d, _| (d == "a/1").then_some("InternalFailure"));
        let cfg = ProducerConfig {
            max_attempts: 3,
            ..ProducerConfig::default()
        };
        let records = vec![rec("a", 0), rec("a", 1), rec("a", 2), rec("b", 0)];
        let out = put_ordered(&api, &records, &cfg).await.unwrap();
        assert_eq!(fates(&out), ["stored", "retryable", "retryable", "stored"]);
        assert_eq!(*api.attempts.lock().unwrap().get("a/1").unwrap(), 3);
        assert!(
            !api.attempts.lock().unwrap().contains_key("a/2"),
            "a later record was sent after an earlier one failed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn refused_records_fail_for_good_and_hold_nothing_back() {
        let api = Scripted::new(|_, _| None);
        let big = PutRecord {
            partition_key: "a".into(),
            data: Bytes::from(vec![b'x'; MAX_RECORD_BYTES]),
        };
        let empty_key = PutRecord {
            partition_key: String::new(),
            data: Bytes::from_static(b"x"),
        };
        let records = vec![big, rec("a", 1), empty_key];
        let out = put_ordered(&api, &records, &ProducerConfig::default())
            .await
            .unwrap();
        assert_eq!(fates(&out), ["final", "stored", "final"]);
    }

    #[tokio::test(start_paused = true)]
    async fn non_retryable_codes_are_not_retried() {
        let api = Scripted::new(|d, _| (d == "a/0").then_some("KMSAccessDeniedException"));
        let out = put_ordered(
            &api,
            &[rec("a", 0), rec("a", 1)],
            &ProducerConfig::default(),
        )
        .await
        .unwrap();
        assert_eq!(fates(&out), ["final", "final"]);
        assert_eq!(*api.attempts.lock().unwrap().get("a/0").unwrap(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn whole_request_failures_are_retried_then_reported_unavailable() {
        let api = Scripted::new(|_, _| None);
        *api.call_failures.lock().unwrap() = 2;
        let out = put_ordered(&api, &[rec("a", 0)], &ProducerConfig::default())
            .await
            .unwrap();
        assert!(matches!(out[0], PutOutcome::Stored { .. }));

        let api = Scripted::new(|_, _| None);
        *api.call_failures.lock().unwrap() = 100;
        let cfg = ProducerConfig {
            max_attempts: 4,
            ..ProducerConfig::default()
        };
        let err = put_ordered(&api, &[rec("a", 0), rec("b", 0)], &cfg)
            .await
            .unwrap_err();
        assert!(matches!(err, ProduceError::Unavailable(_)), "{err:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn requests_respect_the_record_and_byte_limits() {
        let api = Scripted::new(|_, _| None);
        // Small records fill requests to 500; 20 kB ones to 5 MiB first.
        let records: Vec<PutRecord> = (0..1200)
            .map(|i| PutRecord {
                partition_key: format!("k{i}"),
                data: Bytes::from(format!(
                    "k{i}/0{}",
                    " ".repeat(if i < 600 { 10 } else { 20_000 })
                )),
            })
            .collect();
        let out = put_ordered(&api, &records, &ProducerConfig::default())
            .await
            .unwrap();
        assert!(out.iter().all(|o| matches!(o, PutOutcome::Stored { .. })));
        let sent = api.sent.lock().unwrap();
        assert!(sent.len() >= 4, "{} requests", sent.len());
        assert!(sent.iter().any(|r| r.len() == MAX_REQUEST_RECORDS));
        for request in sent.iter() {
            let key_len = |d: &String| d.find('/').unwrap_or(0);
            let bytes: usize = request.iter().map(|d| d.len() + key_len(d)).sum();
            assert!(request.len() <= MAX_REQUEST_RECORDS && bytes <= MAX_REQUEST_BYTES);
        }
    }
}
