//! The simulator against the whole pipeline, in-process on port 0: every
//! device and fleet window at 1m, 1h and 1d must match what was sent.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use device_sim::{Rate, SimConfig, Stop};

fn sim(p: &iotpipe::Pipeline) -> SimConfig {
    SimConfig {
        verify_timeout: Duration::from_secs(60),
        ..support::sim(p.mqtt_addr, p.http_addr)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_devices_verify_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let p = support::start(dir.path()).await;
    let summary = device_sim::run(SimConfig {
        devices: 200,
        rate: Rate::PerDevice(5.0),
        stop: Stop::After(Duration::from_secs(10)),
        qos: 1,
        seed: 7,
        ..sim(&p)
    })
    .await
    .unwrap();
    println!("{summary:#?}");
    assert_eq!(summary.failed, 0, "{summary:?}");
    assert_eq!(summary.acked, summary.messages_sent);
    assert!(summary.messages_sent >= 200 * 5 * 10 - 200, "{summary:?}");
    let verify = support::verified(summary.verify);
    assert!(verify.windows > 1000, "{verify:?}");
    p.shutdown().await.unwrap();
}

/// Late data, with a 2 minute allowed lateness. A late reading is accepted
/// iff its minute ended less than 2 minutes before it arrived, so whether one
/// moved L seconds into the past is refused depends on the second of the
/// minute it is sent in. Two runs make both outcomes certain within any 8 s:
/// L = 125 s is accepted (and counted in `late_count`) unless sent in the
/// first 5 s of a minute; L = 175 s is refused `too_late` unless sent in the
/// last 5 s. Verify checks every window's `late_count` and the refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_readings_verify_exactly_and_too_late_ones_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let p = support::start_edited(dir.path(), |c| {
        c.aggregate.allowed_lateness = Duration::from_secs(120);
    })
    .await;
    let mut late_windows = 0;
    let mut too_late = 0;
    for (fleet, late_by_ms) in [("late", 125_000), ("later", 175_000)] {
        let before = support::get(&p, "/v1/stats").await.1;
        let summary = device_sim::run(SimConfig {
            fleet: fleet.into(),
            devices: 20,
            rate: Rate::PerDevice(4.0),
            stop: Stop::After(Duration::from_secs(8)),
            seed: 21,
            allowed_lateness: Duration::from_secs(120),
            faults: device_sim::plan::FaultConfig {
                late_rate: 0.2,
                late_by_ms,
                ..Default::default()
            },
            ..sim(&p)
        })
        .await
        .unwrap();
        println!("{summary}");
        assert!(summary.ok(), "{summary}");
        let after = support::get(&p, "/v1/stats").await.1;
        too_late += after["rejected"]["too_late"].as_u64().unwrap()
            - before["rejected"]["too_late"].as_u64().unwrap();
        let query = format!("/v1/fleets/{fleet}/metrics/temperature?res=1m");
        let (_, body) = support::get(&p, &query).await;
        late_windows += body["windows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["late_count"].as_u64().unwrap())
            .sum::<u64>();
    }
    assert!(too_late > 0, "no reading was refused too_late");
    assert!(late_windows > 0, "no late reading was accepted");
    p.shutdown().await.unwrap();
}

/// Alert rules on a fleet's and a device's 1-minute windows, provoked by
/// late readings 90 s in the past (so they land in minutes already closed,
/// each revising its window): verify finds every window exact, then checks
/// that each rule fired exactly for the windows that cross its threshold, at
/// the revision the API shows. `any` fires for every window, `never` for
/// none, the others in between; `pairs` (`for = 2`) fires for every window
/// right after another. A webhook receiver in the test sees each
/// listed alert exactly once, with a valid signature.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_fire_exactly_for_the_crossing_windows_revised_ones_included() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("alerts.toml");
    let rule = |name: &str, scope: &str, aggregate: &str, threshold: f64| {
        format!(
            "[[alerts.rules]]\nname = \"{name}\"\n{scope}\nmetric = \"temperature\"\n\
             resolution = \"1m\"\naggregate = \"{aggregate}\"\ncomparison = \">=\"\n\
             threshold = {threshold:?}\n"
        )
    };
    let fleet = "fleet = \"alerted\"";
    let text = [
        rule("any", fleet, "count", 1.0),
        rule("never", fleet, "count", 1e9),
        rule("busy", fleet, "count", 40.0),
        rule("one", "device = \"alerted-d00000\"", "count", 3.0),
        rule("pairs", fleet, "count", 1.0) + "for = 2\n",
    ]
    .concat();
    let (url, receiver) = support::webhook::receiver(0).await;
    let secret = support::webhook::SECRET;
    let webhook = format!("[alerts.webhook]\nurl = \"{url}\"\nsecret = \"{secret}\"\n");
    std::fs::write(&rules, text + &webhook).unwrap();
    let p = support::start_edited(dir.path(), |c| {
        c.alerts = iotpipe::config::Config::load(&rules).unwrap().alerts;
    })
    .await;
    let summary = device_sim::run(SimConfig {
        fleet: "alerted".into(),
        devices: 20,
        rate: Rate::PerDevice(4.0),
        stop: Stop::After(Duration::from_secs(8)),
        seed: 33,
        faults: device_sim::plan::FaultConfig {
            late_rate: 0.2,
            late_by_ms: 90_000,
            ..Default::default()
        },
        alert_rules: device_sim::verify::alerts::load_rules(&rules).unwrap(),
        ..sim(&p)
    })
    .await
    .unwrap();
    println!("{summary}");
    assert!(summary.ok(), "{summary}");
    support::verified(summary.verify.clone());
    let a = summary.alerts.as_ref().unwrap();
    assert_eq!(a.rules, 5);
    assert!(a.windows_judged > 0 && a.revised > 0, "{a}");
    assert!(a.crossing > 0 && a.crossing < a.windows_judged, "{a}");
    assert!(a.fired >= a.crossing, "{a}");

    // Every listed alert is delivered, and the receiver saw each once.
    let listed = support::wait_for(&p, "/v1/alerts?limit=1000", Duration::from_secs(30), |b| {
        b["alerts"]
            .as_array()
            .is_some_and(|a| a.iter().all(|x| x["delivered"] == true))
    })
    .await;
    let listed: std::collections::BTreeSet<String> = listed["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            format!(
                "{}/{}/{}",
                x["rule"].as_str().unwrap(),
                x["window_start"],
                x["revision"]
            )
        })
        .collect();
    assert!(listed.len() as u64 >= a.fired, "{listed:?} {a}");
    let seen = receiver.seen();
    assert!(seen.iter().all(|s| s.signed && s.status == 200), "{seen:?}");
    let ids: Vec<&str> = seen.iter().map(|s| s.id.as_str()).collect();
    let once: std::collections::BTreeSet<String> = ids.iter().map(|s| s.to_string()).collect();
    assert_eq!(once.len(), ids.len(), "an alert notified twice: {ids:?}");
    assert_eq!(once, listed);
    p.shutdown().await.unwrap();
}

/// A recorded file (4 devices, 301 rows of two metrics, out of order across
/// devices, one row recorded 2 minutes late) replayed at its pace through the
/// whole pipeline verifies exactly; a template adding `device_id` is refused
/// `schema` by the endpoint, and verify expects exactly that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_file_verifies_and_a_refused_template_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let p = support::start(dir.path()).await;
    let file =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("device-sim/tests/data/replay.csv");
    let summary = device_sim::run(SimConfig {
        fleet: "replayed".into(),
        replay: Some(device_sim::replay::ReplayConfig {
            file,
            speed: device_sim::replay::Speed::Factor(1.0),
            time: device_sim::replay::TimeMode::Shift,
        }),
        stop: Stop::Count(u64::MAX),
        ..sim(&p)
    })
    .await
    .unwrap();
    println!("{summary}");
    assert!(summary.ok(), "{summary}");
    assert_eq!((summary.readings_sent, summary.acked), (301, 301));
    let verify = support::verified(summary.verify);
    assert_eq!(verify.devices, 4);

    let template = device_sim::template::Template::parse(
        r#"{"device_id": {{device}}, "seq": {{seq}}, "ts": {{ts}}, "metrics": {{metrics}}}"#,
    )
    .unwrap();
    let summary = device_sim::run(SimConfig {
        fleet: "templated".into(),
        devices: 5,
        stop: Stop::Count(4),
        payload_template: Some(template),
        ..sim(&p)
    })
    .await
    .unwrap();
    println!("{summary}");
    assert!(summary.ok(), "{summary}");
    let schema = summary.stat("rejected.schema").unwrap();
    assert_eq!(schema.got, 20, "{summary}");
    p.shutdown().await.unwrap();
}
