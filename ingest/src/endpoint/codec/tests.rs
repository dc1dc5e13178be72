use super::*;
use rand::{Rng, SeedableRng};

fn v4_bytes(p: v4::Packet) -> BytesMut {
    let mut b = BytesMut::new();
    p.write(&mut b, usize::MAX).unwrap();
    b
}

fn v5_bytes(p: v5::Packet) -> BytesMut {
    let mut b = BytesMut::new();
    p.write(&mut b, None).unwrap();
    b
}

fn frames(buf: &mut BytesMut) -> Vec<Frame> {
    let mut out = Vec::new();
    while let Some(f) = next_frame(buf, 1 << 20).unwrap() {
        out.push(f);
    }
    out
}

#[test]
fn frames_split_across_reads() {
    let mut all = v4_bytes(v4::Packet::PingReq);
    all.extend_from_slice(&v4_bytes(v4::Packet::Publish(v4::Publish::new(
        "dt/f/d/telemetry",
        rumqttc::mqttbytes::QoS::AtMostOnce,
        vec![b'x'; 300],
    ))));
    let total = all.len();
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for chunk in all.chunks(7) {
        buf.extend_from_slice(chunk);
        got.extend(frames(&mut buf));
    }
    assert!(buf.is_empty());
    assert_eq!(got.len(), 2);
    assert_eq!(got.iter().map(|f| f.bytes.len()).sum::<usize>(), total);
    let mut it = got.into_iter();
    assert_eq!(
        decode(Protocol::V4, it.next().unwrap()).unwrap(),
        Inbound::PingReq
    );
    let Inbound::Publish(p) = decode(Protocol::V4, it.next().unwrap()).unwrap() else {
        panic!("not a publish")
    };
    assert_eq!(p.topic, "dt/f/d/telemetry");
    assert_eq!(p.payload.len(), 300);
}

#[test]
fn refuses_an_oversized_packet_from_its_header() {
    // Only the fixed header of a 1 MB PUBLISH has arrived.
    let mut buf = BytesMut::from(&[0x30, 0x80, 0x80, 0x40][..]);
    assert_eq!(
        next_frame(&mut buf, 1000).unwrap_err(),
        DecodeError::TooLarge {
            size: 4 + (1 << 20),
            max: 1000
        }
    );
    let mut buf = BytesMut::from(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01][..]);
    assert!(matches!(
        next_frame(&mut buf, usize::MAX),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn picks_the_codec_from_the_connect() {
    let mut b = v4_bytes(v4::Packet::Connect(v4::Connect::new("c4")));
    let f = next_frame(&mut b, 1000).unwrap().unwrap();
    assert_eq!(connect_protocol(&f), Ok(Protocol::V4));
    let Inbound::Connect(c) = decode(Protocol::V4, f).unwrap() else {
        panic!()
    };
    assert_eq!(c.client_id, "c4");

    let connect = v5::Connect {
        keep_alive: 30,
        client_id: "c5".into(),
        clean_start: true,
        properties: Some(v5::ConnectProperties {
            max_packet_size: Some(4096),
            ..v5::ConnectProperties::new()
        }),
    };
    let login = Some(v5::Login::new("user", "pw"));
    let mut b = v5_bytes(v5::Packet::Connect(connect, None, login));
    let f = next_frame(&mut b, 1000).unwrap().unwrap();
    assert_eq!(connect_protocol(&f), Ok(Protocol::V5));
    let Inbound::Connect(c) = decode(Protocol::V5, f).unwrap() else {
        panic!()
    };
    assert_eq!(c.client_id, "c5");
    assert_eq!(c.username.as_deref(), Some("user"));
    assert_eq!(c.max_packet_size, Some(4096));
    assert_eq!(c.keepalive_secs, 30);

    let mut b = BytesMut::from(&b"\x10\x0c\x00\x04MQTT\x03\x02\x00\x3c\x00\x00"[..]);
    let f = next_frame(&mut b, 1000).unwrap().unwrap();
    assert_eq!(
        connect_protocol(&f),
        Err(DecodeError::UnsupportedProtocol(3))
    );
    let mut b = v4_bytes(v4::Packet::PingReq);
    let f = next_frame(&mut b, 1000).unwrap().unwrap();
    assert!(connect_protocol(&f).is_err());
}

#[test]
fn reads_the_short_v5_disconnect() {
    let mut b = v5_bytes(v5::Packet::Disconnect(v5::Disconnect::new(
        DisconnectReasonCode::NormalDisconnection,
    )));
    assert_eq!(&b[..], &[0xe0, 0x00]);
    let f = next_frame(&mut b, 1000).unwrap().unwrap();
    assert_eq!(decode(Protocol::V5, f).unwrap(), Inbound::Disconnect);
}

#[test]
fn encodes_round_trip_through_the_client_codecs() {
    for protocol in [Protocol::V4, Protocol::V5] {
        let mut out = BytesMut::new();
        encode(
            protocol,
            Outbound::PubAck {
                pkid: 7,
                reason: PubAckReason::PayloadFormatInvalid,
            },
            &mut out,
        );
        encode(
            protocol,
            Outbound::Publish {
                topic: Bytes::from_static(b"dt/f/d/telemetry"),
                payload: Bytes::from_static(b"{}"),
            },
            &mut out,
        );
        let publish_len = out.len()
            - match protocol {
                Protocol::V4 => 4,
                Protocol::V5 => 6,
            };
        assert_eq!(
            publish_len,
            publish_size(protocol, b"dt/f/d/telemetry", b"{}")
        );
        match protocol {
            Protocol::V4 => {
                let p = v4::Packet::read(&mut out, 1000).unwrap();
                assert_eq!(p, v4::Packet::PubAck(v4::PubAck::new(7)));
                assert!(matches!(
                    v4::Packet::read(&mut out, 1000).unwrap(),
                    v4::Packet::Publish(_)
                ));
            }
            Protocol::V5 => {
                let v5::Packet::PubAck(a) = v5::Packet::read(&mut out, None).unwrap() else {
                    panic!()
                };
                assert_eq!(a.reason, PubAckReason::PayloadFormatInvalid);
                assert!(matches!(
                    v5::Packet::read(&mut out, None).unwrap(),
                    v5::Packet::Publish(_)
                ));
            }
        }
    }
}

#[test]
fn a_v5_disconnect_reads_back_with_its_reason() {
    let mut out = BytesMut::new();
    encode(
        Protocol::V5,
        Outbound::Disconnect(DisconnectReasonCode::PacketTooLarge),
        &mut out,
    );
    let v5::Packet::Disconnect(d) = v5::Packet::read(&mut out, None).unwrap() else {
        panic!()
    };
    assert_eq!(d.reason_code, DisconnectReasonCode::PacketTooLarge);
    assert!(out.is_empty());
    encode(
        Protocol::V4,
        Outbound::Disconnect(DisconnectReasonCode::PacketTooLarge),
        &mut out,
    );
    assert!(out.is_empty(), "3.1.1 has no server DISCONNECT");
}

#[test]
fn garbage_never_panics() {
    // Valid packets with random bytes flipped, and random bytes, through
    // both codecs: errors are fine, panics are not.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut seeds = vec![
        v4_bytes(v4::Packet::Connect(v4::Connect::new("c"))),
        v4_bytes(v4::Packet::Publish(v4::Publish {
            pkid: 1,
            ..v4::Publish::new(
                "dt/f/d/telemetry",
                rumqttc::mqttbytes::QoS::AtLeastOnce,
                vec![1; 20],
            )
        })),
        v4_bytes(v4::Packet::Subscribe(v4::Subscribe::new(
            "dt/#",
            rumqttc::mqttbytes::QoS::AtMostOnce,
        ))),
    ];
    let connect = v5::Connect {
        keep_alive: 30,
        client_id: "c5".into(),
        clean_start: true,
        properties: Some(v5::ConnectProperties::new()),
    };
    seeds.push(v5_bytes(v5::Packet::Connect(connect, None, None)));
    seeds.push(v5_bytes(v5::Packet::Subscribe(v5::Subscribe::new(
        v5::Filter::new("dt/+/d/telemetry", rumqttc::v5::mqttbytes::QoS::AtMostOnce),
        None,
    ))));
    for round in 0..20_000 {
        let mut bytes = if round % 4 == 0 {
            let n = rng.random_range(0..64);
            (0..n).map(|_| rng.random()).collect::<Vec<u8>>()
        } else {
            let mut b = seeds[round % seeds.len()].to_vec();
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(0..b.len());
                b[i] = rng.random();
            }
            b
        };
        if rng.random_bool(0.2) {
            bytes.truncate(rng.random_range(0..=bytes.len()));
        }
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(frame)) = next_frame(&mut buf, 4096) {
            let protocol = match connect_protocol(&frame) {
                Ok(p) => p,
                Err(_) if round % 2 == 0 => Protocol::V4,
                Err(_) => Protocol::V5,
            };
            let _ = decode(protocol, frame);
        }
    }
}
