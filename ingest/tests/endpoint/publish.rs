//! Accepted telemetry: appended, stamped, acknowledged only once durable, in
//! order.

use anyhow::Result;
use rumqttc::QoS;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use schemas::StreamRecord;

use crate::common::*;

#[tokio::test]
async fn a_v4_puback_waits_for_the_stream() -> Result<()> {
    let ep = start(config()).await?;
    let mut c = V4::connect(ep.addr, "dev-1").await?;
    ep.producer.hold();
    c.telemetry("dev-1", QoS::AtLeastOnce, 1).await?;
    ep.producer.wait_puts_begun(1, WAIT).await?;
    // While the put is held, a round trip comes back with no PUBACK before it.
    c.no_puback_yet().await?;
    assert_eq!(ep.snapshot().acks_sent, 0);
    ep.producer.release();
    assert_eq!(c.pubacks(1).await?, vec![1]);

    let stored = ep.stored()?;
    let [StreamRecord::Readings(r)] = stored.as_slice() else {
        panic!("{stored:?}")
    };
    assert_eq!((r.fleet.as_str(), r.device_id.as_str()), ("f", "dev-1"));
    assert_eq!(r.received_at, NOW);
    assert_eq!(ep.producer.records()[0].partition_key, "dev-1");
    let s = ep.snapshot();
    assert_eq!(
        (s.messages_in, s.messages_accepted, s.readings_accepted),
        (1, 1, 1)
    );
    assert_eq!(s.acks_sent, 1);
    assert!(s.append_latency_count >= 1);
    ep.stop().await
}

#[tokio::test]
async fn a_v5_puback_waits_for_the_stream() -> Result<()> {
    let ep = start(config()).await?;
    let mut c = V5::connect(ep.addr, "dev-1").await?;
    ep.producer.hold();
    c.client
        .publish(
            "dt/f/dev-1/telemetry",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            payload(1),
        )
        .await?;
    ep.producer.wait_puts_begun(1, WAIT).await?;
    let before = c.round_trip("nothing/here").await?;
    assert!(
        !before.iter().any(|p| matches!(p, v5::Packet::PubAck(_))),
        "{before:?}"
    );
    ep.producer.release();
    assert_eq!(c.pubacks(1).await?, vec![(1, v5::PubAckReason::Success)]);
    assert_eq!(ep.producer.records().len(), 1);
    ep.stop().await
}

#[tokio::test]
async fn qos0_is_appended_without_an_ack() -> Result<()> {
    let ep = start(config()).await?;
    let c = V4::connect(ep.addr, "dev-1").await?;
    for seq in 0..3 {
        c.telemetry("dev-1", QoS::AtMostOnce, seq).await?;
    }
    ep.producer.wait_stored(3, WAIT).await?;
    let data: Vec<_> = ep.producer.records().into_iter().map(|r| r.data).collect();
    let expected: Vec<_> = (0..3).map(|s| record_bytes("dev-1", s)).collect();
    assert_eq!(data, expected);
    let s = ep.snapshot();
    assert_eq!((s.messages_accepted, s.acks_sent), (3, 0));
    ep.stop().await
}

#[tokio::test]
async fn pubacks_follow_publish_order_even_when_durability_does_not() -> Result<()> {
    let ep = start(config()).await?;
    // Another device's record holds the stream, so that all of dev-1's
    // records queue up and go into the next put together.
    let other = V4::connect(ep.addr, "dev-0").await?;
    ep.producer.hold();
    other.telemetry("dev-0", QoS::AtMostOnce, 0).await?;
    ep.producer.wait_puts_begun(1, WAIT).await?;

    let mut c = V4::connect(ep.addr, "dev-1").await?;
    for seq in 0..20 {
        c.client
            .publish(
                "dt/f/dev-1/telemetry",
                QoS::AtLeastOnce,
                false,
                payload(seq),
            )
            .await?;
    }
    eventually("all publishes read", || ep.snapshot().messages_in == 21).await?;
    // The eleventh record fails once: the ten after it are stored first.
    ep.producer.fail_record(record_bytes("dev-1", 10), 1);
    ep.producer.release();

    let acks = c.pubacks(20).await?;
    assert_eq!(acks, (1..=20).collect::<Vec<u16>>());
    let stored: Vec<_> = ep
        .producer
        .records()
        .into_iter()
        .filter(|r| r.partition_key == "dev-1")
        .map(|r| r.data)
        .collect();
    assert_eq!(stored.len(), 20);
    assert_eq!(stored[10], record_bytes("dev-1", 11));
    assert_eq!(stored[19], record_bytes("dev-1", 10), "stored last");
    assert_eq!(ep.snapshot().append_failures, 1);
    ep.stop().await
}

#[tokio::test]
async fn many_devices_on_many_connections_are_group_committed() -> Result<()> {
    let ep = start(config()).await?;
    let mut clients = Vec::new();
    for d in 0..4 {
        clients.push(V4::connect(ep.addr, &format!("dev-{d}")).await?);
    }
    for (d, c) in clients.iter().enumerate() {
        for seq in 0..50 {
            c.client
                .publish(
                    format!("dt/f/dev-{d}/telemetry"),
                    QoS::AtLeastOnce,
                    false,
                    payload(seq),
                )
                .await?;
        }
    }
    for c in &mut clients {
        assert_eq!(c.pubacks(50).await?, (1..=50).collect::<Vec<u16>>());
    }
    let s = ep.snapshot();
    assert_eq!(s.records_appended, 200);
    assert!(s.appends < 200, "{} puts for 200 records", s.appends);
    // Each device's records are in the stream in the order it sent them.
    for d in 0..4 {
        let key = format!("dev-{d}");
        let mine: Vec<_> = ep
            .producer
            .records()
            .into_iter()
            .filter(|r| r.partition_key == key)
            .map(|r| r.data)
            .collect();
        let expected: Vec<_> = (0..50).map(|s| record_bytes(&key, s)).collect();
        assert!(mine == expected, "dev-{d} out of order");
    }
    ep.stop().await
}

#[tokio::test]
async fn a_raw_v4_publish_is_acked_with_its_packet_id() -> Result<()> {
    let ep = start(config()).await?;
    let mut raw = Raw::connect_v4(ep.addr, "dev-1", 30).await?;
    raw.send_v4(publish_v4(
        "dt/f/dev-1/telemetry",
        QoS::AtLeastOnce,
        4242,
        payload(1).as_bytes(),
    ))
    .await?;
    assert_eq!(
        raw.recv_v4().await?,
        Some(v4::Packet::PubAck(v4::PubAck::new(4242)))
    );
    raw.send_v4(v4::Packet::PingReq).await?;
    assert_eq!(raw.recv_v4().await?, Some(v4::Packet::PingResp));
    raw.send_v4(v4::Packet::Disconnect).await?;
    raw.expect_closed().await?;
    ep.stop().await
}
