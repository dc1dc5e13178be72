//! A run spread over worker processes (`--processes`), against the stand-in
//! pipeline (`testkit::standin`): one schedule, one ledger entry, one
//! verify, and counts that add up to what the pipeline itself accepted.

#![allow(clippy::unwrap_used)]

use clap::Parser;
use device_sim::SimConfig;
use device_sim::cli::Args;
use device_sim::processes::worker_args;
use testkit::standin::Harness;

/// The configuration of `args` as `main` makes it, its workers being this
/// package's simulator binary.
fn spread(args: &[String]) -> SimConfig {
    let argv = std::iter::once("device-sim".to_string()).chain(args.iter().cloned());
    let mut cfg = Args::try_parse_from(argv)
        .unwrap()
        .into_config(false)
        .unwrap();
    if let Some(p) = cfg.processes.as_mut() {
        p.exe = env!("CARGO_BIN_EXE_device-sim").into();
        p.args = worker_args(args).unwrap();
    }
    cfg
}

/// 30 devices, 10 messages each at 10 a second, freshness on every 5th.
fn args(h: &Harness, ledger: &std::path::Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--broker",
        &format!("mqtt://{}", h.mqtt),
        "--devices",
        "30",
        "--rate",
        "10",
        "--count",
        "10",
        "--fleet",
        "spread",
        "--verify",
        &h.api_url(),
        "--verify-timeout",
        "10s",
        "--ack-timeout",
        "10s",
        "--freshness-sample",
        "5",
        "--ledger",
        &ledger.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_spread_over_three_processes_verifies_as_one() {
    let h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger.jsonl");
    let cfg = spread(&args(&h, &ledger, &["--processes", "3"]));
    assert_eq!(cfg.processes.as_ref().unwrap().count, 3);
    let s = device_sim::run(cfg).await.unwrap();
    assert!(s.ok(), "{s}");
    assert_eq!(
        (s.devices, s.messages_sent, s.acked, s.failed),
        (30, 300, 300, 0),
        "{s}"
    );
    // The pipeline's own counts agree: every seq of every device once, so
    // the workers' shares neither overlap nor leave a device out.
    let counted = {
        let stats = h.pipeline.stats.lock().unwrap();
        (stats.accepted_readings, stats.duplicate_readings)
    };
    assert_eq!(counted, (300, 0));
    for d in 0..30 {
        let id = format!("spread-d{d:05}");
        assert_eq!(
            h.pipeline.accepted_seqs(&id),
            (0..10).collect::<Vec<_>>(),
            "{id}"
        );
    }
    let v = s.verify.as_ref().unwrap();
    assert_eq!(v.devices, 30, "{v}");
    // The workers' PUBACK latencies and freshness samples are merged, not
    // dropped: 300 messages, one in 5 sampled.
    assert!(s.puback.is_some(), "{s}");
    let f = s.freshness.as_ref().unwrap();
    assert_eq!((f.samples, f.missed), (60, 0), "{s}");
    // One run in the ledger: one start line and one finish line.
    let lines = std::fs::read_to_string(&ledger).unwrap();
    assert_eq!(lines.lines().count(), 2, "{lines}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_fails_fails_the_run_and_bad_spreads_are_refused() {
    let h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger.jsonl");
    let mut cfg = spread(&args(&h, &ledger, &["--processes", "2"]));
    cfg.processes.as_mut().unwrap().exe = "/bin/false".into();
    let err = device_sim::run(cfg).await.unwrap_err().to_string();
    assert!(err.contains("worker 0 ended early"), "{err}");
    // Nothing was published, and no run was recorded as started.
    assert_eq!(h.pipeline.stats.lock().unwrap().accepted_readings, 0);
    assert!(!ledger.exists());

    for (extra, says) in [
        (&["--processes", "1"][..], "2 or more"),
        (
            &["--processes", "2", "--metrics-listen", "127.0.0.1:0"][..],
            "--metrics-listen",
        ),
    ] {
        let err = device_sim::run(spread(&args(&h, &ledger, extra)))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(says), "{extra:?}: {err}");
    }
}
