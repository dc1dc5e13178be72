//! Device liveness end to end (issue 20, must show 1): a simulator run where
//! 10 % of the devices stop publishing and 5 % leave with a Last Will, and
//! `GET /v1/devices?status=stale` and `?status=offline` list exactly those
//! devices within the configured time, while the others read `online`;
//! straight to the endpoint, and through Mosquitto and the bridge, where
//! devices say their status on their status topics.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use device_sim::liveness::LivenessConfig;
use device_sim::{BrokerAddr, Rate, SimConfig, Stop};
use testkit::mosquitto::Mosquitto;

fn ids(body: &serde_json::Value) -> BTreeSet<String> {
    body["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap().to_string())
        .collect()
}

/// `devices` of `fleet` at 2 msg/s for `seconds`, 10 % of them stopping and
/// 5 % leaving with a will halfway, checked within `within_s` seconds.
fn leaving(
    p: &iotpipe::Pipeline,
    fleet: &str,
    devices: u32,
    seconds: u64,
    within_s: u64,
) -> SimConfig {
    SimConfig {
        fleet: fleet.into(),
        devices,
        rate: Rate::PerDevice(2.0),
        stop: Stop::After(Duration::from_secs(seconds)),
        liveness: Some(LivenessConfig {
            stop_fraction: 0.10,
            will_fraction: 0.05,
            stop_at: None,
            within: Duration::from_secs(within_s),
        }),
        verify_timeout: Duration::from_secs(60),
        ..support::sim(p.mqtt_addr, p.http_addr)
    }
}

/// The run passed, and its one fleet's liveness check found the lists exact.
fn one_report(summary: &device_sim::Summary) -> &device_sim::liveness::LivenessReport {
    println!("{summary}");
    assert!(summary.ok(), "{summary}");
    let [live] = summary.liveness.as_slice() else {
        panic!("one fleet, one liveness report: {:?}", summary.liveness);
    };
    assert!(live.checked && live.ok, "{live}");
    live
}

/// The 200-device run's report: 20 devices stopped and 10 left with a
/// will, listed exactly within 8 s of the stop.
fn twenty_stale_and_ten_offline_within_8_s(
    summary: &device_sim::Summary,
) -> &device_sim::liveness::LivenessReport {
    let live = one_report(summary);
    assert_eq!((live.stopped.len(), live.wills.len()), (20, 10), "{live}");
    assert!(live.after_stop_ms <= 8_000, "{live}");
    live
}

/// After the run the stopped devices are still stale; every other one said
/// DISCONNECT (those that stayed) or left a will: `offline`, all
/// `devices - stopped` of them, the wills among them.
async fn after_the_run(
    p: &iotpipe::Pipeline,
    fleet: &str,
    devices: usize,
    live: &device_sim::liveness::LivenessReport,
) {
    let (_, stale) = support::get(p, &format!("/v1/devices?fleet={fleet}&status=stale")).await;
    assert_eq!(ids(&stale), live.stopped.iter().cloned().collect());
    let gone = devices - live.stopped.len();
    let path = format!("/v1/devices?fleet={fleet}&status=offline");
    // Those that stayed say `offline` last, after the readings verify waits
    // for: wait for them too.
    let offline = support::wait_for(p, &path, Duration::from_secs(10), |b| {
        b["devices"].as_array().is_some_and(|d| d.len() == gone)
    })
    .await;
    let offline = ids(&offline);
    assert!(live.wills.iter().all(|id| offline.contains(id)));
}

/// 200 devices at 2 msg/s for 20 s with `stale_after` 3 s. Halfway through,
/// 20 devices stop and drop their connections without a will, and 10 that
/// connected with a will drop theirs. Within 8 s of that the API lists
/// exactly the 20 `stale` and the 10 `offline`, and the 170 others `online`
/// (they still publish); verify then finds every reading sent, the
/// stopped devices' fewer ones included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_devices_go_stale_and_wills_offline_within_the_configured_time() {
    let dir = tempfile::tempdir().unwrap();
    let p = support::start_edited(dir.path(), |c| {
        c.http.stale_after = Duration::from_secs(3);
    })
    .await;
    let summary = device_sim::run(SimConfig {
        seed: 20,
        ..leaving(&p, "live", 200, 20, 8)
    })
    .await
    .unwrap();
    let live = twenty_stale_and_ten_offline_within_8_s(&summary);
    assert_eq!(summary.failed, 0);
    // 40 messages each for those that stay, about 20 for those that left.
    assert!(summary.messages_sent < 170 * 40 + 30 * 21, "{summary}");
    assert!(summary.messages_sent > 170 * 39 + 30 * 19, "{summary}");
    support::verified(summary.verify.clone());
    after_the_run(&p, "live", 200, live).await;
    p.shutdown().await.unwrap();
}

/// The same run with Mosquitto in front, enforcing the documented ACL:
/// devices log in as themselves, say `online` on their status topic after
/// connecting and `offline` before DISCONNECT, and the will devices leave
/// `offline` there as their will (`--presence-topic`). The bridge turns
/// them into presence, so the API lists exactly the same devices `stale`
/// and `offline` within the same time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_broker_status_topics_give_the_same_lists() {
    let broker = Mosquitto::start_with_acl("max_inflight_messages 1000").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = support::start_edited(dir.path(), |c| {
        c.http.stale_after = Duration::from_secs(3);
        c.broker.url = Some(broker.url());
        c.broker.username = Some("iotpipe-bridge".into());
    })
    .await;
    let summary = device_sim::run(SimConfig {
        seed: 22,
        broker: BrokerAddr {
            host: broker.addr.ip().to_string(),
            port: broker.addr.port(),
        },
        username: Some("{device}".into()),
        presence_topic: true,
        ..leaving(&p, "brokered", 200, 20, 8)
    })
    .await
    .unwrap();
    let live = twenty_stale_and_ten_offline_within_8_s(&summary);
    support::verified(summary.verify.clone());
    after_the_run(&p, "brokered", 200, live).await;
    p.shutdown().await.unwrap();
}

/// An API behind a bearer token: verify and the liveness check read it with
/// the simulator's `api_token`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_check_reads_an_api_that_wants_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "liveness-reader-token read\n").unwrap();
    let p = support::start_edited(dir.path(), |c| {
        c.http.stale_after = Duration::from_secs(2);
        c.http.token_file = Some(tokens);
    })
    .await;
    let (status, _) = support::get(&p, "/v1/devices?fleet=guarded").await;
    assert_eq!(status, 401, "the API wants the token");
    let summary = device_sim::run(SimConfig {
        seed: 21,
        api_token: Some("liveness-reader-token".into()),
        ..leaving(&p, "guarded", 20, 10, 5)
    })
    .await
    .unwrap();
    let live = one_report(&summary);
    assert_eq!((live.stopped.len(), live.wills.len()), (2, 1), "{live}");
    p.shutdown().await.unwrap();
}
