//! The session driven with plain packets: no sockets, no runtime, no clock.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use schemas::{RejectReason, StreamRecord, decode_record};

use super::*;
use crate::auth::{AllowAll, ClientCertificates, OwnDeviceOnly};

const NOW: i64 = 1_764_240_000_500;
const GOOD: &str = r#"{"seq": 1, "ts": 1764240000123, "metrics": {"t": 21.5}}"#;

fn config(authorizer: Arc<dyn Authorizer>) -> Arc<SessionConfig> {
    Arc::new(SessionConfig {
        max_inflight: 3,
        max_packet_bytes: 140_000,
        max_keepalive_secs: 1200,
        authorizer,
        lateness: crate::LatenessConfig::default(),
        presence: false,
    })
}

fn connect_packet(protocol: Protocol, client_id: &str) -> ConnectPacket {
    ConnectPacket {
        protocol,
        client_id: client_id.into(),
        clean_start: true,
        keepalive_secs: 30,
        username: None,
        password: None,
        max_packet_size: None,
        will_topic: None,
    }
}

fn connected(protocol: Protocol) -> Session {
    connected_with(protocol, Arc::new(AllowAll), None)
}

fn connected_with(
    protocol: Protocol,
    authorizer: Arc<dyn Authorizer>,
    username: Option<&str>,
) -> Session {
    let mut s = Session::new(config(authorizer), 9);
    let mut out = Vec::new();
    let mut c = connect_packet(protocol, "client-1");
    c.username = username.map(str::to_string);
    s.receive(Inbound::Connect(c), NOW, &mut out);
    assert!(
        matches!(out.last(), Some(Action::Send(Outbound::ConnAck(a))) if a.code == ConnAckCode::Accepted),
        "{out:?}"
    );
    s
}

fn publish(qos: u8, pkid: u16, topic: &str, payload: &[u8]) -> Inbound {
    Inbound::Publish(PublishPacket {
        qos,
        pkid,
        retain: false,
        topic: topic.into(),
        payload: Bytes::copy_from_slice(payload),
        topic_alias: false,
    })
}

fn receive(s: &mut Session, packet: Inbound) -> Vec<Action> {
    let mut out = Vec::new();
    s.receive(packet, NOW, &mut out);
    out
}

fn durable(s: &mut Session, token: u64) -> Vec<Action> {
    let mut out = Vec::new();
    s.durable(token, true, &mut out);
    out
}

fn appended(out: &[Action]) -> &Append {
    out.iter()
        .find_map(|a| match a {
            Action::Append(a) => Some(a),
            _ => None,
        })
        .expect("an append")
}

fn acks(out: &[Action]) -> Vec<(u16, PubAckReason)> {
    out.iter()
        .filter_map(|a| match a {
            Action::Send(Outbound::PubAck { pkid, reason }) => Some((*pkid, *reason)),
            _ => None,
        })
        .collect()
}

#[test]
fn connect_claims_the_client_id_and_caps_the_keepalive() {
    let mut s = Session::new(config(Arc::new(AllowAll)), 1);
    let mut c = connect_packet(Protocol::V5, "c1");
    c.keepalive_secs = 0;
    let out = receive(&mut s, Inbound::Connect(c));
    assert_eq!(
        out[0],
        Action::Connected {
            client_id: "c1".into(),
            keepalive: Duration::from_secs(1200),
            max_packet_size: None,
        }
    );
    let Action::Send(Outbound::ConnAck(ack)) = &out[1] else {
        panic!("{out:?}")
    };
    assert_eq!(ack.server_keepalive, Some(1200));
    assert_eq!(ack.receive_max, 3);
    assert_eq!(ack.max_packet_size, 140_000);
    assert_eq!(ack.assigned_client_id, None);
    assert_eq!(s.protocol(), Some(Protocol::V5));
}

#[test]
fn an_empty_client_id_is_assigned_or_refused_as_the_spec_says() {
    // 3.1.1, clean session: the server names the client.
    let mut s = Session::new(config(Arc::new(AllowAll)), 7);
    let out = receive(&mut s, Inbound::Connect(connect_packet(Protocol::V4, "")));
    assert!(
        matches!(&out[0], Action::Connected { client_id, .. } if client_id == "iotpipe-auto-7")
    );

    // 3.1.1 asking to keep a session without an id: identifier rejected.
    let mut s = Session::new(config(Arc::new(AllowAll)), 7);
    let mut c = connect_packet(Protocol::V4, "");
    c.clean_start = false;
    let out = receive(&mut s, Inbound::Connect(c));
    assert!(
        matches!(&out[0], Action::Send(Outbound::ConnAck(a)) if a.code == ConnAckCode::BadClientId)
    );
    assert_eq!(out[1], Action::Close(CloseReason::ConnectRefused));
    assert!(s.is_closed());

    // 5: assigned, and the client is told its name.
    let mut s = Session::new(config(Arc::new(AllowAll)), 8);
    let mut c = connect_packet(Protocol::V5, "");
    c.clean_start = false;
    let out = receive(&mut s, Inbound::Connect(c));
    let Action::Send(Outbound::ConnAck(ack)) = &out[1] else {
        panic!("{out:?}")
    };
    assert_eq!(ack.assigned_client_id.as_deref(), Some("iotpipe-auto-8"));
}

#[test]
fn an_accepted_publish_becomes_a_packed_record_acked_once_durable() {
    let mut s = connected(Protocol::V4);
    let out = receive(
        &mut s,
        publish(1, 10, "dt/f1/dev-1/telemetry", GOOD.as_bytes()),
    );
    assert!(
        acks(&out).is_empty(),
        "no PUBACK before the stream stores it"
    );
    let a = appended(&out);
    assert_eq!(a.partition_key, "dev-1");
    assert_eq!(a.verdict, Verdict::Accepted { readings: 1 });
    assert_eq!(
        a.tap,
        Some(("dt/f1/dev-1/telemetry".into(), Bytes::from(GOOD)))
    );
    let StreamRecord::Readings(r) = decode_record(&a.data).unwrap() else {
        panic!("not readings")
    };
    assert_eq!((r.fleet.as_str(), r.device_id.as_str()), ("f1", "dev-1"));
    assert_eq!(r.received_at, NOW);
    assert_eq!(r.readings[0].ts, 1_764_240_000_123);
    assert_eq!(s.inflight(), 1);

    let out = durable(&mut s, a.token);
    assert_eq!(acks(&out), vec![(10, PubAckReason::Success)]);
    assert_eq!(s.inflight(), 0);
}

#[test]
fn pubacks_leave_in_arrival_order() {
    let mut s = connected(Protocol::V4);
    let topic = "dt/f/d/telemetry";
    let t0 = appended(&receive(&mut s, publish(1, 1, topic, GOOD.as_bytes()))).token;
    // A QoS 0 message between them holds its place but owes no ack.
    let t1 = appended(&receive(&mut s, publish(0, 0, topic, GOOD.as_bytes()))).token;
    let t2 = appended(&receive(&mut s, publish(1, 3, topic, GOOD.as_bytes()))).token;
    assert!(!s.wants_input(), "at max_inflight the socket is not read");

    assert!(acks(&durable(&mut s, t2)).is_empty());
    assert!(acks(&durable(&mut s, t1)).is_empty());
    assert_eq!(
        acks(&durable(&mut s, t0)),
        vec![(1, PubAckReason::Success), (3, PubAckReason::Success)]
    );
    assert!(s.wants_input());
    // A token reported twice, or unknown, changes nothing.
    assert!(durable(&mut s, t0).is_empty());
    assert!(durable(&mut s, 99).is_empty());
}

#[test]
fn refusals_are_dead_lettered_with_the_reason_and_acked_when_durable() {
    let too_large = vec![b' '; 128 * 1024 + 1];
    let cases: [(&str, &[u8], RejectReason, &str, PubAckReason); 6] = [
        (
            "dt/f/+/telemetry",
            GOOD.as_bytes(),
            RejectReason::BadTopic,
            "client-1",
            PubAckReason::TopicNameInvalid,
        ),
        (
            "sensors/x",
            GOOD.as_bytes(),
            RejectReason::BadTopic,
            "client-1",
            PubAckReason::TopicNameInvalid,
        ),
        (
            "dt/f/d1/telemetry",
            b"{not json",
            RejectReason::MalformedJson,
            "d1",
            PubAckReason::PayloadFormatInvalid,
        ),
        (
            "dt/f/d1/telemetry",
            br#"{"ts": 1764240000123, "metrics": {"t": NaN}}"#,
            RejectReason::NotFinite,
            "d1",
            PubAckReason::PayloadFormatInvalid,
        ),
        (
            "dt/f/d1/telemetry",
            br#"{"ts": 1764240000123, "metrics": {}}"#,
            RejectReason::Schema,
            "d1",
            PubAckReason::PayloadFormatInvalid,
        ),
        (
            "dt/f/d1/telemetry",
            &too_large,
            RejectReason::TooLarge,
            "d1",
            PubAckReason::PayloadFormatInvalid,
        ),
    ];
    for (topic, payload, reason, key, ack) in cases {
        let mut s = connected(Protocol::V5);
        let out = receive(&mut s, publish(1, 5, topic, payload));
        let a = appended(&out);
        assert_eq!(a.verdict, Verdict::Rejected(reason), "{topic}");
        assert_eq!(a.partition_key, key, "{topic}");
        assert_eq!(a.tap, None, "refusals are not shown on the tap");
        let StreamRecord::Rejected(m) = decode_record(&a.data).unwrap() else {
            panic!("not a dead letter")
        };
        assert_eq!(m.reason, reason);
        assert_eq!(m.topic, topic);
        assert_eq!(m.client_id, "client-1");
        assert_eq!(m.received_at, NOW);
        assert_eq!(m.payload_len, payload.len() as u64);
        let token = a.token;
        assert_eq!(acks(&durable(&mut s, token)), vec![(5, ack)], "{topic}");
        assert!(!s.is_closed());
    }
}

#[test]
fn an_overflowing_number_is_refused_as_not_finite() {
    let mut s = connected(Protocol::V4);
    let out = receive(
        &mut s,
        publish(
            1,
            1,
            "dt/f/d/telemetry",
            br#"{"ts": 1764240000123, "metrics": {"t": 1e400}}"#,
        ),
    );
    assert_eq!(
        appended(&out).verdict,
        Verdict::Rejected(RejectReason::NotFinite)
    );
}

#[test]
fn qos2_is_refused_like_iot_core() {
    let mut s = connected(Protocol::V4);
    let out = receive(&mut s, publish(2, 1, "dt/f/d/telemetry", GOOD.as_bytes()));
    assert_eq!(out, vec![Action::Close(CloseReason::QoS2)]);

    let mut s = connected(Protocol::V5);
    let out = receive(&mut s, publish(2, 1, "dt/f/d/telemetry", GOOD.as_bytes()));
    assert_eq!(
        out,
        vec![
            Action::Send(Outbound::Disconnect(DisconnectReasonCode::QoSNotSupported)),
            Action::Close(CloseReason::QoS2)
        ]
    );
    assert!(receive(&mut s, Inbound::PingReq).is_empty(), "closed");
}

#[test]
fn unauthorized_publishes_are_dead_lettered_and_refused_per_protocol() {
    let policy: Arc<dyn Authorizer> = Arc::new(OwnDeviceOnly);
    let mut s = connected_with(Protocol::V5, policy.clone(), Some("dev-1"));
    let own = receive(
        &mut s,
        publish(1, 1, "dt/f/dev-1/telemetry", GOOD.as_bytes()),
    );
    assert_eq!(appended(&own).verdict, Verdict::Accepted { readings: 1 });
    let other = receive(
        &mut s,
        publish(1, 2, "dt/f/dev-2/telemetry", GOOD.as_bytes()),
    );
    let a = appended(&other);
    assert_eq!(a.verdict, Verdict::Rejected(RejectReason::Unauthorized));
    assert_eq!(a.partition_key, "dev-2");
    let (t0, t1) = (appended(&own).token, a.token);
    durable(&mut s, t0);
    assert_eq!(
        acks(&durable(&mut s, t1)),
        vec![(2, PubAckReason::NotAuthorized)]
    );

    let mut s = connected_with(Protocol::V4, policy.clone(), Some("dev-1"));
    let out = receive(
        &mut s,
        publish(1, 2, "dt/f/dev-2/telemetry", GOOD.as_bytes()),
    );
    assert_eq!(
        appended(&out).verdict,
        Verdict::Rejected(RejectReason::Unauthorized)
    );
    assert_eq!(out.last(), Some(&Action::Close(CloseReason::Unauthorized)));

    // Without a username the policy refuses the CONNECT.
    let mut s = Session::new(config(policy), 1);
    let out = receive(&mut s, Inbound::Connect(connect_packet(Protocol::V5, "c")));
    assert!(
        matches!(&out[0], Action::Send(Outbound::ConnAck(a)) if a.code == ConnAckCode::NotAuthorized)
    );
    assert_eq!(out[1], Action::Close(CloseReason::ConnectRefused));
}

#[test]
fn a_failed_append_closes_without_acking() {
    let mut s = connected(Protocol::V5);
    let t0 = appended(&receive(
        &mut s,
        publish(1, 1, "dt/f/d/telemetry", GOOD.as_bytes()),
    ))
    .token;
    let mut out = Vec::new();
    s.durable(t0, false, &mut out);
    assert!(acks(&out).is_empty());
    assert_eq!(out.last(), Some(&Action::Close(CloseReason::AppendFailed)));
}

#[test]
fn subscriptions_grant_qos0_and_refuse_what_is_not_supported() {
    let mut s = connected(Protocol::V5);
    let out = receive(
        &mut s,
        Inbound::Subscribe(SubscribePacket {
            pkid: 4,
            filters: vec![
                "dt/+/d/telemetry".into(),
                "dt/#/x".into(),
                "$share/g/dt/#".into(),
                "dt/#".into(),
            ],
            subscription_id: false,
        }),
    );
    assert_eq!(
        out,
        vec![
            Action::SubscribeRefused {
                identity: None,
                refused: vec![
                    ("dt/#/x".into(), SubscribeRefusal::FilterInvalid),
                    ("$share/g/dt/#".into(), SubscribeRefusal::SharedNotSupported),
                ],
            },
            Action::Subscribe(vec!["dt/+/d/telemetry".into(), "dt/#".into()]),
            Action::Send(Outbound::SubAck {
                pkid: 4,
                codes: vec![
                    SubCode::GrantedQos0,
                    SubCode::FilterInvalid,
                    SubCode::SharedNotSupported,
                    SubCode::GrantedQos0
                ]
            })
        ]
    );
    let out = receive(
        &mut s,
        Inbound::Unsubscribe {
            pkid: 5,
            filters: vec!["dt/#".into()],
        },
    );
    assert_eq!(
        out,
        vec![
            Action::Unsubscribe(vec!["dt/#".into()]),
            Action::Send(Outbound::UnsubAck { pkid: 5, count: 1 })
        ]
    );
}

fn subscribe(s: &mut Session, filters: &[&str]) -> Vec<Action> {
    receive(
        s,
        Inbound::Subscribe(SubscribePacket {
            pkid: 7,
            filters: filters.iter().map(|f| f.to_string()).collect(),
            subscription_id: false,
        }),
    )
}

#[test]
fn a_device_may_subscribe_only_to_its_own_topics() {
    for protocol in [Protocol::V4, Protocol::V5] {
        let mut s = connected_with(protocol, Arc::new(OwnDeviceOnly), Some("dev-b"));
        let out = subscribe(
            &mut s,
            &[
                "dt/#",
                "dt/f/dev-a/telemetry",
                "dt/+/dev-b/telemetry",
                "#",
                "dt/f/+/telemetry",
                "dt/f/dev-b/#",
            ],
        );
        let refused = |f: &str| (f.to_string(), SubscribeRefusal::NotAuthorized);
        assert_eq!(
            out,
            vec![
                Action::SubscribeRefused {
                    identity: Some("dev-b".into()),
                    refused: vec![
                        refused("dt/#"),
                        refused("dt/f/dev-a/telemetry"),
                        refused("#"),
                        refused("dt/f/+/telemetry"),
                    ],
                },
                Action::Subscribe(vec!["dt/+/dev-b/telemetry".into(), "dt/f/dev-b/#".into()]),
                Action::Send(Outbound::SubAck {
                    pkid: 7,
                    codes: vec![
                        SubCode::NotAuthorized,
                        SubCode::NotAuthorized,
                        SubCode::GrantedQos0,
                        SubCode::NotAuthorized,
                        SubCode::NotAuthorized,
                        SubCode::GrantedQos0,
                    ]
                }),
            ],
            "{protocol:?}"
        );
        assert!(
            !s.is_closed(),
            "a refused filter leaves the connection open"
        );
    }
}

#[test]
fn an_operator_certificate_may_watch_the_fleet() {
    let mut s =
        Session::new(config(Arc::new(ClientCertificates)), 9).with_certificate(Some(Certified {
            device: "ops-1".into(),
            role: Role::Operator,
        }));
    let mut out = Vec::new();
    s.receive(
        Inbound::Connect(connect_packet(Protocol::V5, "ops")),
        NOW,
        &mut out,
    );
    assert_eq!(
        subscribe(&mut s, &["dt/#"]),
        vec![
            Action::Subscribe(vec!["dt/#".into()]),
            Action::Send(Outbound::SubAck {
                pkid: 7,
                codes: vec![SubCode::GrantedQos0]
            }),
        ]
    );
}

#[test]
fn protocol_housekeeping() {
    let mut s = connected(Protocol::V5);
    assert_eq!(
        receive(&mut s, Inbound::PingReq),
        vec![Action::Send(Outbound::PingResp)]
    );
    assert!(receive(&mut s, Inbound::Ack).is_empty());
    let out = receive(
        &mut s,
        Inbound::Connect(connect_packet(Protocol::V5, "again")),
    );
    assert!(matches!(
        out.as_slice(),
        [
            Action::Send(Outbound::Disconnect(DisconnectReasonCode::ProtocolError)),
            Action::Close(CloseReason::ProtocolError(_))
        ]
    ));

    let mut s = connected(Protocol::V4);
    assert_eq!(
        receive(&mut s, Inbound::Disconnect),
        vec![Action::Close(CloseReason::ClientDisconnected)]
    );

    // Anything before CONNECT, or an unknown protocol level.
    let mut s = Session::new(config(Arc::new(AllowAll)), 1);
    assert!(matches!(
        receive(&mut s, Inbound::PingReq).as_slice(),
        [Action::Close(CloseReason::ProtocolError(_))]
    ));
    let mut s = Session::new(config(Arc::new(AllowAll)), 1);
    let mut out = Vec::new();
    s.refuse(DecodeError::UnsupportedProtocol(3), &mut out);
    assert!(
        matches!(&out[0], Action::Send(Outbound::ConnAck(a)) if a.code == ConnAckCode::UnsupportedProtocol)
    );
    assert_eq!(s.protocol(), Some(Protocol::V4));

    // A v5 client gets told why it is dropped; the session says so once.
    let mut s = connected(Protocol::V5);
    let mut out = Vec::new();
    s.refuse(
        DecodeError::TooLarge {
            size: 200_000,
            max: 140_000,
        },
        &mut out,
    );
    s.close(CloseReason::KeepaliveTimeout, &mut out);
    assert_eq!(
        out,
        vec![
            Action::Send(Outbound::Disconnect(DisconnectReasonCode::PacketTooLarge)),
            Action::Close(CloseReason::TooLarge)
        ]
    );
}

#[test]
fn v5_topic_aliases_and_retain_are_refused() {
    let mut s = connected(Protocol::V5);
    let mut p = PublishPacket {
        qos: 1,
        pkid: 1,
        retain: false,
        topic: String::new(),
        payload: Bytes::from(GOOD),
        topic_alias: true,
    };
    let out = receive(&mut s, Inbound::Publish(p.clone()));
    assert_eq!(
        out.last(),
        Some(&Action::Close(CloseReason::TopicAliasInvalid))
    );

    let mut s = connected(Protocol::V5);
    p.topic_alias = false;
    p.topic = "dt/f/d/telemetry".into();
    p.retain = true;
    let out = receive(&mut s, Inbound::Publish(p.clone()));
    assert_eq!(
        out.last(),
        Some(&Action::Close(CloseReason::RetainNotSupported))
    );

    // 3.1.1 was promised nothing about retain: the flag is ignored.
    let mut s = connected(Protocol::V4);
    let out = receive(&mut s, Inbound::Publish(p));
    assert_eq!(appended(&out).verdict, Verdict::Accepted { readings: 1 });
}

fn presence_session() -> Session {
    presence_session_with(Arc::new(AllowAll))
}

fn presence_session_with(authorizer: Arc<dyn Authorizer>) -> Session {
    let cfg = SessionConfig {
        max_inflight: 8,
        max_packet_bytes: 140_000,
        max_keepalive_secs: 1200,
        authorizer,
        lateness: crate::LatenessConfig::default(),
        presence: true,
    };
    Session::new(Arc::new(cfg), 9)
}

fn presences(out: &[Action]) -> Vec<schemas::Presence> {
    out.iter()
        .filter_map(|a| match a {
            Action::Append(a) if a.verdict == Verdict::Presence => {
                match decode_record(&a.data).unwrap() {
                    StreamRecord::Presence(p) => Some(p),
                    other => panic!("not presence: {other:?}"),
                }
            }
            _ => None,
        })
        .collect()
}

/// A device cannot mark another device online or offline: a will naming a
/// device it may not publish as is not taken for that device's presence,
/// and the records speak of the device it is.
#[test]
fn a_will_naming_another_device_reports_only_the_device_itself() {
    let mut s = presence_session_with(Arc::new(OwnDeviceOnly));
    let mut out = Vec::new();
    let mut c = connect_packet(Protocol::V4, "client-7");
    c.username = Some("dev-b".into());
    c.will_topic = Some("dt/f/dev-a/status".into());
    s.receive(Inbound::Connect(c), NOW, &mut out);
    s.close(CloseReason::SocketClosed, &mut out);
    let p = presences(&out);
    assert_eq!(p.len(), 2, "{p:?}");
    for presence in &p {
        assert_eq!(presence.device_id, "dev-b");
        assert_eq!(presence.fleet, None, "the will's fleet is not taken either");
    }
    assert!(p[1].event.is_offline());
}

#[test]
fn a_connection_with_a_will_reports_connect_and_the_will_on_loss() {
    let mut s = presence_session();
    let mut out = Vec::new();
    let mut c = connect_packet(Protocol::V4, "dev-1");
    c.will_topic = Some("dt/f/dev-1/status".into());
    s.receive(Inbound::Connect(c), NOW, &mut out);
    let p = presences(&out);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].device_id, "dev-1");
    assert_eq!(p[0].fleet.as_deref(), Some("f"));
    assert_eq!(p[0].event, schemas::PresenceEvent::Connected);
    // The presence record owes no PUBACK, and holds none back.
    let token = appended(&out).token;
    out.clear();
    s.receive(
        publish(1, 1, "dt/f/dev-1/telemetry", GOOD.as_bytes()),
        NOW + 5,
        &mut out,
    );
    let publish_token = appended(&out).token;
    out.clear();
    s.durable(publish_token, true, &mut out);
    assert!(out.is_empty(), "{out:?}");
    s.durable(token, true, &mut out);
    assert!(
        matches!(
            out.as_slice(),
            [Action::Send(Outbound::PubAck { pkid: 1, .. })]
        ),
        "{out:?}"
    );
    out.clear();
    s.close(CloseReason::SocketClosed, &mut out);
    let p = presences(&out);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].at, NOW + 5, "the device was last heard then");
    assert!(p[0].event.is_offline());
    assert!(matches!(
        out.last(),
        Some(Action::Close(CloseReason::SocketClosed))
    ));
}

#[test]
fn a_clean_disconnect_is_reported_and_a_loss_without_a_will_is_not() {
    let mut s = presence_session();
    let mut out = Vec::new();
    s.receive(
        Inbound::Connect(connect_packet(Protocol::V5, "dev-2")),
        NOW,
        &mut out,
    );
    out.clear();
    // The fleet comes from the connection's publishes.
    s.receive(
        publish(0, 0, "dt/g/dev-2/telemetry", GOOD.as_bytes()),
        NOW + 1,
        &mut out,
    );
    out.clear();
    s.receive(Inbound::Disconnect, NOW + 2, &mut out);
    let p = presences(&out);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].fleet.as_deref(), Some("g"));
    assert_eq!(
        p[0].event,
        schemas::PresenceEvent::Disconnected {
            reason: schemas::presence::CLEAN_DISCONNECT.into()
        }
    );

    let mut s = presence_session();
    out.clear();
    s.receive(
        Inbound::Connect(connect_packet(Protocol::V4, "dev-3")),
        NOW,
        &mut out,
    );
    assert_eq!(presences(&out)[0].fleet, None);
    out.clear();
    s.close(CloseReason::KeepaliveTimeout, &mut out);
    assert!(presences(&out).is_empty(), "{out:?}");
    // Nor does a takeover: the device is still connected.
    let mut s = presence_session();
    let mut c = connect_packet(Protocol::V4, "dev-4");
    c.will_topic = Some("dt/f/dev-4/status".into());
    s.receive(Inbound::Connect(c), NOW, &mut out);
    out.clear();
    s.close(CloseReason::TakenOver, &mut out);
    assert!(presences(&out).is_empty(), "{out:?}");
}
