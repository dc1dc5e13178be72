//! The few MQTT packets a device writes, encoded straight into its write
//! buffer, and the packets it reads, decoded with rumqttc's codecs.
//!
//! Writing by hand keeps a publish free of the owned topic and payload copies
//! that rumqttc's packet structs need; reading through rumqttc keeps one
//! well-tested parser for what the broker says.

use bytes::{BufMut, BytesMut};
use rumqttc::mqttbytes;
use rumqttc::v5::mqttbytes as mqttbytes5;
use serde::{Deserialize, Serialize};

/// The MQTT protocol a device speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Protocol {
    /// MQTT 3.1.1 (protocol level 4).
    #[default]
    #[serde(rename = "3.1.1")]
    V4,
    /// MQTT 5.
    #[serde(rename = "5")]
    V5,
}

impl std::str::FromStr for Protocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "3.1.1" | "311" | "4" => Ok(Protocol::V4),
            "5" | "5.0" => Ok(Protocol::V5),
            _ => Err(format!("unknown MQTT protocol `{s}`; use 3.1.1 or 5")),
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::V4 => "3.1.1",
            Protocol::V5 => "5",
        })
    }
}

/// What the broker sent, reduced to what a device acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// `accepted` false: the broker refused the connection (`reason` says why).
    ConnAck {
        accepted: bool,
        reason: String,
        /// MQTT 5's Receive Maximum: the most QoS 1 publishes in flight.
        receive_max: Option<u16>,
    },
    /// `reason` is MQTT 5's reason code (0 under 3.1.1); 0x80 and above
    /// means the broker refused the message.
    PubAck {
        pkid: u16,
        reason: u8,
    },
    PingResp,
    /// The broker closes the connection (MQTT 5 only).
    Disconnect {
        reason: String,
    },
    /// Anything a publishing device does not expect; ignored.
    Other,
}

#[derive(Debug, thiserror::Error)]
#[error("the broker sent a malformed packet: {0}")]
pub struct DecodeError(String);

/// The largest packet a device accepts from the broker: acknowledgements
/// are tiny, so anything large is a protocol error.
const MAX_INCOMING: usize = 64 * 1024;

/// Decodes one packet from the front of `buf`; `Ok(None)` when more bytes
/// are needed.
pub fn decode(protocol: Protocol, buf: &mut BytesMut) -> Result<Option<Incoming>, DecodeError> {
    match protocol {
        Protocol::V4 => match mqttbytes::v4::Packet::read(buf, MAX_INCOMING) {
            Ok(p) => Ok(Some(from_v4(p))),
            Err(mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(DecodeError(e.to_string())),
        },
        Protocol::V5 => {
            // rumqttc's v5 reader rejects a DISCONNECT without a reason code,
            // which MQTT 5 allows (it means a normal disconnection).
            if buf.len() >= 2 && buf[0] == 0xE0 && buf[1] == 0 {
                let _ = buf.split_to(2);
                return Ok(Some(Incoming::Disconnect {
                    reason: "normal disconnection".into(),
                }));
            }
            match mqttbytes5::v5::Packet::read(buf, Some(MAX_INCOMING as u32)) {
                Ok(p) => Ok(Some(from_v5(p))),
                Err(mqttbytes5::Error::InsufficientBytes(_)) => Ok(None),
                Err(e) => Err(DecodeError(e.to_string())),
            }
        }
    }
}

fn from_v4(p: mqttbytes::v4::Packet) -> Incoming {
    use mqttbytes::v4::{ConnectReturnCode, Packet};
    match p {
        Packet::ConnAck(a) => Incoming::ConnAck {
            accepted: a.code == ConnectReturnCode::Success,
            reason: format!("{:?}", a.code),
            receive_max: None,
        },
        Packet::PubAck(a) => Incoming::PubAck {
            pkid: a.pkid,
            reason: 0,
        },
        Packet::PingResp => Incoming::PingResp,
        _ => Incoming::Other,
    }
}

fn from_v5(p: mqttbytes5::v5::Packet) -> Incoming {
    use mqttbytes5::v5::{ConnectReturnCode, Packet};
    match p {
        Packet::ConnAck(a) => Incoming::ConnAck {
            accepted: a.code == ConnectReturnCode::Success,
            reason: format!("{:?}", a.code),
            receive_max: a.properties.and_then(|p| p.receive_max),
        },
        Packet::PubAck(a) => Incoming::PubAck {
            pkid: a.pkid,
            reason: a.reason as u8,
        },
        Packet::PingResp(_) => Incoming::PingResp,
        Packet::Disconnect(d) => Incoming::Disconnect {
            reason: format!("{:?}", d.reason_code),
        },
        _ => Incoming::Other,
    }
}

/// Appends MQTT's variable-length remaining length.
fn put_remaining_length(buf: &mut BytesMut, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if len == 0 {
            return;
        }
    }
}

fn put_str(buf: &mut BytesMut, s: &[u8]) {
    buf.put_u16(s.len() as u16);
    buf.put_slice(s);
}

/// Credentials a device presents in its CONNECT.
#[derive(Debug, Clone, Copy, Default)]
pub struct Login<'a> {
    pub username: Option<&'a str>,
    pub password: Option<&'a str>,
}

/// A Last Will: published by the broker (at QoS 0, not retained) when the
/// connection is lost without a DISCONNECT.
#[derive(Debug, Clone, Copy)]
pub struct Will<'a> {
    pub topic: &'a str,
    pub payload: &'a [u8],
}

/// Appends a CONNECT with a clean session (3.1.1) or clean start (5).
pub fn connect(
    buf: &mut BytesMut,
    protocol: Protocol,
    client_id: &str,
    keep_alive_secs: u16,
    login: Login<'_>,
) {
    connect_with_will(buf, protocol, client_id, keep_alive_secs, login, None);
}

/// Appends a CONNECT as [`connect`] does, with a Last Will if given.
pub fn connect_with_will(
    buf: &mut BytesMut,
    protocol: Protocol,
    client_id: &str,
    keep_alive_secs: u16,
    login: Login<'_>,
    will: Option<Will<'_>>,
) {
    let mut flags = 0x02u8; // clean session / clean start
    let mut payload_len = 2 + client_id.len();
    if let Some(w) = will {
        flags |= 0x04;
        // MQTT 5 puts an (empty) will property list before the topic.
        payload_len +=
            usize::from(protocol == Protocol::V5) + 2 + w.topic.len() + 2 + w.payload.len();
    }
    if let Some(u) = login.username {
        flags |= 0x80;
        payload_len += 2 + u.len();
    }
    if let Some(p) = login.password {
        flags |= 0x40;
        payload_len += 2 + p.len();
    }
    // Protocol name, level, flags, keep alive; MQTT 5 adds an empty
    // property list.
    let (level, props) = match protocol {
        Protocol::V4 => (4u8, 0usize),
        Protocol::V5 => (5u8, 1usize),
    };
    let remaining = 6 + 1 + 1 + 2 + props + payload_len;
    buf.put_u8(0x10);
    put_remaining_length(buf, remaining);
    put_str(buf, b"MQTT");
    buf.put_u8(level);
    buf.put_u8(flags);
    buf.put_u16(keep_alive_secs);
    if protocol == Protocol::V5 {
        buf.put_u8(0);
    }
    put_str(buf, client_id.as_bytes());
    if let Some(w) = will {
        if protocol == Protocol::V5 {
            buf.put_u8(0);
        }
        put_str(buf, w.topic.as_bytes());
        put_str(buf, w.payload);
    }
    if let Some(u) = login.username {
        put_str(buf, u.as_bytes());
    }
    if let Some(p) = login.password {
        put_str(buf, p.as_bytes());
    }
}

/// Appends a PUBLISH at QoS 0 (`pkid` ignored) or 1.
pub fn publish(
    buf: &mut BytesMut,
    protocol: Protocol,
    topic: &str,
    qos1: bool,
    pkid: u16,
    dup: bool,
    payload: &[u8],
) {
    let props = usize::from(protocol == Protocol::V5);
    let remaining = 2 + topic.len() + if qos1 { 2 } else { 0 } + props + payload.len();
    let mut first = 0x30u8;
    if qos1 {
        first |= 0x02;
        if dup {
            first |= 0x08;
        }
    }
    buf.reserve(5 + remaining);
    buf.put_u8(first);
    put_remaining_length(buf, remaining);
    put_str(buf, topic.as_bytes());
    if qos1 {
        buf.put_u16(pkid);
    }
    if protocol == Protocol::V5 {
        buf.put_u8(0); // no properties
    }
    buf.put_slice(payload);
}

/// Appends a PINGREQ.
pub fn pingreq(buf: &mut BytesMut) {
    buf.put_slice(&[0xC0, 0x00]);
}

/// Appends a DISCONNECT; under MQTT 5 a zero remaining length means a
/// normal disconnection.
pub fn disconnect(buf: &mut BytesMut) {
    buf.put_slice(&[0xE0, 0x00]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn read_v4(buf: &mut BytesMut) -> mqttbytes::v4::Packet {
        mqttbytes::v4::Packet::read(buf, 1 << 20).unwrap()
    }

    fn read_v5(buf: &mut BytesMut) -> mqttbytes5::v5::Packet {
        mqttbytes5::v5::Packet::read(buf, None).unwrap()
    }

    #[test]
    fn connect_and_publish_round_trip_through_rumqttc_v4() {
        let mut buf = BytesMut::new();
        let login = Login {
            username: Some("u"),
            password: Some("p"),
        };
        connect(&mut buf, Protocol::V4, "dev-1", 60, login);
        publish(
            &mut buf,
            Protocol::V4,
            "dt/f/dev-1/telemetry",
            true,
            7,
            true,
            b"{\"seq\":1}",
        );
        let big = vec![b'x'; 300];
        publish(&mut buf, Protocol::V4, "t", false, 0, false, &big);
        pingreq(&mut buf);
        disconnect(&mut buf);
        match read_v4(&mut buf) {
            mqttbytes::v4::Packet::Connect(c) => {
                assert_eq!((c.client_id.as_str(), c.keep_alive), ("dev-1", 60));
                assert!(c.clean_session);
                let l = c.login.unwrap();
                assert_eq!((l.username.as_str(), l.password.as_str()), ("u", "p"));
            }
            p => panic!("{p:?}"),
        }
        match read_v4(&mut buf) {
            mqttbytes::v4::Packet::Publish(p) => {
                assert_eq!(p.topic, "dt/f/dev-1/telemetry");
                assert_eq!((p.pkid, p.dup, p.qos), (7, true, rumqttc::QoS::AtLeastOnce));
                assert_eq!(p.payload, Bytes::from_static(b"{\"seq\":1}"));
            }
            p => panic!("{p:?}"),
        }
        match read_v4(&mut buf) {
            mqttbytes::v4::Packet::Publish(p) => {
                assert_eq!((p.qos, p.payload.len()), (rumqttc::QoS::AtMostOnce, 300));
            }
            p => panic!("{p:?}"),
        }
        assert_eq!(read_v4(&mut buf), mqttbytes::v4::Packet::PingReq);
        assert_eq!(read_v4(&mut buf), mqttbytes::v4::Packet::Disconnect);
        assert!(buf.is_empty());
    }

    #[test]
    fn connect_and_publish_round_trip_through_rumqttc_v5() {
        let mut buf = BytesMut::new();
        connect(&mut buf, Protocol::V5, "dev-2", 30, Login::default());
        publish(&mut buf, Protocol::V5, "a/b", true, 65535, false, b"hello");
        match read_v5(&mut buf) {
            mqttbytes5::v5::Packet::Connect(c, will, login) => {
                assert_eq!((c.client_id.as_str(), c.keep_alive), ("dev-2", 30));
                assert!(c.clean_start && will.is_none() && login.is_none());
            }
            p => panic!("{p:?}"),
        }
        match read_v5(&mut buf) {
            mqttbytes5::v5::Packet::Publish(p) => {
                assert_eq!(p.topic, Bytes::from_static(b"a/b"));
                assert_eq!((p.pkid, p.payload.len()), (65535, 5));
            }
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn a_will_round_trips_through_rumqttc_v4_and_v5() {
        let will = Will {
            topic: "dt/f/dev-3/status",
            payload: b"offline",
        };
        let login = Login {
            username: Some("dev-3"),
            password: None,
        };
        let mut buf = BytesMut::new();
        connect_with_will(&mut buf, Protocol::V4, "dev-3", 60, login, Some(will));
        match read_v4(&mut buf) {
            mqttbytes::v4::Packet::Connect(c) => {
                let w = c.last_will.unwrap();
                assert_eq!(w.topic, "dt/f/dev-3/status");
                assert_eq!(w.message, Bytes::from_static(b"offline"));
                assert_eq!((w.qos, w.retain), (rumqttc::QoS::AtMostOnce, false));
                assert_eq!(c.login.unwrap().username, "dev-3");
            }
            p => panic!("{p:?}"),
        }
        connect_with_will(&mut buf, Protocol::V5, "dev-3", 60, login, Some(will));
        match read_v5(&mut buf) {
            mqttbytes5::v5::Packet::Connect(c, will, login) => {
                assert_eq!(c.client_id, "dev-3");
                let w = will.unwrap();
                assert_eq!(w.topic, Bytes::from_static(b"dt/f/dev-3/status"));
                assert_eq!(w.message, Bytes::from_static(b"offline"));
                assert_eq!(login.unwrap().username, "dev-3");
            }
            p => panic!("{p:?}"),
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn decodes_acks_and_waits_for_whole_packets() {
        let mut buf = BytesMut::new();
        mqttbytes::v4::Packet::PubAck(mqttbytes::v4::PubAck::new(9))
            .write(&mut buf, 1 << 20)
            .unwrap();
        let mut partial = buf.split_to(3);
        assert_eq!(decode(Protocol::V4, &mut partial).unwrap(), None);
        partial.unsplit(buf);
        assert_eq!(
            decode(Protocol::V4, &mut partial).unwrap(),
            Some(Incoming::PubAck { pkid: 9, reason: 0 })
        );

        let mut buf = BytesMut::new();
        let ack = mqttbytes5::v5::ConnAck {
            session_present: false,
            code: mqttbytes5::v5::ConnectReturnCode::NotAuthorized,
            properties: None,
        };
        ack.write(&mut buf).unwrap();
        buf.put_slice(&[0xE0, 0x00]);
        match decode(Protocol::V5, &mut buf).unwrap() {
            Some(Incoming::ConnAck { accepted, .. }) => assert!(!accepted),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decode(Protocol::V5, &mut buf).unwrap(),
            Some(Incoming::Disconnect { .. })
        ));
        // Packet type 0 is reserved.
        let mut junk = BytesMut::from(&[0x00u8, 0x00][..]);
        assert!(decode(Protocol::V4, &mut junk).is_err());
    }

    #[test]
    fn remaining_length_uses_several_bytes_when_needed() {
        for (len, bytes) in [
            (0usize, 1usize),
            (127, 1),
            (128, 2),
            (16_383, 2),
            (16_384, 3),
        ] {
            let mut b = BytesMut::new();
            put_remaining_length(&mut b, len);
            assert_eq!(b.len(), bytes, "{len}");
        }
    }
}
