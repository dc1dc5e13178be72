//! Connection life: CONNECT and CONNACK, client ids, takeover, keepalive,
//! limits.

use std::time::Duration;

use anyhow::Result;
use rumqttc::QoS;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5::{self, DisconnectReasonCode};
use tokio::time::Instant;

use crate::common::*;

#[tokio::test]
async fn a_v5_connack_advertises_what_the_endpoint_supports() -> Result<()> {
    let ep = start(config()).await?;
    let c = V5::connect(ep.addr, "dev-1").await?;
    let p = c.connack.properties.clone().expect("CONNACK properties");
    assert_eq!(p.max_qos, Some(1));
    assert_eq!(p.receive_max, Some(1000));
    assert_eq!(p.max_packet_size, Some(128 * 1024 + 4096));
    assert_eq!(p.retain_available, Some(0));
    assert_eq!(p.wildcard_subscription_available, Some(1));
    assert_eq!(p.subscription_identifiers_available, Some(0));
    assert_eq!(p.shared_subscription_available, Some(0));
    assert_eq!(p.assigned_client_identifier, None);
    ep.stop().await
}

#[tokio::test]
async fn a_second_connect_with_the_same_client_id_takes_over() -> Result<()> {
    let ep = start(config()).await?;
    let mut first = V5::connect(ep.addr, "dev-1").await?;
    let mut second = V5::connect(ep.addr, "dev-1").await?;
    assert_eq!(
        first.disconnected().await?,
        DisconnectReasonCode::SessionTakenOver
    );
    second
        .client
        .publish(
            "dt/f/dev-1/telemetry",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            payload(1),
        )
        .await?;
    assert_eq!(second.pubacks(1).await?.len(), 1);

    let mut old = V4::connect(ep.addr, "dev-2").await?;
    let _new = V4::connect(ep.addr, "dev-2").await?;
    old.ended().await?;
    assert_eq!(ep.snapshot().takeovers, 2);
    ep.stop().await
}

#[tokio::test]
async fn a_silent_connection_is_closed_after_one_and_a_half_keepalives() -> Result<()> {
    let ep = start(config()).await?;
    let started = Instant::now();
    let mut silent = Raw::connect_v4(ep.addr, "silent", 1).await?;
    // A client that pings on time stays.
    let mut options = v4_options(ep.addr, "talker");
    options.set_keep_alive(Duration::from_secs(1));
    let mut talker = V4::connect_with(options).await?;

    silent.expect_closed().await?;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500),
        "closed after {waited:?}"
    );
    assert_eq!(ep.snapshot().keepalive_timeouts, 1);

    talker
        .client
        .publish("dt/f/talker/telemetry", QoS::AtLeastOnce, false, payload(1))
        .await?;
    assert_eq!(talker.pubacks(1).await?, vec![1]);
    ep.stop().await
}

#[tokio::test]
async fn a_connection_that_never_sends_connect_is_closed() -> Result<()> {
    let mut cfg = config();
    cfg.connect_timeout = Duration::from_millis(100);
    let ep = start(cfg).await?;
    let mut raw = Raw::open(ep.addr).await?;
    raw.expect_closed().await?;
    assert_eq!(ep.snapshot().protocol_errors, 1);
    ep.stop().await
}

#[tokio::test]
async fn an_empty_client_id_is_assigned_only_where_the_spec_allows() -> Result<()> {
    let ep = start(config()).await?;
    let c = V5::connect(ep.addr, "").await?;
    let assigned = c
        .connack
        .properties
        .as_ref()
        .and_then(|p| p.assigned_client_identifier.clone());
    assert!(
        assigned
            .as_deref()
            .is_some_and(|id| id.starts_with("iotpipe-auto-")),
        "{assigned:?}"
    );

    let _ = Raw::connect_v4(ep.addr, "", 30).await?;

    let mut raw = Raw::open(ep.addr).await?;
    let mut connect = v4::Connect::new("");
    connect.clean_session = false;
    raw.send_v4(v4::Packet::Connect(connect)).await?;
    match raw.recv_v4().await? {
        Some(v4::Packet::ConnAck(a)) => assert_eq!(a.code, v4::ConnectReturnCode::BadClientId),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    raw.expect_closed().await?;
    assert_eq!(ep.snapshot().connects_refused, 1);
    ep.stop().await
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed_on_accept() -> Result<()> {
    let mut cfg = config();
    cfg.max_connections = 1;
    let ep = start(cfg).await?;
    let _first = Raw::connect_v4(ep.addr, "one", 30).await?;
    let mut second = Raw::open(ep.addr).await?;
    second.expect_closed().await?;
    let s = ep.snapshot();
    assert_eq!((s.connections_current, s.connections_refused), (1, 1));
    ep.stop().await
}

/// Sockets are closed on a thread of their own; the slot goes with the
/// socket, and comes back once it is closed.
#[tokio::test]
async fn a_departed_connections_slot_is_free_once_its_socket_is_closed() -> Result<()> {
    let mut cfg = config();
    cfg.max_connections = 1;
    let ep = start(cfg).await?;
    let mut first = Raw::connect_v4(ep.addr, "one", 30).await?;
    first.send_v4(v4::Packet::Disconnect).await?;
    first.expect_closed().await?;
    eventually("the slot to be free", || {
        ep.snapshot().connections_current == 0
    })
    .await?;
    let _second = Raw::connect_v4(ep.addr, "two", 30).await?;
    let s = ep.snapshot();
    assert_eq!((s.connections_current, s.connections_refused), (1, 0));
    ep.stop().await
}

#[tokio::test]
async fn a_v5_client_disconnecting_normally_is_not_an_error() -> Result<()> {
    let ep = start(config()).await?;
    let mut raw = Raw::connect_v5(ep.addr, "bye").await?;
    raw.send_v5(v5::Packet::Disconnect(v5::Disconnect::new(
        DisconnectReasonCode::NormalDisconnection,
    )))
    .await?;
    assert_eq!(raw.recv_v5().await?, None);
    eventually("the connection to be gone", || {
        ep.snapshot().connections_current == 0
    })
    .await?;
    assert_eq!(ep.snapshot().protocol_errors, 0);
    ep.stop().await
}
