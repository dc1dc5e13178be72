//! Nothing lost, nothing counted twice: the simulator's fleet, with its own
//! duplicates, reordering and malformed messages, against a pipeline whose
//! stream drops and duplicates records and whose store fails one commit in
//! ten, before writing or halfway through. Every window must still match.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use device_sim::plan::FaultConfig;
use device_sim::{BrokerAddr, Rate, SimConfig, Stop};
use iotpipe::Hooks;
use schemas::{StreamRecord, decode_record};
use stream::PutRecord;
use testkit::store_fault::{FaultyStore, StoreFaults};
use testkit::stream_fault::{FaultyProducer, RecordObserver, StreamFaults};

/// What the records the stream holds twice add to each `/v1/stats` counter
/// that the simulator checks: the simulator cannot know about them, since
/// its device was told the message was never stored.
#[derive(Debug, Default)]
struct Extra(BTreeMap<&'static str, i64>);

impl Extra {
    fn add(&mut self, record: &PutRecord) {
        let counter = match decode_record(&record.data) {
            Ok(StreamRecord::Readings(r)) => {
                // Every reading of the copy meets its own identity again.
                *self.0.entry("duplicate_readings").or_default() += r.readings.len() as i64;
                return;
            }
            // A refused message is kept and counted per stream record.
            Ok(StreamRecord::Rejected(m)) => match m.reason.as_str() {
                "malformed_json" => "rejected.malformed_json",
                other => panic!("the simulator sent a message refused as {other}"),
            },
            // Presence counts nothing: a copy only sets the same state.
            Ok(StreamRecord::Presence(_)) => return,
            Err(e) => panic!("the endpoint put an unreadable record: {e:?}"),
        };
        *self.0.entry(counter).or_default() += 1;
    }

    fn of(&self, counter: &str) -> i64 {
        self.0.get(counter).copied().unwrap_or(0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_window_is_exact_despite_stream_and_store_faults() {
    let dir = tempfile::tempdir().unwrap();
    let extra = Arc::new(Mutex::new(Extra::default()));
    let stream_faults = StreamFaults {
        seed: 21,
        record_failed: 0.10,
        record_stored_but_failed: 0.03,
        put_unavailable: 0.02,
        on_stored_but_failed: Some(RecordObserver(Arc::new({
            let extra = extra.clone();
            move |r: &PutRecord| extra.lock().unwrap().add(r)
        }))),
        ..StreamFaults::default()
    };
    let store_faults = StoreFaults {
        seed: 22,
        commit_error_before: 0.05,
        commit_error_partial: 0.05,
        conflict: 0.02,
        load_error: 0.02,
        ..StoreFaults::default()
    };
    let hooks = Hooks {
        wrap_producer: Some(Box::new({
            let f = stream_faults.clone();
            move |inner| FaultyProducer::wrap(inner, f.clone())
        })),
        wrap_store: Some(Box::new({
            let f = store_faults.clone();
            move |inner| FaultyStore::wrap(inner, f.clone())
        })),
        wrap_reader: None,
    };
    let p = iotpipe::start_with(&support::config(dir.path()), hooks)
        .await
        .unwrap();

    let summary = device_sim::run(SimConfig {
        broker: BrokerAddr {
            host: p.mqtt_addr.ip().to_string(),
            port: p.mqtt_addr.port(),
        },
        verify: Some(format!("http://{}", p.http_addr)),
        verify_timeout: Duration::from_secs(30),
        devices: 40,
        rate: Rate::PerDevice(5.0),
        stop: Stop::After(Duration::from_secs(6)),
        seed: 23,
        faults: FaultConfig {
            duplicate_rate: 0.05,
            reorder_rate: 0.05,
            malformed_rate: 0.02,
            ..FaultConfig::default()
        },
        ..SimConfig::default()
    })
    .await
    .unwrap();

    let stream_injected = stream_faults.injected.snapshot();
    let store_injected = store_faults.injected.snapshot();
    println!("{summary}\nstream faults: {stream_injected:?}\nstore faults: {store_injected:?}");
    assert_eq!(summary.failed, 0, "{summary:?}");
    assert_eq!(summary.acked, summary.messages_sent);
    assert!(
        summary.duplicates_sent > 0 && summary.malformed_sent > 0,
        "{summary:?}"
    );
    // The faults really happened, each kind more than a few times.
    assert!(stream_injected.record_failed > 50, "{stream_injected:?}");
    assert!(
        stream_injected.record_stored_but_failed > 10,
        "{stream_injected:?}"
    );
    assert!(stream_injected.put_unavailable > 0, "{stream_injected:?}");
    assert!(
        store_injected.commit_errors_before > 0,
        "{store_injected:?}"
    );
    assert!(store_injected.partial_commits > 0, "{store_injected:?}");

    let v = summary.verify.expect("verify ran");
    assert!(v.caught_up, "{v}");
    assert_eq!(v.mismatch_count, 0, "{v}");
    assert!(v.windows >= v.series, "{v:?}");
    let extra = std::mem::take(&mut *extra.lock().unwrap());
    assert!(extra.of("duplicate_readings") > 0, "{extra:?}");
    for check in &v.stats {
        let got = check.got - extra.of(&check.counter);
        assert!(
            (check.expected_lo as i64..=check.expected_hi as i64).contains(&got),
            "{}: {} less {} from stream duplicates is outside [{}, {}]",
            check.counter,
            check.got,
            extra.of(&check.counter),
            check.expected_lo,
            check.expected_hi
        );
    }
    assert_eq!(v.stats.len(), 4, "{v:?}");
    p.shutdown().await.unwrap();
}
