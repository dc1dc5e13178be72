//! One connection's protocol state, with no I/O: packets and events in,
//! [`Action`]s out.
//!
//! The session decides what each packet means (validate, turn into a stream
//! record, answer) and keeps the one piece of state that matters for
//! durability: the queue of records handed to the appender in arrival order,
//! from which PUBACKs leave strictly in order, each only once its record and
//! every earlier one are stored.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use schemas::presence::{CLEAN_DISCONNECT, CONNECTION_LOST};
use schemas::topic::check_id;
use schemas::{Presence, PresenceEvent, RejectReason, Topic};

use super::codec::{
    ConnAck, ConnAckCode, ConnectPacket, DecodeError, DisconnectReasonCode, Inbound, Outbound,
    Protocol, PubAckReason, PublishPacket, SubCode, SubscribePacket,
};
use super::tap::valid_filter;
use crate::auth::{Authorizer, ConnectInfo, ConnectRefusal, Principal, Role};
use crate::metrics::SubscribeRefusal;
pub(crate) use crate::record::Verdict;
use crate::record::{self, Built};
use crate::tls::Certified;

/// What the session needs from the endpoint's configuration.
pub(crate) struct SessionConfig {
    pub max_inflight: usize,
    pub max_packet_bytes: usize,
    pub max_keepalive_secs: u16,
    pub authorizer: Arc<dyn Authorizer>,
    pub lateness: crate::LatenessConfig,
    /// Append presence records (see [`crate::EndpointConfig::presence`]).
    pub presence: bool,
}

/// What the connection shell must do, in order.
#[derive(Debug, PartialEq)]
pub(crate) enum Action {
    Send(Outbound),
    Append(Append),
    /// The CONNECT was accepted: claim the client id (closing any connection
    /// that holds it) and enforce this keepalive.
    Connected {
        client_id: String,
        keepalive: Duration,
        /// MQTT 5: the largest packet the client takes.
        max_packet_size: Option<u32>,
    },
    Subscribe(Vec<String>),
    /// Filters of a SUBSCRIBE that were refused, each with why, to count and
    /// log; `identity` is who asked.
    SubscribeRefused {
        identity: Option<String>,
        refused: Vec<(String, SubscribeRefusal)>,
    },
    Unsubscribe(Vec<String>),
    /// Write what is queued, then close the socket. Always the last action.
    Close(CloseReason),
}

/// A stream record for the appender.
#[derive(Debug, PartialEq)]
pub(crate) struct Append {
    /// Identifies the record when the appender reports it durable.
    pub token: u64,
    pub partition_key: String,
    pub data: Vec<u8>,
    pub verdict: Verdict,
    /// Accepted telemetry keeps its topic and payload for the live tap.
    pub tap: Option<(String, bytes::Bytes)>,
}

/// Why a connection closes; each maps to a metric and, for MQTT 5, to the
/// reason code of the server's DISCONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CloseReason {
    /// The client sent DISCONNECT.
    ClientDisconnected,
    /// The client closed the socket, or it failed.
    SocketClosed,
    ConnectRefused,
    ProtocolError(String),
    Malformed(String),
    TooLarge,
    QoS2,
    RetainNotSupported,
    TopicAliasInvalid,
    Unauthorized,
    KeepaliveTimeout,
    TakenOver,
    ServerShutdown,
    /// The stream refused a record for good; the client resends it.
    AppendFailed,
    /// The client stopped reading what it is sent.
    WriteStalled,
}

impl CloseReason {
    fn v5_code(&self) -> Option<DisconnectReasonCode> {
        use DisconnectReasonCode as D;
        Some(match self {
            CloseReason::ClientDisconnected
            | CloseReason::SocketClosed
            | CloseReason::ConnectRefused
            | CloseReason::WriteStalled => return None,
            CloseReason::ProtocolError(_) => D::ProtocolError,
            CloseReason::Malformed(_) => D::MalformedPacket,
            CloseReason::TooLarge => D::PacketTooLarge,
            CloseReason::QoS2 => D::QoSNotSupported,
            CloseReason::RetainNotSupported => D::RetainNotSupported,
            CloseReason::TopicAliasInvalid => D::TopicAliasInvalid,
            CloseReason::Unauthorized => D::NotAuthorized,
            CloseReason::KeepaliveTimeout => D::KeepAliveTimeout,
            CloseReason::TakenOver => D::SessionTakenOver,
            CloseReason::ServerShutdown => D::ServerShuttingDown,
            CloseReason::AppendFailed => D::UnspecifiedError,
        })
    }
}

/// A record handed to the appender and not yet acknowledged.
#[derive(Debug)]
struct Pending {
    /// QoS 1: the PUBACK owed once the record is durable.
    ack: Option<(u16, PubAckReason)>,
    durable: bool,
}

#[derive(Debug)]
enum State {
    AwaitingConnect,
    Connected(Principal),
    Closed,
}

pub(crate) struct Session {
    config: Arc<SessionConfig>,
    /// Unique per endpoint; names clients that send no client id.
    conn_id: u64,
    state: State,
    /// Set by the CONNECT; 3.1.1 until then, so that a refusal of an unknown
    /// protocol level goes out as a 3.1.1 CONNACK, which every client reads.
    protocol: Option<Protocol>,
    /// Records appended, in arrival order, not yet acknowledged.
    pending: VecDeque<Pending>,
    /// The token the next record gets; `pending[i]` has token
    /// `next_token - pending.len() + i`.
    next_token: u64,
    /// Who the connection's verified TLS client certificate names.
    certificate: Option<Certified>,
    /// Whose presence this connection reports, once connected.
    presence: Option<PresenceOf>,
    /// When the last packet arrived. A lost connection is noticed later (a
    /// failed read, a keepalive timeout); the device was last heard then.
    last_ms: i64,
}

/// The device a connection's presence records are about.
#[derive(Debug)]
struct PresenceOf {
    device_id: String,
    /// From the will topic, else from the connection's first accepted
    /// publish; unknown, the processors take the device item's.
    fleet: Option<String>,
    client_id: String,
    /// The client left a Last Will: losing the connection is going offline.
    will: bool,
}

impl Session {
    pub fn new(config: Arc<SessionConfig>, conn_id: u64) -> Self {
        Session {
            config,
            conn_id,
            state: State::AwaitingConnect,
            protocol: None,
            pending: VecDeque::new(),
            next_token: 0,
            certificate: None,
            presence: None,
            last_ms: 0,
        }
    }

    /// The session of a connection whose TLS client certificate, verified in
    /// the handshake, names `certified`.
    pub fn with_certificate(mut self, certified: Option<Certified>) -> Self {
        self.certificate = certified;
        self
    }

    pub fn protocol(&self) -> Option<Protocol> {
        self.protocol
    }

    /// Records waiting for the stream.
    pub fn inflight(&self) -> usize {
        self.pending.len()
    }

    /// Whether the shell should read more packets now.
    pub fn wants_input(&self) -> bool {
        !matches!(self.state, State::Closed) && self.pending.len() < self.config.max_inflight
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Handles one packet. `now_ms` stamps `received_at`.
    pub fn receive(&mut self, packet: Inbound, now_ms: i64, out: &mut Vec<Action>) {
        self.last_ms = now_ms;
        match (&self.state, packet) {
            (State::Closed, _) => {}
            (State::AwaitingConnect, Inbound::Connect(c)) => self.connect(c, out),
            (State::AwaitingConnect, _) => {
                self.close(CloseReason::ProtocolError("no CONNECT".into()), out)
            }
            (State::Connected(_), Inbound::Connect(_)) => {
                self.close(CloseReason::ProtocolError("a second CONNECT".into()), out)
            }
            (State::Connected(_), Inbound::Publish(p)) => self.publish(p, now_ms, out),
            (State::Connected(_), Inbound::Subscribe(s)) => self.subscribe(s, out),
            (State::Connected(_), Inbound::Unsubscribe { pkid, filters }) => {
                let count = filters.len();
                out.push(Action::Unsubscribe(filters));
                out.push(Action::Send(Outbound::UnsubAck { pkid, count }));
            }
            (State::Connected(_), Inbound::PingReq) => out.push(Action::Send(Outbound::PingResp)),
            (State::Connected(_), Inbound::Disconnect) => {
                self.close(CloseReason::ClientDisconnected, out)
            }
            (State::Connected(_), Inbound::Ack) => {}
            (State::Connected(_), Inbound::Unexpected(what)) => self.close(
                CloseReason::ProtocolError(format!("a client may not send {what}")),
                out,
            ),
        }
    }

    /// Handles a packet that could not be read.
    pub fn refuse(&mut self, error: DecodeError, out: &mut Vec<Action>) {
        match error {
            DecodeError::TooLarge { .. } => self.close(CloseReason::TooLarge, out),
            DecodeError::UnsupportedProtocol(_) => {
                if matches!(self.state, State::AwaitingConnect) {
                    self.protocol = Some(Protocol::V4);
                    self.refuse_connect(ConnAckCode::UnsupportedProtocol, out);
                } else {
                    self.close(CloseReason::Malformed(error.to_string()), out);
                }
            }
            DecodeError::Malformed(detail) => self.close(CloseReason::Malformed(detail), out),
        }
    }

    /// Closes the session, telling an MQTT 5 client why when it has been
    /// connected.
    pub fn close(&mut self, reason: CloseReason, out: &mut Vec<Action>) {
        if self.is_closed() {
            return;
        }
        let connected = matches!(self.state, State::Connected(_));
        if connected && let Some(event) = self.presence_on_close(&reason) {
            self.report_presence(event, self.last_ms, out);
        }
        if let (true, Some(Protocol::V5), Some(code)) = (connected, self.protocol, reason.v5_code())
        {
            out.push(Action::Send(Outbound::Disconnect(code)));
        }
        self.state = State::Closed;
        out.push(Action::Close(reason));
    }

    /// The appender's word on record `token`: stored, or refused for good.
    /// Releases every PUBACK that is now due, in order.
    pub fn durable(&mut self, token: u64, stored: bool, out: &mut Vec<Action>) {
        let front = self.next_token - self.pending.len() as u64;
        let Some(index) = token
            .checked_sub(front)
            .and_then(|i| usize::try_from(i).ok())
            .filter(|i| *i < self.pending.len())
        else {
            return;
        };
        if !stored {
            // Never acknowledged: closing makes the client resend it and
            // everything after it.
            self.close(CloseReason::AppendFailed, out);
            return;
        }
        self.pending[index].durable = true;
        while self.pending.front().is_some_and(|p| p.durable) {
            if let Some(Pending {
                ack: Some((pkid, reason)),
                ..
            }) = self.pending.pop_front()
                && !self.is_closed()
            {
                out.push(Action::Send(Outbound::PubAck { pkid, reason }));
            }
        }
    }

    /// What closing for `reason` says about the device: a DISCONNECT is a
    /// clean disconnect, and a lost connection with a will is the will. A
    /// takeover (the device connected again) and a shutdown (the server
    /// went away, not the device) say nothing.
    fn presence_on_close(&self, reason: &CloseReason) -> Option<PresenceEvent> {
        let will = self.presence.as_ref()?.will;
        let reason = match reason {
            CloseReason::ClientDisconnected => CLEAN_DISCONNECT,
            CloseReason::TakenOver
            | CloseReason::ServerShutdown
            | CloseReason::ConnectRefused
            | CloseReason::AppendFailed => return None,
            _ if will => CONNECTION_LOST,
            _ => return None,
        };
        Some(PresenceEvent::Disconnected {
            reason: reason.into(),
        })
    }

    /// Hands the appender a presence record. It owes no acknowledgement,
    /// but takes its place in the queue like any record.
    fn report_presence(&mut self, event: PresenceEvent, at: i64, out: &mut Vec<Action>) {
        let Some(p) = &self.presence else { return };
        let record = Presence {
            device_id: p.device_id.clone(),
            fleet: p.fleet.clone(),
            client_id: p.client_id.clone(),
            at,
            event,
        };
        let token = self.next_token;
        self.next_token += 1;
        self.pending.push_back(Pending {
            ack: None,
            durable: false,
        });
        out.push(Action::Append(Append {
            token,
            partition_key: record.device_id.clone(),
            data: record.encode(),
            verdict: Verdict::Presence,
            tap: None,
        }));
    }

    /// Whose presence a connection reports: the device its will topic
    /// (`dt/{fleet}/{device}/...`) names, if it may publish as that device;
    /// else its identity (username or certificate CN), else its client id.
    /// None when that is no valid device id.
    fn presence_of(&self, principal: &Principal, will_topic: Option<&str>) -> Option<PresenceOf> {
        if !self.config.presence {
            return None;
        }
        let will = will_topic.is_some();
        let client_id = crate::record::clip_key(&principal.client_id);
        if let Some(t) = will_topic.and_then(will_device)
            && self.config.authorizer.may_publish(principal, &t)
        {
            return Some(PresenceOf {
                device_id: t.device_id.to_string(),
                fleet: Some(t.fleet.to_string()),
                client_id,
                will,
            });
        }
        let device = principal
            .identity
            .as_deref()
            .unwrap_or(&principal.client_id);
        check_id("device_id", device).ok()?;
        Some(PresenceOf {
            device_id: device.to_string(),
            fleet: None,
            client_id,
            will,
        })
    }

    fn connect(&mut self, c: ConnectPacket, out: &mut Vec<Action>) {
        self.protocol = Some(c.protocol);
        let mut assigned = None;
        let client_id = if c.client_id.is_empty() {
            // 3.1.1 lets a server name only a client that keeps no session.
            if c.protocol == Protocol::V4 && !c.clean_start {
                return self.refuse_connect(ConnAckCode::BadClientId, out);
            }
            let id = format!("iotpipe-auto-{}", self.conn_id);
            assigned = (c.protocol == Protocol::V5).then(|| id.clone());
            id
        } else {
            c.client_id
        };
        let info = ConnectInfo {
            client_id: &client_id,
            username: c.username.as_deref(),
            password: c.password.as_deref().map(str::as_bytes),
            certificate: self.certificate.as_ref().map(|c| c.device.as_str()),
            certificate_role: self.certificate.as_ref().map_or(Role::Device, |c| c.role),
        };
        let principal = match self.config.authorizer.authenticate(&info) {
            Ok(p) => p,
            Err(ConnectRefusal::BadCredentials) => {
                return self.refuse_connect(ConnAckCode::BadCredentials, out);
            }
            Err(ConnectRefusal::NotAuthorized) => {
                return self.refuse_connect(ConnAckCode::NotAuthorized, out);
            }
        };
        let max = self.config.max_keepalive_secs;
        let keepalive = match c.keepalive_secs {
            0 => max,
            k => k.min(max),
        };
        out.push(Action::Connected {
            client_id: principal.client_id.clone(),
            keepalive: Duration::from_secs(u64::from(keepalive)),
            max_packet_size: c.max_packet_size,
        });
        out.push(Action::Send(Outbound::ConnAck(ConnAck {
            code: ConnAckCode::Accepted,
            assigned_client_id: assigned,
            server_keepalive: (keepalive != c.keepalive_secs).then_some(keepalive),
            receive_max: u16::try_from(self.config.max_inflight).unwrap_or(u16::MAX),
            max_packet_size: u32::try_from(self.config.max_packet_bytes).unwrap_or(u32::MAX),
        })));
        self.presence = self.presence_of(&principal, c.will_topic.as_deref());
        self.state = State::Connected(principal);
        self.report_presence(PresenceEvent::Connected, self.last_ms, out);
    }

    fn refuse_connect(&mut self, code: ConnAckCode, out: &mut Vec<Action>) {
        out.push(Action::Send(Outbound::ConnAck(ConnAck {
            code,
            assigned_client_id: None,
            server_keepalive: None,
            receive_max: 0,
            max_packet_size: 0,
        })));
        self.close(CloseReason::ConnectRefused, out);
    }

    fn publish(&mut self, p: PublishPacket, now_ms: i64, out: &mut Vec<Action>) {
        let v5 = self.protocol == Some(Protocol::V5);
        if p.qos > 1 {
            return self.close(CloseReason::QoS2, out);
        }
        if v5 && p.topic_alias {
            return self.close(CloseReason::TopicAliasInvalid, out);
        }
        // The CONNACK told MQTT 5 clients there is no retain; 3.1.1 clients
        // were told nothing, and their flag is ignored.
        if v5 && p.retain {
            return self.close(CloseReason::RetainNotSupported, out);
        }
        let State::Connected(principal) = &self.state else {
            return;
        };
        let authorizer = &self.config.authorizer;
        let Built {
            partition_key,
            data,
            verdict,
            tap,
        } = record::build(
            p.topic,
            p.payload,
            &principal.client_id,
            |topic| authorizer.may_publish(principal, topic),
            now_ms,
            &self.config.lateness,
        );
        if let (Verdict::Accepted { .. }, Some((topic, _)), Some(p)) =
            (verdict, &tap, &mut self.presence)
            && p.fleet.is_none()
            && let Ok(t) = Topic::parse(topic)
            && t.device_id == p.device_id
        {
            p.fleet = Some(t.fleet.to_string());
        }
        let ack_reason = match verdict {
            Verdict::Accepted { .. } | Verdict::Presence => PubAckReason::Success,
            Verdict::Rejected(RejectReason::BadTopic) => PubAckReason::TopicNameInvalid,
            Verdict::Rejected(RejectReason::Unauthorized) => PubAckReason::NotAuthorized,
            Verdict::Rejected(_) => PubAckReason::PayloadFormatInvalid,
        };
        let token = self.next_token;
        self.next_token += 1;
        self.pending.push_back(Pending {
            ack: (p.qos == 1).then_some((p.pkid, ack_reason)),
            durable: false,
        });
        out.push(Action::Append(Append {
            token,
            partition_key,
            data,
            verdict,
            tap,
        }));
        // 3.1.1 has no way to refuse one PUBLISH: the refusal is recorded and
        // the connection closed, as IoT Core does.
        if !v5 && verdict == Verdict::Rejected(RejectReason::Unauthorized) {
            self.close(CloseReason::Unauthorized, out);
        }
    }

    /// Grants or refuses each filter on its own, as both protocols allow: a
    /// filter the policy does not allow is refused (0x80 in 3.1.1, 0x87 Not
    /// authorized in 5) and the connection stays open.
    fn subscribe(&mut self, s: SubscribePacket, out: &mut Vec<Action>) {
        let State::Connected(principal) = &self.state else {
            return;
        };
        let mut granted = Vec::new();
        let mut refused = Vec::new();
        let codes = s
            .filters
            .into_iter()
            .map(|f| {
                let code = if s.subscription_id {
                    SubCode::SubscriptionIdsNotSupported
                } else if f.starts_with("$share/") {
                    SubCode::SharedNotSupported
                } else if !valid_filter(&f) {
                    SubCode::FilterInvalid
                } else if !self.config.authorizer.may_subscribe(principal, &f) {
                    SubCode::NotAuthorized
                } else {
                    SubCode::GrantedQos0
                };
                match code.refusal() {
                    None => granted.push(f),
                    Some(why) => refused.push((f, why)),
                }
                code
            })
            .collect();
        if !refused.is_empty() {
            out.push(Action::SubscribeRefused {
                identity: principal.identity.clone(),
                refused,
            });
        }
        if !granted.is_empty() {
            out.push(Action::Subscribe(granted));
        }
        out.push(Action::Send(Outbound::SubAck {
            pkid: s.pkid,
            codes,
        }));
    }
}

/// The device a will topic names, if it is `dt/{fleet}/{device}/...` with
/// valid ids (the suffix is the device's to choose, `status` say).
fn will_device(topic: &str) -> Option<Topic<'_>> {
    let mut parts = topic.split('/');
    let (Some("dt"), Some(fleet), Some(device_id), Some(_)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    (check_id("fleet", fleet).is_ok() && check_id("device_id", device_id).is_ok())
        .then_some(Topic { fleet, device_id })
}

#[cfg(test)]
mod tests;
