//! Bytes ↔ packets, for MQTT 3.1.1 and 5, on rumqttc's codecs.
//!
//! The rest of the endpoint sees one protocol-neutral shape ([`Inbound`],
//! [`Outbound`]); which codec applies is fixed per connection by the protocol
//! level byte of its CONNECT, peeked before parsing because the 3.1.1 parser
//! mis-reads an MQTT 5 CONNECT. Framing is done here rather than by the codecs
//! so that an oversized packet is refused from its fixed header, before its
//! body is buffered, and so that MQTT 5's two-byte DISCONNECT (which rumqttc's
//! reader refuses) is understood.

use crate::metrics::SubscribeRefusal;
use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

pub(crate) use rumqttc::v5::mqttbytes::v5::{DisconnectReasonCode, PubAckReason};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    V4,
    V5,
}

/// A packet from a client, whichever protocol carried it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Inbound {
    Connect(ConnectPacket),
    Publish(PublishPacket),
    Subscribe(SubscribePacket),
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect,
    /// An acknowledgement from the client. The endpoint sends only QoS 0, so
    /// none is expected; they are ignored.
    Ack,
    /// A packet only a server sends, or one of the QoS 2 flow.
    Unexpected(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConnectPacket {
    pub protocol: Protocol,
    pub client_id: String,
    pub clean_start: bool,
    pub keepalive_secs: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    /// MQTT 5: the largest packet the client accepts; live-tap messages above
    /// it are skipped for that client.
    pub max_packet_size: Option<u32>,
    /// The Last Will's topic, if the client left one: losing its connection
    /// is then the device going offline.
    pub will_topic: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PublishPacket {
    /// 0, 1 or 2, as sent; the session refuses 2.
    pub qos: u8,
    /// Zero for QoS 0.
    pub pkid: u16,
    pub retain: bool,
    pub topic: String,
    pub payload: Bytes,
    /// MQTT 5: the publish uses a topic alias, which the endpoint does not
    /// grant (its Topic Alias Maximum is 0).
    pub topic_alias: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SubscribePacket {
    pub pkid: u16,
    pub filters: Vec<String>,
    /// MQTT 5: the SUBSCRIBE carries a Subscription Identifier, which the
    /// endpoint says it does not support.
    pub subscription_id: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum DecodeError {
    #[error("a {size}-byte packet exceeds the {max}-byte limit")]
    TooLarge { size: usize, max: usize },
    #[error("protocol level {0} is not MQTT 3.1.1 (4) or 5")]
    UnsupportedProtocol(u8),
    #[error("malformed packet: {0}")]
    Malformed(String),
}

fn malformed(e: impl std::fmt::Display) -> DecodeError {
    DecodeError::Malformed(e.to_string())
}

/// One whole packet, split off the read buffer.
#[derive(Debug, Clone)]
pub(crate) struct Frame {
    byte1: u8,
    /// Fixed header length: the type byte and 1..=4 length bytes.
    header_len: usize,
    bytes: BytesMut,
}

impl Frame {
    fn packet_type(&self) -> u8 {
        self.byte1 >> 4
    }

    fn remaining_len(&self) -> usize {
        self.bytes.len() - self.header_len
    }
}

/// Splits the next whole packet off `buf`; `None` means more bytes are needed
/// (and `buf` has been told how many to expect). `max` bounds the whole
/// packet, fixed header included, as MQTT 5's Maximum Packet Size does.
pub(crate) fn next_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, DecodeError> {
    let Some(&byte1) = buf.first() else {
        return Ok(None);
    };
    let mut remaining = 0usize;
    let mut header_len = 1;
    loop {
        let Some(&b) = buf.get(header_len) else {
            return Ok(None);
        };
        remaining |= usize::from(b & 0x7f) << (7 * (header_len - 1));
        header_len += 1;
        if b & 0x80 == 0 {
            break;
        }
        if header_len == 5 {
            return Err(malformed("remaining length longer than 4 bytes"));
        }
    }
    let size = header_len + remaining;
    if size > max {
        return Err(DecodeError::TooLarge { size, max });
    }
    if buf.len() < size {
        buf.reserve(size - buf.len());
        return Ok(None);
    }
    Ok(Some(Frame {
        byte1,
        header_len,
        bytes: buf.split_to(size),
    }))
}

const CONNECT: u8 = 1;
const DISCONNECT: u8 = 14;

/// The protocol a CONNECT frame speaks, from its protocol name and level.
pub(crate) fn connect_protocol(frame: &Frame) -> Result<Protocol, DecodeError> {
    if frame.packet_type() != CONNECT {
        return Err(malformed("the first packet must be CONNECT"));
    }
    let body = &frame.bytes[frame.header_len..];
    match body {
        [0, 4, b'M', b'Q', b'T', b'T', 4, ..] => Ok(Protocol::V4),
        [0, 4, b'M', b'Q', b'T', b'T', 5, ..] => Ok(Protocol::V5),
        [0, 4, b'M', b'Q', b'T', b'T', level, ..] => Err(DecodeError::UnsupportedProtocol(*level)),
        [0, 6, b'M', b'Q', b'I', b's', b'd', b'p', level, ..] => {
            Err(DecodeError::UnsupportedProtocol(*level))
        }
        _ => Err(malformed("CONNECT without the MQTT protocol name")),
    }
}

/// Decodes a frame with the connection's codec.
pub(crate) fn decode(protocol: Protocol, frame: Frame) -> Result<Inbound, DecodeError> {
    match protocol {
        Protocol::V4 => decode_v4(frame),
        Protocol::V5 => decode_v5(frame),
    }
}

fn decode_v4(frame: Frame) -> Result<Inbound, DecodeError> {
    let mut bytes = frame.bytes;
    let packet = v4::Packet::read(&mut bytes, usize::MAX).map_err(malformed)?;
    Ok(match packet {
        v4::Packet::Connect(c) => Inbound::Connect(ConnectPacket {
            protocol: Protocol::V4,
            client_id: c.client_id,
            clean_start: c.clean_session,
            keepalive_secs: c.keep_alive,
            username: c.login.as_ref().map(|l| l.username.clone()),
            password: c.login.map(|l| l.password),
            max_packet_size: None,
            will_topic: c.last_will.map(|w| w.topic),
        }),
        v4::Packet::Publish(p) => Inbound::Publish(PublishPacket {
            qos: p.qos as u8,
            pkid: p.pkid,
            retain: p.retain,
            topic: p.topic,
            payload: p.payload,
            topic_alias: false,
        }),
        v4::Packet::Subscribe(s) => Inbound::Subscribe(SubscribePacket {
            pkid: s.pkid,
            filters: s.filters.into_iter().map(|f| f.path).collect(),
            subscription_id: false,
        }),
        v4::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
        },
        v4::Packet::PingReq => Inbound::PingReq,
        v4::Packet::Disconnect => Inbound::Disconnect,
        v4::Packet::PubAck(_) => Inbound::Ack,
        v4::Packet::PubRec(_) => Inbound::Unexpected("PUBREC"),
        v4::Packet::PubRel(_) => Inbound::Unexpected("PUBREL"),
        v4::Packet::PubComp(_) => Inbound::Unexpected("PUBCOMP"),
        v4::Packet::ConnAck(_) => Inbound::Unexpected("CONNACK"),
        v4::Packet::SubAck(_) => Inbound::Unexpected("SUBACK"),
        v4::Packet::UnsubAck(_) => Inbound::Unexpected("UNSUBACK"),
        v4::Packet::PingResp => Inbound::Unexpected("PINGRESP"),
    })
}

fn decode_v5(frame: Frame) -> Result<Inbound, DecodeError> {
    // MQTT 5 allows a DISCONNECT with no body (reason 0, normal); rumqttc
    // writes it that way but its reader refuses it.
    if frame.packet_type() == DISCONNECT && frame.remaining_len() == 0 {
        if frame.byte1 & 0x0f != 0 {
            return Err(malformed("DISCONNECT with flags set"));
        }
        return Ok(Inbound::Disconnect);
    }
    let mut bytes = frame.bytes;
    let packet = v5::Packet::read(&mut bytes, None).map_err(malformed)?;
    Ok(match packet {
        v5::Packet::Connect(c, will, login) => Inbound::Connect(ConnectPacket {
            protocol: Protocol::V5,
            client_id: c.client_id,
            clean_start: c.clean_start,
            keepalive_secs: c.keep_alive,
            username: login.as_ref().map(|l| l.username.clone()),
            password: login.map(|l| l.password),
            max_packet_size: c.properties.and_then(|p| p.max_packet_size),
            will_topic: will.and_then(|w| String::from_utf8(w.topic.to_vec()).ok()),
        }),
        v5::Packet::Publish(p) => {
            let topic =
                String::from_utf8(p.topic.to_vec()).map_err(|_| malformed("topic is not UTF-8"))?;
            Inbound::Publish(PublishPacket {
                qos: p.qos as u8,
                pkid: p.pkid,
                retain: p.retain,
                topic,
                payload: p.payload,
                topic_alias: p.properties.is_some_and(|p| p.topic_alias.is_some()),
            })
        }
        v5::Packet::Subscribe(s) => Inbound::Subscribe(SubscribePacket {
            pkid: s.pkid,
            filters: s.filters.into_iter().map(|f| f.path).collect(),
            subscription_id: s.properties.is_some_and(|p| p.id.is_some()),
        }),
        v5::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
            pkid: u.pkid,
            filters: u.filters,
        },
        v5::Packet::PingReq(_) => Inbound::PingReq,
        v5::Packet::Disconnect(_) => Inbound::Disconnect,
        v5::Packet::PubAck(_) => Inbound::Ack,
        v5::Packet::PubRec(_) => Inbound::Unexpected("PUBREC"),
        v5::Packet::PubRel(_) => Inbound::Unexpected("PUBREL"),
        v5::Packet::PubComp(_) => Inbound::Unexpected("PUBCOMP"),
        v5::Packet::ConnAck(_) => Inbound::Unexpected("CONNACK"),
        v5::Packet::SubAck(_) => Inbound::Unexpected("SUBACK"),
        v5::Packet::UnsubAck(_) => Inbound::Unexpected("UNSUBACK"),
        v5::Packet::PingResp(_) => Inbound::Unexpected("PINGRESP"),
        v5::Packet::Auth(_) => Inbound::Unexpected("AUTH"),
    })
}

/// A packet to a client, whichever protocol it speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outbound {
    ConnAck(ConnAck),
    PubAck {
        pkid: u16,
        reason: PubAckReason,
    },
    SubAck {
        pkid: u16,
        codes: Vec<SubCode>,
    },
    UnsubAck {
        pkid: u16,
        count: usize,
    },
    PingResp,
    /// MQTT 5 only: 3.1.1 has no server DISCONNECT, so nothing is written.
    Disconnect(DisconnectReasonCode),
    /// A live-tap message, always QoS 0.
    Publish {
        topic: Bytes,
        payload: Bytes,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConnAck {
    pub code: ConnAckCode,
    /// MQTT 5: the id the server chose for a client that sent none.
    pub assigned_client_id: Option<String>,
    /// MQTT 5: the keepalive the server holds the client to, when it differs
    /// from what the client asked for.
    pub server_keepalive: Option<u16>,
    pub receive_max: u16,
    pub max_packet_size: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnAckCode {
    Accepted,
    UnsupportedProtocol,
    BadClientId,
    BadCredentials,
    NotAuthorized,
}

/// The answer to one SUBSCRIBE filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SubCode {
    GrantedQos0,
    FilterInvalid,
    SharedNotSupported,
    SubscriptionIdsNotSupported,
    /// The policy does not let this client watch what the filter matches.
    NotAuthorized,
}

impl SubCode {
    /// Why the filter was refused; `None` when it was granted.
    pub fn refusal(self) -> Option<SubscribeRefusal> {
        match self {
            SubCode::GrantedQos0 => None,
            SubCode::FilterInvalid => Some(SubscribeRefusal::FilterInvalid),
            SubCode::SharedNotSupported => Some(SubscribeRefusal::SharedNotSupported),
            SubCode::SubscriptionIdsNotSupported => {
                Some(SubscribeRefusal::SubscriptionIdsNotSupported)
            }
            SubCode::NotAuthorized => Some(SubscribeRefusal::NotAuthorized),
        }
    }
}

/// Appends `packet` as `protocol` encodes it. Every packet here is far below
/// the codecs' size limits; one that still fails to encode is skipped.
pub(crate) fn encode(protocol: Protocol, packet: Outbound, out: &mut BytesMut) {
    let result = match protocol {
        Protocol::V4 => encode_v4(packet, out),
        Protocol::V5 => encode_v5(packet, out),
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, "An outgoing packet could not be encoded and was skipped.");
    }
}

fn encode_v4(packet: Outbound, out: &mut BytesMut) -> Result<(), String> {
    use v4::{ConnectReturnCode as C, SubscribeReasonCode as S};
    let written = match packet {
        Outbound::ConnAck(a) => {
            let code = match a.code {
                ConnAckCode::Accepted => C::Success,
                ConnAckCode::UnsupportedProtocol => C::RefusedProtocolVersion,
                ConnAckCode::BadClientId => C::BadClientId,
                ConnAckCode::BadCredentials => C::BadUserNamePassword,
                ConnAckCode::NotAuthorized => C::NotAuthorized,
            };
            v4::ConnAck::new(code, false).write(out)
        }
        Outbound::PubAck { pkid, .. } => v4::PubAck::new(pkid).write(out),
        Outbound::SubAck { pkid, codes } => {
            let codes = codes
                .into_iter()
                .map(|c| match c {
                    SubCode::GrantedQos0 => S::Success(rumqttc::mqttbytes::QoS::AtMostOnce),
                    _ => S::Failure,
                })
                .collect();
            v4::SubAck::new(pkid, codes).write(out)
        }
        Outbound::UnsubAck { pkid, .. } => v4::UnsubAck::new(pkid).write(out),
        Outbound::PingResp => v4::PingResp.write(out),
        Outbound::Disconnect(_) => return Ok(()),
        Outbound::Publish { topic, payload } => {
            let topic = String::from_utf8(topic.to_vec()).map_err(|e| e.to_string())?;
            v4::Publish::from_bytes(topic, rumqttc::mqttbytes::QoS::AtMostOnce, payload).write(out)
        }
    };
    written.map(drop).map_err(|e| e.to_string())
}

fn encode_v5(packet: Outbound, out: &mut BytesMut) -> Result<(), String> {
    use v5::{ConnectReturnCode as C, SubscribeReasonCode as S};
    let written = match packet {
        Outbound::ConnAck(a) => {
            let code = match a.code {
                ConnAckCode::Accepted => C::Success,
                ConnAckCode::UnsupportedProtocol => C::UnsupportedProtocolVersion,
                ConnAckCode::BadClientId => C::ClientIdentifierNotValid,
                ConnAckCode::BadCredentials => C::BadUserNamePassword,
                ConnAckCode::NotAuthorized => C::NotAuthorized,
            };
            let properties = (a.code == ConnAckCode::Accepted).then(|| v5::ConnAckProperties {
                session_expiry_interval: None,
                receive_max: Some(a.receive_max),
                max_qos: Some(1),
                retain_available: Some(0),
                max_packet_size: Some(a.max_packet_size),
                assigned_client_identifier: a.assigned_client_id,
                topic_alias_max: None,
                reason_string: None,
                user_properties: Vec::new(),
                wildcard_subscription_available: Some(1),
                subscription_identifiers_available: Some(0),
                shared_subscription_available: Some(0),
                server_keep_alive: a.server_keepalive,
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            });
            v5::ConnAck {
                session_present: false,
                code,
                properties,
            }
            .write(out)
        }
        Outbound::PubAck { pkid, reason } => v5::PubAck {
            pkid,
            reason,
            properties: None,
        }
        .write(out),
        Outbound::SubAck { pkid, codes } => v5::SubAck {
            pkid,
            return_codes: codes
                .into_iter()
                .map(|c| match c {
                    SubCode::GrantedQos0 => S::Success(rumqttc::v5::mqttbytes::QoS::AtMostOnce),
                    SubCode::FilterInvalid => S::TopicFilterInvalid,
                    SubCode::SharedNotSupported => S::SharedSubscriptionsNotSupported,
                    SubCode::SubscriptionIdsNotSupported => S::SubscriptionIdNotSupported,
                    SubCode::NotAuthorized => S::NotAuthorized,
                })
                .collect(),
            properties: None,
        }
        .write(out),
        Outbound::UnsubAck { pkid, count } => v5::UnsubAck {
            pkid,
            reasons: vec![v5::UnsubAckReason::Success; count],
            properties: None,
        }
        .write(out),
        Outbound::PingResp => v5::PingResp::write(out),
        Outbound::Disconnect(reason) => {
            // Written by hand: rumqttc's writer announces one byte too few
            // for a reason code without properties, and its reader needs the
            // (empty) property length, which MQTT 5 allows either way.
            out.extend_from_slice(&[0xe0, 0x02, reason as u8, 0x00]);
            Ok(4)
        }
        Outbound::Publish { topic, payload } => v5::Publish {
            dup: false,
            qos: rumqttc::v5::mqttbytes::QoS::AtMostOnce,
            retain: false,
            topic,
            pkid: 0,
            payload,
            properties: None,
        }
        .write(out),
    };
    written.map(drop).map_err(|e| e.to_string())
}

/// The encoded size of a QoS 0 PUBLISH, to respect an MQTT 5 client's
/// Maximum Packet Size.
pub(crate) fn publish_size(protocol: Protocol, topic: &[u8], payload: &[u8]) -> usize {
    let props = usize::from(protocol == Protocol::V5);
    let remaining = 2 + topic.len() + props + payload.len();
    let len_len = match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    1 + len_len + remaining
}

#[cfg(test)]
mod tests;
