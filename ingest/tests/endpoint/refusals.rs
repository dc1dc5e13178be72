//! Refused messages are dead-lettered into the stream and counted; refused
//! packets close the connection.

use anyhow::Result;
use rumqttc::QoS;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5::{self, DisconnectReasonCode, PubAckReason};
use schemas::{RejectReason, StreamRecord};

use crate::common::*;

#[tokio::test]
async fn each_refusal_is_dead_lettered_counted_and_acked_with_its_reason() -> Result<()> {
    let ep = start(config()).await?;
    let mut c = V5::connect(ep.addr, "client-9").await?;
    let too_large = format!(
        r#"{{"ts": 1764240000123, "metrics": {{"t": 1}}, "pad": "{}"}}"#,
        "x".repeat(128 * 1024)
    );
    let cases: Vec<(&str, String, RejectReason, &str, PubAckReason)> = vec![
        (
            "dt/f/dev-1/status",
            payload(1),
            RejectReason::BadTopic,
            "client-9",
            PubAckReason::TopicNameInvalid,
        ),
        (
            "dt/f/dev-1/telemetry",
            "{oops".into(),
            RejectReason::MalformedJson,
            "dev-1",
            PubAckReason::PayloadFormatInvalid,
        ),
        (
            "dt/f/dev-1/telemetry",
            r#"{"ts": 1764240000123, "metrics": {"t": NaN}}"#.into(),
            RejectReason::NotFinite,
            "dev-1",
            PubAckReason::PayloadFormatInvalid,
        ),
        (
            "dt/f/dev-1/telemetry",
            r#"{"ts": "yesterday", "metrics": {"t": 1}}"#.into(),
            RejectReason::Schema,
            "dev-1",
            PubAckReason::PayloadFormatInvalid,
        ),
        (
            "dt/f/dev-1/telemetry",
            too_large,
            RejectReason::TooLarge,
            "dev-1",
            PubAckReason::PayloadFormatInvalid,
        ),
    ];
    for (topic, body, ..) in &cases {
        c.client
            .publish(
                *topic,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                body.clone(),
            )
            .await?;
    }
    let acks = c.pubacks(cases.len()).await?;
    let expected: Vec<_> = cases
        .iter()
        .enumerate()
        .map(|(i, case)| (i as u16 + 1, case.4))
        .collect();
    assert_eq!(acks, expected);

    let records = ep.producer.records();
    assert_eq!(records.len(), cases.len());
    for ((topic, body, reason, key, _), record) in cases.iter().zip(&records) {
        assert_eq!(record.partition_key, *key, "{reason}");
        let StreamRecord::Rejected(m) = schemas::decode_record(&record.data)? else {
            panic!("{reason}: not a dead letter")
        };
        assert_eq!(m.reason, *reason);
        assert_eq!(m.topic, *topic);
        assert_eq!(m.client_id, "client-9");
        assert_eq!(m.received_at, NOW);
        assert_eq!(m.payload_len, body.len() as u64);
    }
    let s = ep.snapshot();
    for (_, _, reason, ..) in &cases {
        assert_eq!(s.rejected(*reason), 1, "{reason}");
    }
    assert_eq!(s.rejected_total(), 5);
    assert_eq!(s.messages_accepted, 0);
    ep.stop().await
}

#[tokio::test]
async fn a_wildcard_topic_is_a_bad_topic_not_a_fleet_named_plus() -> Result<()> {
    let ep = start(config()).await?;
    let mut raw = Raw::connect_v4(ep.addr, "client-w", 30).await?;
    raw.send_v4(publish_v4(
        "dt/+/dev-1/telemetry",
        QoS::AtLeastOnce,
        7,
        payload(1).as_bytes(),
    ))
    .await?;
    // 3.1.1 has no reason codes: a plain PUBACK once the dead letter is stored.
    assert_eq!(
        raw.recv_v4().await?,
        Some(v4::Packet::PubAck(v4::PubAck::new(7)))
    );
    let records = ep.producer.records();
    assert_eq!(records[0].partition_key, "client-w");
    let StreamRecord::Rejected(m) = schemas::decode_record(&records[0].data)? else {
        panic!("not a dead letter")
    };
    assert_eq!(m.reason, RejectReason::BadTopic);
    assert_eq!(ep.snapshot().rejected(RejectReason::BadTopic), 1);
    ep.stop().await
}

#[tokio::test]
async fn an_oversized_packet_closes_the_connection() -> Result<()> {
    let mut cfg = config();
    cfg.max_packet_bytes = 10_000;
    let ep = start(cfg).await?;
    let big = vec![b'x'; 20_000];

    let mut raw = Raw::connect_v5(ep.addr, "big-5").await?;
    let p = v5::Publish::new(
        "dt/f/d/telemetry",
        rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        big.clone(),
        None,
    );
    raw.send_v5(v5::Packet::Publish(p)).await?;
    match raw.recv_v5().await? {
        Some(v5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, DisconnectReasonCode::PacketTooLarge)
        }
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    assert_eq!(raw.recv_v5().await?, None);

    let mut raw = Raw::connect_v4(ep.addr, "big-4", 30).await?;
    raw.send_v4(publish_v4("dt/f/d/telemetry", QoS::AtMostOnce, 0, &big))
        .await?;
    raw.expect_closed().await?;

    let s = ep.snapshot();
    assert_eq!(s.refused_too_large, 2);
    assert!(ep.producer.records().is_empty());
    ep.stop().await
}

#[tokio::test]
async fn qos2_is_refused_as_iot_core_refuses_it() -> Result<()> {
    let ep = start(config()).await?;
    let mut c4 = V4::connect(ep.addr, "q4").await?;
    c4.client
        .publish("dt/f/q4/telemetry", QoS::ExactlyOnce, false, payload(1))
        .await?;
    c4.ended().await?;

    let mut c5 = V5::connect(ep.addr, "q5").await?;
    c5.client
        .publish(
            "dt/f/q5/telemetry",
            rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
            false,
            payload(1),
        )
        .await?;
    assert_eq!(
        c5.disconnected().await?,
        DisconnectReasonCode::QoSNotSupported
    );
    let s = ep.snapshot();
    assert_eq!(s.refused_qos2, 2);
    assert!(ep.producer.records().is_empty());
    ep.stop().await
}

#[tokio::test]
async fn malformed_packets_close_the_connection_and_nothing_panics() -> Result<()> {
    let ep = start(config()).await?;
    // Something other than a CONNECT first.
    let mut raw = Raw::open(ep.addr).await?;
    raw.send(&[0xc0, 0x00]).await?;
    raw.expect_closed().await?;
    // A PUBLISH whose topic length runs past the packet.
    let mut raw = Raw::connect_v4(ep.addr, "m1", 30).await?;
    raw.send(&[0x30, 0x04, 0x00, 0x09, b'd', b't']).await?;
    raw.expect_closed().await?;
    // A reserved packet type.
    let mut raw = Raw::connect_v5(ep.addr, "m2").await?;
    raw.send(&[0xf0, 0x00]).await?;
    match raw.recv_v5().await? {
        Some(v5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, DisconnectReasonCode::MalformedPacket)
        }
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    // An MQTT 3.1 CONNECT: refused with "unacceptable protocol version".
    let mut raw = Raw::open(ep.addr).await?;
    raw.send(b"\x10\x0e\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x00")
        .await?;
    match raw.recv_v4().await? {
        Some(v4::Packet::ConnAck(a)) => {
            assert_eq!(a.code, v4::ConnectReturnCode::RefusedProtocolVersion)
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    raw.expect_closed().await?;

    let s = ep.snapshot();
    assert_eq!(s.protocol_errors, 3);
    assert_eq!(s.connects_refused, 1);
    // The endpoint still serves.
    let mut c = V4::connect(ep.addr, "after").await?;
    c.client
        .publish("dt/f/after/telemetry", QoS::AtLeastOnce, false, payload(1))
        .await?;
    assert_eq!(c.pubacks(1).await?, vec![1]);
    ep.stop().await
}
