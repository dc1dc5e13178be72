//! A harness for fuzzing what a client's bytes can reach: framing, both
//! protocols' decoders, and the session they feed. Pure, so a fuzzer can
//! run it millions of times; the fuzz target lives in `ingest/fuzz/`.

use std::sync::Arc;

use bytes::BytesMut;

use super::codec::{self, Protocol};
use super::session::{Action, Session, SessionConfig};
use crate::auth::AllowAll;

/// Feeds `data` to a fresh session as one connection's byte stream, and
/// each frame to both decoders. Also encodes every answer, since an answer
/// built from hostile input must encode too. Panics only on a bug.
pub fn feed(data: &[u8]) {
    let Some((&knob, data)) = data.split_first() else {
        return;
    };
    // A small packet limit sometimes, so the oversize path is reached.
    let max = if knob & 1 == 0 { 1 << 17 } else { 64 };
    let config = Arc::new(SessionConfig {
        max_inflight: 8,
        max_packet_bytes: max,
        max_keepalive_secs: 60,
        authorizer: Arc::new(AllowAll),
        lateness: crate::LatenessConfig::default(),
        presence: true,
    });
    let mut session = Session::new(config, 1);
    let mut buf = BytesMut::from(data);
    let mut actions = Vec::new();
    let mut out = BytesMut::new();
    while !session.is_closed() {
        let frame = match codec::next_frame(&mut buf, max) {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(e) => {
                session.refuse(e, &mut actions);
                break;
            }
        };
        let _ = codec::decode(Protocol::V4, frame.clone());
        let _ = codec::decode(Protocol::V5, frame.clone());
        let decoded = match session.protocol() {
            Some(p) => codec::decode(p, frame),
            None => codec::connect_protocol(&frame).and_then(|p| codec::decode(p, frame)),
        };
        match decoded {
            Ok(packet) => session.receive(packet, 0, &mut actions),
            Err(e) => session.refuse(e, &mut actions),
        }
        let protocol = session.protocol().unwrap_or(Protocol::V4);
        let mut tokens = Vec::new();
        for action in actions.drain(..) {
            match action {
                Action::Send(packet) => codec::encode(protocol, packet, &mut out),
                Action::Append(a) => tokens.push(a.token),
                _ => {}
            }
        }
        // Settle every record, stored or not by the knob, so that the
        // acknowledgement path runs as well.
        for token in tokens {
            session.durable(token, knob & 2 == 0, &mut actions);
        }
        for action in actions.drain(..) {
            if let Action::Send(packet) = action {
                codec::encode(protocol, packet, &mut out);
            }
        }
        out.clear();
    }
}
