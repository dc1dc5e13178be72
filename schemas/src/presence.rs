//! Presence: a device's connection coming or going, as the endpoint saw it
//! (CONNECT, a clean DISCONNECT, a connection lost with a Last Will) or as
//! AWS IoT Core's lifecycle events report it.
//!
//! A presence record travels the same stream as the device's readings, keyed
//! by its device id, so it lands on the device's partition in order with
//! them, is as durable as they are, and the same processors (local or
//! Lambda) fold it into the device's entry in its fleet.

use serde::{Deserialize, Serialize};

use crate::reading::MAX_TS;
use crate::reject::{RejectReason, Rejection};
use crate::topic::{check_id, clip_to};

/// The longest disconnect reason kept.
pub const MAX_REASON_LEN: usize = 64;

/// One connect or disconnect of a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    pub device_id: String,
    /// The device's fleet when the sender knew it (the will topic, or the
    /// connection's earlier publishes); otherwise the processors take the
    /// fleet from the device's item, as they do for IoT Core's events,
    /// which never name one.
    pub fleet: Option<String>,
    pub client_id: String,
    /// When it happened, ms since the epoch: the endpoint's clock, or IoT
    /// Core's `timestamp`. The latest event wins, whatever the arrival order.
    pub at: i64,
    pub event: PresenceEvent,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PresenceEvent {
    Connected,
    /// `reason`: [`CLEAN_DISCONNECT`], [`CONNECTION_LOST`], or IoT Core's
    /// `disconnectReason`.
    Disconnected {
        reason: String,
    },
}

/// The reason the endpoint gives for a DISCONNECT packet (IoT Core's name).
pub const CLEAN_DISCONNECT: &str = "CLIENT_INITIATED_DISCONNECT";
/// The reason the endpoint gives for a connection lost with a Last Will.
pub const CONNECTION_LOST: &str = "CONNECTION_LOST";
/// The reason the external-broker bridge gives for `offline` on a device's
/// status topic: its Last Will, or its own word before a DISCONNECT, which
/// the broker does not tell apart.
pub const STATUS_OFFLINE: &str = "STATUS_OFFLINE";
/// IoT Core's reason when another connection took the client id over: the
/// device is still connected, on the new connection.
pub const TAKEN_OVER: &str = "DUPLICATE_CLIENTID";

impl PresenceEvent {
    /// Whether the event leaves the device offline. A takeover does not: the
    /// device is connected again, on the connection that took over.
    pub fn is_offline(&self) -> bool {
        match self {
            PresenceEvent::Connected => false,
            PresenceEvent::Disconnected { reason } => reason != TAKEN_OVER,
        }
    }
}

impl Presence {
    /// Checks what a stream may hold written by anyone.
    pub fn validate(&self) -> Result<(), String> {
        check_id("device_id", &self.device_id)?;
        if let Some(fleet) = &self.fleet {
            check_id("fleet", fleet)?;
        }
        if !(0..=MAX_TS).contains(&self.at) {
            return Err(format!("presence time {} out of range", self.at));
        }
        if self.client_id.len() > 256 {
            return Err("client id longer than 256 bytes".into());
        }
        if let PresenceEvent::Disconnected { reason } = &self.event
            && reason.len() > MAX_REASON_LEN
        {
            return Err(format!(
                "disconnect reason longer than {MAX_REASON_LEN} bytes"
            ));
        }
        Ok(())
    }
}

/// IoT Core's connect/disconnect event, as the lifecycle rule forwards it
/// (`SELECT clientId, timestamp, eventType, disconnectReason FROM
/// '$aws/events/presence/+/+'`). Fields IoT Core adds beyond these
/// (`sessionIdentifier`, `principalIdentifier`, `ipAddress`,
/// `versionNumber`, `clientInitiatedDisconnect`, `thingName`, ...) are
/// ignored, so a rule that forwards the whole event is read too.
#[derive(Deserialize)]
struct LifecycleEvent {
    #[serde(rename = "clientId")]
    client_id: String,
    timestamp: i64,
    #[serde(rename = "eventType")]
    event_type: String,
    #[serde(rename = "disconnectReason")]
    disconnect_reason: Option<String>,
}

/// Decodes an IoT Core lifecycle event. Its device is its client id (the
/// template's policy lets a thing connect only as itself); it names no
/// fleet.
pub fn decode_lifecycle_json(bytes: &[u8]) -> Result<Presence, Rejection> {
    let schema = |d: String| Rejection::new(RejectReason::Schema, d);
    let e: LifecycleEvent = serde_json::from_slice(bytes)
        .map_err(|e| schema(format!("IoT Core lifecycle event: {e}")))?;
    let event = match e.event_type.as_str() {
        "connected" => PresenceEvent::Connected,
        "disconnected" => PresenceEvent::Disconnected {
            reason: clip_to(
                e.disconnect_reason.as_deref().unwrap_or(CONNECTION_LOST),
                MAX_REASON_LEN,
            ),
        },
        other => {
            return Err(schema(format!(
                "IoT Core lifecycle event type `{}` is neither `connected` nor `disconnected`",
                clip_to(other, 32)
            )));
        }
    };
    let presence = Presence {
        device_id: e.client_id,
        fleet: None,
        client_id: String::new(),
        at: e.timestamp,
        event,
    };
    presence.validate().map_err(schema)?;
    Ok(Presence {
        client_id: presence.device_id.clone(),
        ..presence
    })
}

/// Whether JSON looks like a lifecycle event rather than a rule record, so
/// that a malformed one is refused for what it is.
pub(crate) fn looks_like_lifecycle(bytes: &[u8]) -> bool {
    bytes.windows(11).any(|w| w == b"\"eventType\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// IoT Core's documented examples, whole.
    const CONNECTED: &str = r#"{
        "clientId": "dev-7",
        "timestamp": 1573002230757,
        "eventType": "connected",
        "sessionIdentifier": "a4666d2a7d844ae4ac5d7b38c9cb7967",
        "principalIdentifier": "12345678901234567890123456789012",
        "ipAddress": "192.0.2.0",
        "versionNumber": 0
    }"#;
    const DISCONNECTED: &str = r#"{
        "clientId": "dev-7",
        "timestamp": 1573002340451,
        "eventType": "disconnected",
        "sessionIdentifier": "a4666d2a7d844ae4ac5d7b38c9cb7967",
        "principalIdentifier": "12345678901234567890123456789012",
        "clientInitiatedDisconnect": true,
        "disconnectReason": "CLIENT_INITIATED_DISCONNECT",
        "versionNumber": 0
    }"#;

    #[test]
    fn lifecycle_events_decode() {
        let c = decode_lifecycle_json(CONNECTED.as_bytes()).unwrap();
        assert_eq!(c.device_id, "dev-7");
        assert_eq!(c.fleet, None);
        assert_eq!(c.at, 1_573_002_230_757);
        assert_eq!(c.event, PresenceEvent::Connected);
        assert!(!c.event.is_offline());
        let d = decode_lifecycle_json(DISCONNECTED.as_bytes()).unwrap();
        assert_eq!(
            d.event,
            PresenceEvent::Disconnected {
                reason: CLEAN_DISCONNECT.into()
            }
        );
        assert!(d.event.is_offline());
        assert!(looks_like_lifecycle(DISCONNECTED.as_bytes()));
    }

    #[test]
    fn a_takeover_is_not_offline() {
        let e = PresenceEvent::Disconnected {
            reason: TAKEN_OVER.into(),
        };
        assert!(!e.is_offline());
    }

    #[test]
    fn malformed_lifecycle_events_are_refused() {
        for bad in [
            r#"{"clientId": "d", "timestamp": 1, "eventType": "subscribed"}"#,
            r#"{"clientId": "d/e", "timestamp": 1, "eventType": "connected"}"#,
            r#"{"clientId": "d", "eventType": "connected"}"#,
            r#"{"clientId": "d", "timestamp": -1, "eventType": "connected"}"#,
            r#"{"clientId": "d", "timestamp": "soon", "eventType": "connected"}"#,
        ] {
            let e = decode_lifecycle_json(bad.as_bytes()).unwrap_err();
            assert_eq!(e.reason, RejectReason::Schema, "{bad}");
        }
    }
}
