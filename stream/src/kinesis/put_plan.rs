//! The producer's queue state, without I/O: what to send next, what to
//! retry, and which outcomes are final (pure; time and randomness are
//! arguments).
//!
//! Records are queued per partition key, oldest first. Each round sends the
//! head of every key whose backoff has passed, packed into requests within
//! Kinesis's limits; a key's next record becomes its head only once the one
//! before it is stored. The async driver (`producer::put_ordered`) only
//! sends the requests of a round and hands their results back here.

use std::collections::{HashMap, VecDeque};

use aws::backoff::Backoff;
use aws::client::is_retryable_code;
use aws::seq;
use rand::Rng;
use tokio::time::Instant;

use super::producer::{
    CallFailure, EntryResult, MAX_PARTITION_KEY_CHARS, MAX_RECORD_BYTES, MAX_REQUEST_BYTES,
    MAX_REQUEST_RECORDS, ProducerConfig,
};
use crate::{ProduceError, PutOutcome, PutRecord};

/// What the driver does next.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Send these requests now (side by side), then settle each result.
    Send(Vec<Request>),
    /// No key is ready before this time.
    WaitUntil(Instant),
    /// Every record's outcome is final: call [`PutPlan::finish`].
    Done,
}

/// One PutRecords request: the head record of each of some keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Request {
    /// Indices into the call's records, at most one per partition key.
    pub records: Vec<usize>,
    /// The key queue each record heads, in the same order.
    queues: Vec<usize>,
}

/// The records of one partition key not yet settled, oldest first.
#[derive(Debug)]
struct KeyQueue {
    pending: VecDeque<usize>,
    /// Failed attempts of the head record so far.
    failures: u32,
    /// When the head may be sent again, after a failure's backoff.
    ready_at: Instant,
}

/// What became of one record in one request.
enum Verdict {
    Stored {
        shard: String,
        seq: String,
    },
    Failed {
        retryable: bool,
        message: String,
        /// The whole request failed, not this record alone.
        by_call: bool,
    },
}

/// The state of one `put` call.
#[derive(Debug)]
pub(crate) struct PutPlan {
    /// Each record's final outcome, once it has one.
    outcomes: Vec<Option<PutOutcome>>,
    /// Whether a record's failure came from whole-request failures only: if
    /// every record failed so, nothing reached the stream and the call as a
    /// whole is reported unavailable.
    failed_by_call: Vec<bool>,
    /// What each record weighs against the request byte limit.
    sizes: Vec<usize>,
    queues: Vec<KeyQueue>,
    last_call_failure: Option<String>,
    max_attempts: u32,
    backoff: Backoff,
}

impl PutPlan {
    /// Queues `records` by key at `start`; a record that can never be sent
    /// (see [`refusal`]) is failed for good at once and holds nothing back.
    pub fn new(records: &[PutRecord], cfg: &ProducerConfig, start: Instant) -> Self {
        let mut outcomes = vec![None; records.len()];
        let mut queues: Vec<KeyQueue> = Vec::new();
        let mut by_key: HashMap<&str, usize> = HashMap::new();
        for (i, record) in records.iter().enumerate() {
            if let Some(why) = refusal(record) {
                outcomes[i] = Some(PutOutcome::Failed {
                    retryable: false,
                    message: why,
                });
                continue;
            }
            let q = *by_key.entry(&record.partition_key).or_insert_with(|| {
                queues.push(KeyQueue {
                    pending: VecDeque::new(),
                    failures: 0,
                    ready_at: start,
                });
                queues.len() - 1
            });
            queues[q].pending.push_back(i);
        }
        PutPlan {
            outcomes,
            failed_by_call: vec![false; records.len()],
            sizes: records.iter().map(record_size).collect(),
            queues,
            last_call_failure: None,
            max_attempts: cfg.max_attempts,
            backoff: cfg.backoff,
        }
    }

    /// What to do at `now`: the head of every ready key, split into requests
    /// within the record and byte limits; or how long to wait; or nothing.
    pub fn next_step(&mut self, now: Instant) -> Step {
        self.queues.retain(|q| !q.pending.is_empty());
        let Some(next_ready) = self.queues.iter().map(|q| q.ready_at).min() else {
            return Step::Done;
        };
        if next_ready > now {
            return Step::WaitUntil(next_ready);
        }
        let mut requests: Vec<Request> = Vec::new();
        let mut bytes = 0;
        for (q, queue) in self.queues.iter().enumerate() {
            if queue.ready_at > now {
                continue;
            }
            let head = queue.pending[0];
            let size = self.sizes[head];
            let fits = requests.last().is_some_and(|r| {
                r.records.len() < MAX_REQUEST_RECORDS && bytes + size <= MAX_REQUEST_BYTES
            });
            if !fits {
                requests.push(Request {
                    records: Vec::new(),
                    queues: Vec::new(),
                });
                bytes = 0;
            }
            if let Some(r) = requests.last_mut() {
                r.records.push(head);
                r.queues.push(q);
            }
            bytes += size;
        }
        Step::Send(requests)
    }

    /// Takes the result of `request`, sent in the round that began at `now`:
    /// a stored head makes way for its key's next record; a failed one is
    /// retried after a backoff drawn from `rng`, or, once it is out of
    /// attempts or not retryable, fails with every later record of its key.
    pub fn settle(
        &mut self,
        request: &Request,
        result: Result<Vec<EntryResult>, CallFailure>,
        now: Instant,
        rng: &mut impl Rng,
    ) {
        let verdicts: Vec<Verdict> = match result {
            Ok(entries) => entries.into_iter().map(entry_verdict).collect(),
            Err(failure) => {
                let verdicts = request
                    .queues
                    .iter()
                    .map(|_| Verdict::Failed {
                        retryable: failure.retryable,
                        message: failure.message.clone(),
                        by_call: true,
                    })
                    .collect();
                self.last_call_failure = Some(failure.message);
                verdicts
            }
        };
        for (&q, verdict) in request.queues.iter().zip(verdicts) {
            match verdict {
                Verdict::Stored { shard, seq } => self.stored(q, shard, &seq),
                Verdict::Failed {
                    retryable,
                    message,
                    by_call,
                } => self.failed(q, retryable, message, by_call, now, rng),
            }
        }
    }

    fn stored(&mut self, q: usize, shard: String, seq: &str) {
        let queue = &mut self.queues[q];
        let Some(head) = queue.pending.pop_front() else {
            return;
        };
        queue.failures = 0;
        self.outcomes[head] = Some(match seq::parse(seq) {
            Ok(seq) => PutOutcome::Stored { shard, seq },
            // Stored, but not as a position the caller can use; a retry only
            // duplicates, which the processors absorb.
            Err(e) => PutOutcome::Failed {
                retryable: false,
                message: e.to_string(),
            },
        });
    }

    fn failed(
        &mut self,
        q: usize,
        retryable: bool,
        message: String,
        by_call: bool,
        now: Instant,
        rng: &mut impl Rng,
    ) {
        let queue = &mut self.queues[q];
        if queue.pending.is_empty() {
            return;
        }
        queue.failures += 1;
        if retryable && queue.failures < self.max_attempts {
            queue.ready_at = now + self.backoff.delay(queue.failures, rng);
            return;
        }
        let attempts = queue.failures;
        for (n, i) in queue.pending.drain(..).enumerate() {
            self.failed_by_call[i] = by_call;
            self.outcomes[i] = Some(PutOutcome::Failed {
                retryable,
                message: if n == 0 {
                    format!("not stored after {attempts} attempts: {message}")
                } else {
                    format!("not sent: an earlier record of its partition key failed ({message})")
                },
            });
        }
    }

    /// One outcome per record, in order; or `Unavailable` when whole-request
    /// failures alone kept every record out of the stream.
    pub fn finish(self) -> Result<Vec<PutOutcome>, ProduceError> {
        let nothing_stored = self
            .outcomes
            .iter()
            .all(|o| !matches!(o, Some(PutOutcome::Stored { .. })));
        if let Some(message) = self.last_call_failure
            && !self.outcomes.is_empty()
            && nothing_stored
            && self.failed_by_call.iter().all(|b| *b)
        {
            return Err(ProduceError::Unavailable(message));
        }
        Ok(self
            .outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| PutOutcome::Failed {
                    retryable: true,
                    message: "not sent".to_string(),
                })
            })
            .collect())
    }
}

fn entry_verdict(entry: EntryResult) -> Verdict {
    match entry {
        EntryResult::Stored { shard, seq } => Verdict::Stored { shard, seq },
        EntryResult::Failed { code, message } => Verdict::Failed {
            retryable: is_retryable_code(&code),
            message: format!("{code}: {message}"),
            by_call: false,
        },
    }
}

/// Why a record cannot be sent at all.
fn refusal(record: &PutRecord) -> Option<String> {
    let key_chars = record.partition_key.chars().count();
    if key_chars == 0 || key_chars > MAX_PARTITION_KEY_CHARS {
        return Some(format!(
            "a partition key has 1..={MAX_PARTITION_KEY_CHARS} characters, this one {key_chars}"
        ));
    }
    let size = record_size(record);
    if size > MAX_RECORD_BYTES {
        return Some(format!(
            "a record (data and partition key) is at most {MAX_RECORD_BYTES} bytes, this one {size}"
        ));
    }
    None
}

fn record_size(record: &PutRecord) -> usize {
    record.data.len() + record.partition_key.len()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;
    use crate::SeqNo;
    use crate::kinesis::fates;

    fn rec(key: &str, n: usize) -> PutRecord {
        PutRecord {
            partition_key: key.into(),
            data: Bytes::from(format!("{key}/{n}")),
        }
    }

    /// A plan for `records` with `max_attempts` per record, begun now, and
    /// its backoff jitter's dice seeded with `seed`.
    fn start(records: &[PutRecord], max_attempts: u32, seed: u64) -> (PutPlan, StdRng, Instant) {
        let t0 = Instant::now();
        let plan = PutPlan::new(records, &cfg(max_attempts), t0);
        (plan, StdRng::seed_from_u64(seed), t0)
    }

    /// Settles `request` with `result`, which must leave nothing more to do,
    /// and finishes the plan.
    fn settle_last(
        mut plan: PutPlan,
        request: &Request,
        result: Result<Vec<EntryResult>, CallFailure>,
        now: Instant,
        rng: &mut StdRng,
    ) -> Result<Vec<PutOutcome>, ProduceError> {
        plan.settle(request, result, now, rng);
        assert_eq!(plan.next_step(now), Step::Done);
        plan.finish()
    }

    fn cfg(max_attempts: u32) -> ProducerConfig {
        ProducerConfig {
            max_attempts,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(1)),
            max_concurrent_requests: 4,
        }
    }

    fn stored(seq: u64) -> EntryResult {
        EntryResult::Stored {
            shard: "s".into(),
            seq: seq.to_string(),
        }
    }

    fn throttled() -> EntryResult {
        EntryResult::Failed {
            code: "ProvisionedThroughputExceededException".into(),
            message: "slow down".into(),
        }
    }

    fn requests(step: Step) -> Vec<Request> {
        match step {
            Step::Send(requests) => requests,
            other => panic!("expected requests, got {other:?}"),
        }
    }

    #[test]
    fn a_round_sends_one_record_per_key_and_the_next_only_once_it_is_stored() {
        let records = [rec("a", 0), rec("b", 0), rec("a", 1)];
        let (mut plan, mut rng, t0) = start(&records, 3, 1);

        let round = requests(plan.next_step(t0));
        assert_eq!(round.len(), 1);
        assert_eq!(round[0].records, [0, 1]);
        plan.settle(&round[0], Ok(vec![stored(1), stored(2)]), t0, &mut rng);

        let round = requests(plan.next_step(t0));
        assert_eq!(round[0].records, [2]);
        plan.settle(&round[0], Ok(vec![stored(3)]), t0, &mut rng);

        assert_eq!(plan.next_step(t0), Step::Done);
        let out = plan.finish().unwrap();
        let seqs: Vec<SeqNo> = out
            .iter()
            .map(|o| match o {
                PutOutcome::Stored { seq, .. } => *seq,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(seqs, [1u64, 2, 3].map(SeqNo::from));
    }

    #[test]
    fn a_throttled_key_backs_off_while_other_keys_go_on() {
        let records = [rec("a", 0), rec("b", 0), rec("b", 1)];
        let (mut plan, mut rng, t0) = start(&records, 3, 2);

        let round = requests(plan.next_step(t0));
        plan.settle(&round[0], Ok(vec![throttled(), stored(1)]), t0, &mut rng);

        // b's next record goes at once; a waits out its backoff.
        let round = requests(plan.next_step(t0));
        assert_eq!(round[0].records, [2]);
        plan.settle(&round[0], Ok(vec![stored(2)]), t0, &mut rng);
        let Step::WaitUntil(at) = plan.next_step(t0) else {
            panic!("a should wait");
        };
        assert!(at > t0 && at <= t0 + Duration::from_millis(100), "{at:?}");

        let round = requests(plan.next_step(at));
        assert_eq!(round[0].records, [0]);
        plan.settle(&round[0], Ok(vec![stored(3)]), at, &mut rng);
        assert_eq!(plan.next_step(at), Step::Done);
        let out = plan.finish().unwrap();
        assert!(out.iter().all(|o| matches!(o, PutOutcome::Stored { .. })));
    }

    #[test]
    fn a_head_out_of_attempts_fails_its_key_unsent_records_too() {
        let records = [rec("a", 0), rec("a", 1)];
        let (mut plan, mut rng, t0) = start(&records, 2, 3);
        let mut now = t0;
        let mut sends = 0;
        loop {
            match plan.next_step(now) {
                Step::Send(round) => {
                    sends += 1;
                    assert_eq!(round[0].records, [0], "a/1 sent before a/0 was stored");
                    plan.settle(&round[0], Ok(vec![throttled()]), now, &mut rng);
                }
                Step::WaitUntil(at) => now = at,
                Step::Done => break,
            }
        }
        assert_eq!(sends, 2);
        let out = plan.finish().unwrap();
        for (o, starts) in out.iter().zip(["not stored after 2 attempts", "not sent"]) {
            assert!(
                matches!(o, PutOutcome::Failed { retryable: true, message } if message.starts_with(starts)),
                "{o:?}"
            );
        }
    }

    #[test]
    fn a_refused_or_non_retryable_record_is_final_at_once() {
        let big = PutRecord {
            partition_key: "a".into(),
            data: Bytes::from(vec![b'x'; MAX_RECORD_BYTES]),
        };
        let records = [big, rec("b", 0)];
        let (mut plan, mut rng, t0) = start(&records, 10, 4);
        let round = requests(plan.next_step(t0));
        assert_eq!(round[0].records, [1], "a refused record is never sent");
        let denied = EntryResult::Failed {
            code: "KMSAccessDeniedException".into(),
            message: "no".into(),
        };
        let out = settle_last(plan, &round[0], Ok(vec![denied]), t0, &mut rng).unwrap();
        assert_eq!(fates(&out), ["final", "final"], "{out:?}");
    }

    #[test]
    fn a_stored_record_with_an_unreadable_sequence_number_is_not_retried() {
        let records = [rec("a", 0)];
        let (mut plan, mut rng, t0) = start(&records, 3, 5);
        let round = requests(plan.next_step(t0));
        let odd = EntryResult::Stored {
            shard: "s".into(),
            seq: "not-a-number".into(),
        };
        let out = settle_last(plan, &round[0], Ok(vec![odd]), t0, &mut rng).unwrap();
        assert_eq!(fates(&out), ["final"]);
    }

    #[test]
    fn only_whole_request_failures_for_every_record_make_the_call_unavailable() {
        let failure = || CallFailure {
            retryable: true,
            message: "connection reset".into(),
        };
        let records = [rec("a", 0), rec("b", 0)];
        let t0 = Instant::now();
        let mut rng = StdRng::seed_from_u64(6);

        let mut plan = PutPlan::new(&records, &cfg(1), t0);
        let round = requests(plan.next_step(t0));
        let finished = settle_last(plan, &round[0], Err(failure()), t0, &mut rng);
        assert!(matches!(finished, Err(ProduceError::Unavailable(_))));

        // One record refused before sending: the call did reach a verdict
        // of its own, so it reports per record.
        let records = [rec("a", 0), rec("", 0)];
        let mut plan = PutPlan::new(&records, &cfg(1), t0);
        let round = requests(plan.next_step(t0));
        let out = settle_last(plan, &round[0], Err(failure()), t0, &mut rng).unwrap();
        assert_eq!(fates(&out)[0], "retryable");
    }

    #[test]
    fn requests_fill_to_the_record_limit_then_to_the_byte_limit() {
        let small: Vec<PutRecord> = (0..MAX_REQUEST_RECORDS + 1)
            .map(|i| rec(&format!("k{i}"), 0))
            .collect();
        let t0 = Instant::now();
        let mut plan = PutPlan::new(&small, &cfg(1), t0);
        let sizes: Vec<usize> = requests(plan.next_step(t0))
            .iter()
            .map(|r| r.records.len())
            .collect();
        assert_eq!(sizes, [MAX_REQUEST_RECORDS, 1]);

        // Six records of 1 MiB less the key: five fill a request's bytes.
        let large: Vec<PutRecord> = (0..6)
            .map(|i| PutRecord {
                partition_key: format!("k{i}"),
                data: Bytes::from(vec![b'x'; MAX_RECORD_BYTES - 2]),
            })
            .collect();
        let mut plan = PutPlan::new(&large, &cfg(1), t0);
        let sizes: Vec<usize> = requests(plan.next_step(t0))
            .iter()
            .map(|r| r.records.len())
            .collect();
        assert_eq!(sizes, [5, 1]);
    }
}
