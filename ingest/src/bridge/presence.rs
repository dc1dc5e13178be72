//! Device presence through an external broker. The broker sees devices
//! connect and disconnect and the bridge does not, so devices say it on a
//! status topic of their own, `dt/{fleet}/{device}/status`:
//!
//! - `online`, published right after connecting;
//! - `offline` as the connection's Last Will, which the broker publishes
//!   when the connection is lost without a DISCONNECT;
//! - `offline` published before a clean DISCONNECT (which discards the will).
//!
//! The bridge subscribes to [`STATUS_FILTER`] and turns each message into the
//! presence record the endpoint writes for a connect or a disconnect, at the
//! time the bridge received it, keyed by the device and naming its fleet. So
//! a device's `status` and `last_seen` read the same whichever way it
//! reaches iotpipe. `offline` carries the reason
//! [`STATUS_OFFLINE`](schemas::presence::STATUS_OFFLINE): the bridge cannot
//! tell a will from the device's own word.
//!
//! The broker authenticates and authorizes: its ACL must let a device
//! publish only its own status topic, as only its own telemetry (Mosquitto:
//! `pattern write dt/+/%u/status`), since the bridge does not know who
//! published.
//!
//! A retained status message comes again with every SUBSCRIBE, long after it
//! was sent, with no time on it: taken then, it would turn a device that has
//! since gone back online. The bridge takes only live deliveries and
//! acknowledges retained copies without a record, so devices may retain
//! their status for other subscribers or not. A payload other than `online`
//! or `offline` is a dead letter, as a malformed telemetry message is.

use schemas::presence::STATUS_OFFLINE;
use schemas::topic::check_id;
use schemas::{Presence, PresenceEvent, RejectReason, Rejection};

use crate::record::{self, Built, Verdict};

/// The topic filter of every device's status.
pub const STATUS_FILTER: &str = "dt/+/+/status";

/// Whether `topic` is a status topic (`dt/{fleet}/{device}/status`), valid
/// ids or not.
pub fn is_status_topic(topic: &str) -> bool {
    let mut parts = topic.split('/');
    matches!(
        (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next()
        ),
        (Some("dt"), Some(_), Some(_), Some("status"), None)
    )
}

/// The record of a status message `payload` on `topic`, received at
/// `now_ms`; `None` for a retained copy, which has none. `publisher` names
/// the bridge in dead letters.
pub fn build(
    topic: String,
    payload: bytes::Bytes,
    retained: bool,
    publisher: &str,
    now_ms: i64,
) -> Option<Built> {
    if retained {
        return None;
    }
    let refuse = |reason, detail: String, key: String| {
        let rejection = Rejection::new(reason, detail);
        record::dead_letter(&topic, &payload, publisher, now_ms, rejection, key)
    };
    let mut parts = topic.split('/').skip(1);
    let (Some(fleet), Some(device)) = (parts.next(), parts.next()) else {
        let detail = "not a status topic dt/{fleet}/{device_id}/status".to_string();
        return Some(refuse(
            RejectReason::BadTopic,
            detail,
            record::clip_key(publisher),
        ));
    };
    if let Err(detail) = check_id("fleet", fleet).and(check_id("device_id", device)) {
        let key = record::clip_key(publisher);
        return Some(refuse(RejectReason::BadTopic, detail, key));
    }
    let event = match &payload[..] {
        b"online" => PresenceEvent::Connected,
        b"offline" => PresenceEvent::Disconnected {
            reason: STATUS_OFFLINE.into(),
        },
        _ => {
            let detail = "a status message is `online` or `offline`".to_string();
            return Some(refuse(RejectReason::Schema, detail, device.to_string()));
        }
    };
    let presence = Presence {
        device_id: device.to_string(),
        fleet: Some(fleet.to_string()),
        // The broker does not say which client published; by the convention
        // a device publishes only its own status.
        client_id: device.to_string(),
        at: now_ms,
        event,
    };
    Some(Built {
        partition_key: presence.device_id.clone(),
        data: presence.encode(),
        verdict: Verdict::Presence,
        tap: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use schemas::StreamRecord;

    fn status(topic: &str, payload: &'static str) -> Option<Built> {
        build(topic.into(), Bytes::from(payload), false, "bridge", 7)
    }

    fn presence(b: &Built) -> Presence {
        match schemas::decode_record(&b.data) {
            Ok(StreamRecord::Presence(p)) => p,
            other => panic!("not presence: {other:?}"),
        }
    }

    #[test]
    fn online_and_offline_are_a_connect_and_a_disconnect_of_the_device() {
        let b = status("dt/f/dev-1/status", "online").unwrap();
        assert_eq!(
            (b.partition_key.as_str(), b.verdict),
            ("dev-1", Verdict::Presence)
        );
        let p = presence(&b);
        assert_eq!(p.event, PresenceEvent::Connected);
        assert_eq!((p.fleet.as_deref(), p.at), (Some("f"), 7));
        let p = presence(&status("dt/f/dev-1/status", "offline").unwrap());
        assert!(p.event.is_offline());
        assert_eq!(
            p.event,
            PresenceEvent::Disconnected {
                reason: STATUS_OFFLINE.into()
            }
        );
        assert_eq!(p.device_id, "dev-1");
    }

    #[test]
    fn a_retained_status_has_no_record() {
        let b = build(
            "dt/f/dev-1/status".into(),
            Bytes::from("online"),
            true,
            "bridge",
            7,
        );
        assert_eq!(b, None);
    }

    #[test]
    fn other_payloads_and_bad_ids_are_dead_letters() {
        let b = status("dt/f/dev-1/status", "Online ").unwrap();
        assert_eq!(b.verdict, Verdict::Rejected(RejectReason::Schema));
        assert_eq!(b.partition_key, "dev-1");
        let long = format!("dt/f/{}/status", "d".repeat(65));
        let b = status(&long, "offline").unwrap();
        assert_eq!(b.verdict, Verdict::Rejected(RejectReason::BadTopic));
        assert_eq!(b.partition_key, "bridge");
        let Ok(StreamRecord::Rejected(m)) = schemas::decode_record(&b.data) else {
            panic!("not a dead letter");
        };
        assert_eq!(m.client_id, "bridge");
    }

    #[test]
    fn status_topics_are_told_from_others() {
        assert!(is_status_topic("dt/f/d/status"));
        assert!(
            is_status_topic("dt/f/+/status"),
            "judged by build, not here"
        );
        for other in [
            "dt/f/d/telemetry",
            "dt/f/status",
            "dt/f/d/status/x",
            "x/f/d/status",
        ] {
            assert!(!is_status_topic(other), "{other}");
        }
    }
}
