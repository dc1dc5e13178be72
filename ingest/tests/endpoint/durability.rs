//! Nothing is acknowledged that the stream did not store, through failures
//! and shutdown.

use std::time::Duration;

use anyhow::Result;
use rumqttc::QoS;
use rumqttc::v5::mqttbytes::v5::{self, DisconnectReasonCode, PubAckReason};

use crate::common::*;

#[tokio::test]
async fn a_failing_stream_delays_the_ack_until_it_recovers() -> Result<()> {
    let mut cfg = config();
    cfg.group_commit.retry_backoff_min = Duration::from_millis(1);
    cfg.group_commit.retry_backoff_max = Duration::from_millis(5);
    let ep = start(cfg).await?;
    let mut c = V4::connect(ep.addr, "dev-1").await?;
    ep.producer.set_unavailable(true);
    c.telemetry("dev-1", QoS::AtLeastOnce, 1).await?;
    // Several tries fail...
    ep.producer.wait_puts_begun(3, WAIT).await?;
    c.no_puback_yet().await?;
    assert_eq!(ep.snapshot().acks_sent, 0);
    // ...then the stream recovers and the ack follows.
    ep.producer.set_unavailable(false);
    assert_eq!(c.pubacks(1).await?, vec![1]);
    assert_eq!(ep.producer.records().len(), 1);
    assert!(ep.snapshot().append_failures >= 3);
    ep.stop().await
}

#[tokio::test]
async fn shutdown_sends_the_acks_that_became_durable_then_closes() -> Result<()> {
    let mut ep = start(config()).await?;
    // A raw client shows the exact order: every PUBACK, then the DISCONNECT.
    let mut raw = Raw::connect_v5(ep.addr, "dev-1").await?;
    ep.producer.hold();
    for pkid in 1..=5 {
        let mut p = v5::Publish::new(
            "dt/f/dev-1/telemetry",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            payload(pkid.into()),
            None,
        );
        p.pkid = pkid;
        raw.send_v5(v5::Packet::Publish(p)).await?;
    }
    eventually("all five publishes read", || ep.snapshot().messages_in == 5).await?;
    ep.request_stop();
    // The endpoint stops accepting at once...
    eventually("the listener to close", || {
        std::net::TcpStream::connect(ep.addr).is_err()
    })
    .await?;
    // ...and once the stream stores what is in flight, acks it all and closes.
    ep.producer.release();
    for pkid in 1..=5 {
        match raw.recv_v5().await? {
            Some(v5::Packet::PubAck(a)) => {
                assert_eq!((a.pkid, a.reason), (pkid, PubAckReason::Success))
            }
            other => panic!("expected PUBACK {pkid}, got {other:?}"),
        }
    }
    match raw.recv_v5().await? {
        Some(v5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, DisconnectReasonCode::ServerShuttingDown)
        }
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    assert_eq!(raw.recv_v5().await?, None);
    assert_eq!(ep.producer.records().len(), 5);
    ep.stop().await
}

#[tokio::test]
async fn shutdown_gives_up_on_a_stream_that_never_recovers() -> Result<()> {
    let mut cfg = config();
    cfg.shutdown_timeout = Duration::from_millis(100);
    let mut ep = start(cfg).await?;
    let mut c = V4::connect(ep.addr, "dev-1").await?;
    ep.producer.set_unavailable(true);
    c.telemetry("dev-1", QoS::AtLeastOnce, 1).await?;
    ep.producer.wait_puts_begun(1, WAIT).await?;
    ep.request_stop();
    c.ended().await?;
    let s = ep.snapshot();
    assert_eq!(s.acks_sent, 0);
    assert_eq!(s.append_abandoned, 1);
    assert!(ep.producer.records().is_empty());
    ep.stop().await
}
