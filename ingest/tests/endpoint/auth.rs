//! The per-device policy from a users file: who connects, where they
//! publish, what they may watch.

use std::sync::Arc;

use anyhow::Result;
use ingest::{Role, SubscribeRefusal, UsersFile};
use rumqttc::QoS;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5::{self, PubAckReason};
use schemas::{RejectReason, StreamRecord};

use crate::common::*;

async fn start_with_users() -> Result<Endpoint> {
    let users = UsersFile::parse(&format!(
        "{}\n{}\n{}\n",
        UsersFile::entry("dev-1", "token-1", b"salt-1"),
        UsersFile::entry("dev-2", "token-2", b"salt-2"),
        UsersFile::entry_as("ops", "token-ops", b"salt-3", Role::Operator),
    ))?;
    let mut cfg = config();
    cfg.authorizer = Arc::new(users);
    start(cfg).await
}

#[tokio::test]
async fn a_v4_device_publishes_as_itself_and_is_cut_off_otherwise() -> Result<()> {
    let ep = start_with_users().await?;
    let mut c = v4_login_as(&ep, "c1", "dev-1", "token-1").await?;
    c.publish_as_dev1_then_dev2().await?;

    ep.producer.wait_stored(2, WAIT).await?;
    let records = ep.producer.records();
    assert_eq!(records[1].partition_key, "dev-2");
    let StreamRecord::Rejected(m) = schemas::decode_record(&records[1].data)? else {
        panic!("not a dead letter")
    };
    assert_eq!(m.reason, RejectReason::Unauthorized);
    assert_eq!(m.client_id, "c1");
    assert_eq!(ep.snapshot().rejected(RejectReason::Unauthorized), 1);
    ep.stop().await
}

#[tokio::test]
async fn a_v5_device_is_told_not_authorized_per_publish() -> Result<()> {
    let ep = start_with_users().await?;
    let mut c = v5_login_as(&ep, "c2", "dev-2", "token-2").await?;
    assert_eq!(
        c.publish_as(&["dev-1", "dev-2"]).await?,
        vec![(1, PubAckReason::NotAuthorized), (2, PubAckReason::Success)]
    );
    ep.stop().await
}

#[tokio::test]
async fn wrong_or_missing_credentials_are_refused_at_connect() -> Result<()> {
    let ep = start_with_users().await?;
    let refused = v4_login_as(&ep, "c3", "dev-1", "token-2")
        .await
        .err()
        .map(|e| format!("{e:#}"));
    assert!(
        refused
            .as_deref()
            .is_some_and(|e| e.contains("BadUserNamePassword")),
        "{refused:?}"
    );
    assert!(V4::connect(ep.addr, "anonymous").await.is_err());
    assert_eq!(ep.snapshot().connects_refused, 2);
    ep.stop().await
}

/// What device B tries to watch that is not its own.
const NOT_B: [&str; 2] = ["dt/#", "dt/f/dev-1/telemetry"];
/// How many messages device A publishes while B watches.
const FROM_A: u64 = 5;

/// A 3.1.1 client with the client id `id`, logged in as `user`.
async fn v4_login_as(ep: &Endpoint, id: &str, user: &str, password: &str) -> Result<V4> {
    let mut options = v4_options(ep.addr, id);
    options.set_credentials(user, password);
    V4::connect_with(options).await
}

/// An MQTT 5 client with the client id `id`, logged in as `user`.
async fn v5_login_as(ep: &Endpoint, id: &str, user: &str, password: &str) -> Result<V5> {
    let mut options = v5_options(ep.addr, id);
    options.set_credentials(user, password);
    V5::connect_with(options).await
}

/// A 3.1.1 client logged in as `user`, which is also its client id.
async fn v4_login(ep: &Endpoint, user: &str, password: &str) -> Result<V4> {
    v4_login_as(ep, user, user, password).await
}

/// The same over MQTT 5.
async fn v5_login(ep: &Endpoint, user: &str, password: &str) -> Result<V5> {
    v5_login_as(ep, user, user, password).await
}

/// The topic and payload of the next PUBLISH, skipping PUBACKs.
async fn next_publish(c: &mut impl Watcher) -> Result<(String, String)> {
    loop {
        if let Received::Publish(topic, payload) = c.received().await? {
            return Ok((topic, payload));
        }
    }
}

/// Every PUBLISH that arrives until B's PUBACK and B's own message are both
/// in, in arrival order.
async fn publishes_until_own(b: &mut impl Watcher) -> Result<Vec<(String, String)>> {
    let (mut seen, mut acked) = (Vec::new(), false);
    while !(acked && seen.iter().any(|(t, _)| *t == own("dev-2"))) {
        match b.received().await? {
            Received::Publish(topic, payload) => seen.push((topic, payload)),
            Received::PubAck(success) => {
                assert!(success, "B's own message was refused");
                acked = true;
            }
        }
    }
    Ok(seen)
}

/// What B and the operator watching the fleet got once B published
/// `payload(100)` to its own topic after A's messages: B that message and
/// none of A's, the operator each of A's in order; and the endpoint counts
/// B's two filters refused.
async fn b_got_only_its_own(
    ep: &Endpoint,
    b: &mut impl Watcher,
    operator: &mut impl Watcher,
) -> Result<()> {
    assert_eq!(
        publishes_until_own(b).await?,
        vec![(own("dev-2"), payload(100))],
        "B sees its own message and none of A's"
    );
    for seq in 0..FROM_A {
        assert_eq!(next_publish(operator).await?, (own("dev-1"), payload(seq)));
    }
    assert_eq!(
        ep.snapshot()
            .subscriptions_refused(SubscribeRefusal::NotAuthorized),
        2
    );
    Ok(())
}

fn own(device: &str) -> String {
    format!("dt/f/{device}/telemetry")
}

/// The endpoint with the users file, the operator logged in and watching
/// the whole fleet, and device B (`dev-2`) logged in: each a client that
/// `login` makes.
async fn operator_and_b<C: Watcher>(
    login: impl AsyncFn(&Endpoint, &str, &str) -> Result<C>,
) -> Result<(Endpoint, C, C)> {
    let ep = start_with_users().await?;
    let mut operator = login(&ep, "ops", "token-ops").await?;
    operator.granted("dt/#").await?;
    let b = login(&ep, "dev-2", "token-2").await?;
    Ok((ep, operator, b))
}

/// Device A (`dev-1`) publishes `FROM_A` messages at QoS 1 and waits for
/// every PUBACK: each is on the tap once acknowledged.
async fn a_publishes(ep: &Endpoint) -> Result<()> {
    let mut a = v4_login(ep, "dev-1", "token-1").await?;
    for seq in 0..FROM_A {
        a.client
            .publish(own("dev-1"), QoS::AtLeastOnce, false, payload(seq))
            .await?;
    }
    a.pubacks(FROM_A as usize).await?;
    Ok(())
}

/// Stream order is tap order, so had any filter of B's reached A's messages
/// (all acknowledged, so all on the tap), they would arrive before B's own
/// later one: everything B receives up to its own message being just that
/// message proves it got none of A's.
#[tokio::test]
async fn a_v4_device_is_refused_other_devices_topics_and_receives_none_of_their_telemetry()
-> Result<()> {
    let (ep, mut operator, mut b) = operator_and_b(v4_login).await?;
    assert_eq!(
        b.suback(&NOT_B).await?,
        vec![v4::SubscribeReasonCode::Failure; 2],
        "0x80 for each filter"
    );
    a_publishes(&ep).await?;

    let before = b.round_trip(&own("dev-2")).await?;
    assert!(before.is_empty(), "B was sent {before:?}");
    b.client
        .publish(own("dev-2"), QoS::AtLeastOnce, false, payload(100))
        .await?;
    b_got_only_its_own(&ep, &mut b, &mut operator).await?;
    assert_eq!(
        next_publish(&mut operator).await?,
        (own("dev-2"), payload(100))
    );
    ep.stop().await
}

#[tokio::test]
async fn a_v5_device_is_told_not_authorized_per_filter_and_receives_none_of_another_devices_telemetry()
-> Result<()> {
    let (ep, mut operator, mut b) = operator_and_b(v5_login).await?;
    let mut filters = NOT_B.to_vec();
    let mine = own("dev-2");
    filters.push(&mine);
    assert_eq!(
        b.suback(&filters).await?,
        vec![
            v5::SubscribeReasonCode::NotAuthorized,
            v5::SubscribeReasonCode::NotAuthorized,
            v5::SubscribeReasonCode::Success(rumqttc::v5::mqttbytes::QoS::AtMostOnce),
        ],
        "0x87 for each filter that is not B's, its own granted alongside"
    );
    a_publishes(&ep).await?;

    b.client
        .publish(
            own("dev-2"),
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            payload(100),
        )
        .await?;
    b_got_only_its_own(&ep, &mut b, &mut operator).await?;
    ep.stop().await
}

#[tokio::test]
async fn without_authentication_anyone_may_watch_the_fleet() -> Result<()> {
    let ep = start(config()).await?;
    let mut anyone = V4::connect(ep.addr, "anyone").await?;
    assert_eq!(
        anyone.suback(&["dt/#"]).await?,
        vec![v4::SubscribeReasonCode::Success(QoS::AtMostOnce)]
    );
    ep.stop().await
}
