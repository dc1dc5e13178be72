//! The live tap: subscribers see accepted telemetry once durable, never
//! refusals.

use anyhow::Result;
use rumqttc::QoS;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

use crate::common::*;

#[tokio::test]
async fn a_subscriber_sees_durable_accepted_telemetry_only() -> Result<()> {
    let ep = start(config()).await?;
    let mut watcher = V4::connect(ep.addr, "watcher").await?;
    watcher
        .client
        .subscribe("dt/+/+/telemetry", QoS::AtLeastOnce)
        .await?;
    match watcher
        .incoming(|p| matches!(p, v4::Packet::SubAck(_)))
        .await?
    {
        v4::Packet::SubAck(a) => assert_eq!(
            a.return_codes,
            vec![v4::SubscribeReasonCode::Success(QoS::AtMostOnce)]
        ),
        _ => unreachable!(),
    }
    let mut device = V4::connect(ep.addr, "dev-1").await?;

    ep.producer.hold();
    device.telemetry("dev-1", QoS::AtLeastOnce, 1).await?;
    ep.producer.wait_puts_begun(1, WAIT).await?;
    let before = watcher.round_trip("x/y").await?;
    assert!(before.is_empty(), "shown before durable: {before:?}");
    ep.producer.release();
    device.pubacks(1).await?;

    device
        .client
        .publish("dt/f/dev-1/telemetry", QoS::AtLeastOnce, false, "{broken")
        .await?;
    device.telemetry("dev-2", QoS::AtLeastOnce, 2).await?;
    device.pubacks(2).await?;

    let mut seen = Vec::new();
    while seen.len() < 2 {
        if let v4::Packet::Publish(p) = watcher
            .incoming(|p| matches!(p, v4::Packet::Publish(_)))
            .await?
        {
            assert_eq!(p.qos, QoS::AtMostOnce);
            seen.push((p.topic.clone(), String::from_utf8(p.payload.to_vec())?));
        }
    }
    assert_eq!(
        seen,
        vec![
            ("dt/f/dev-1/telemetry".to_string(), payload(1)),
            ("dt/f/dev-2/telemetry".to_string(), payload(2)),
        ]
    );
    assert_eq!(ep.snapshot().tap_delivered, 2);
    ep.stop().await
}

#[tokio::test]
async fn unsubscribe_stops_the_flow_for_that_filter() -> Result<()> {
    let ep = start(config()).await?;
    let mut watcher = V5::connect(ep.addr, "watcher").await?;
    for filter in ["dt/f/dev-1/telemetry", "dt/f/dev-2/#"] {
        watcher.round_trip(filter).await?;
    }
    watcher.client.unsubscribe("dt/f/dev-1/telemetry").await?;
    watcher
        .incoming(|p| matches!(p, v5::Packet::UnsubAck(_)))
        .await?;

    let mut device = V5::connect(ep.addr, "dev").await?;
    for topic in ["dt/f/dev-1/telemetry", "dt/f/dev-2/telemetry"] {
        device
            .client
            .publish(
                topic,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                payload(1),
            )
            .await?;
        device.pubacks(1).await?;
    }
    // Stream order is tap order: had dev-1 been delivered, it would be first.
    match watcher
        .incoming(|p| matches!(p, v5::Packet::Publish(_)))
        .await?
    {
        v5::Packet::Publish(p) => assert_eq!(&p.topic[..], b"dt/f/dev-2/telemetry"),
        _ => unreachable!(),
    }
    ep.stop().await
}
