//! The connection task: the only code that touches a client's socket.
//!
//! It reads bytes, frames and decodes packets, feeds them to the [`Session`]
//! and carries out the actions it returns: appends go to the appender in one
//! request per read, answers are gathered and written in one write per wake.
//! Everything that can wake it is one arm of one `select!`.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use stream::PutRecord;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep, sleep_until, timeout};

use super::Shared;
use super::appender::{AppendItem, AppendRequest};
use super::codec::{self, Outbound, Protocol};
use super::mailbox::{Completion, Mailbox, Reasons};
use super::session::{Action, CloseReason, Session, Verdict};
use super::tap::TapMessage;
use crate::metrics::{add, bump};
use crate::tls::Certified;

/// Bytes asked of the socket per read at first. A quiet device's packets are
/// a few hundred bytes, and a fleet holds tens of thousands of connections:
/// a large first buffer each would be most of the endpoint's memory. A read
/// that fills what it was offered doubles the offer, up to [`MAX_READ_CHUNK`],
/// so a chatty connection still reads many packets per call. Packets larger
/// than the offer grow the buffer as their header announces.
const MIN_READ_CHUNK: usize = 2 * 1024;
const MAX_READ_CHUNK: usize = 64 * 1024;
/// Live-tap messages written per wake at most, so a busy tap cannot starve
/// acknowledgements.
const TAP_BATCH: usize = 256;

/// What can wake a connection.
enum Wake {
    Shutdown,
    Kicked,
    Durable,
    Read(std::io::Result<usize>),
    Tap(TapMessage),
    Deadline,
}

/// A connection over `S`: a TCP stream, or a TLS stream over one.
pub(crate) struct Connection<S> {
    socket: S,
    conn_id: u64,
    shared: Arc<Shared>,
    session: Session,
    rbuf: BytesMut,
    /// Spare room offered to the next read: see [`MIN_READ_CHUNK`].
    read_chunk: usize,
    wbuf: BytesMut,
    actions: Vec<Action>,
    /// This connection's live-tap queue, made on its first SUBSCRIBE; the
    /// sender is registered with the hub. Devices never subscribe: a queue
    /// each (a block of slots allocated up front) was about 2 KiB of every
    /// connection, and polling it was part of every wake.
    tap: Option<(mpsc::Sender<TapMessage>, mpsc::Receiver<TapMessage>)>,
    /// Where the appender reports what became of this connection's records
    /// (it rides in every append request), and where a kick or a shutdown
    /// arrives.
    mailbox: Arc<Mailbox>,
    /// The reasons waited for: a kick and a shutdown are each dealt with
    /// once.
    listening: Reasons,
    /// Outcomes taken from the mailbox; kept so that its vectors' capacity
    /// serves every delivery.
    outcomes: Completion,
    /// The client id this connection holds in the registry, once connected.
    client_id: Option<String>,
    keepalive: Option<Duration>,
    /// MQTT 5: the largest packet the client takes.
    client_max_packet: Option<u32>,
    /// When the client last sent anything (or last had a record settled, so
    /// that time spent paused on back-pressure is not held against it).
    last_heard: Instant,
    started: Instant,
    /// Fires at or before the silence deadline; moved only when it fires
    /// early, so that reads do not re-arm a timer each time.
    silence: std::pin::Pin<Box<Sleep>>,
    /// Shutdown was requested: read nothing more, settle what is in flight.
    draining: bool,
    closing: Option<CloseReason>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Connection<S> {
    /// `certificate`: who a verified TLS client certificate names.
    pub fn new(
        socket: S,
        conn_id: u64,
        shared: Arc<Shared>,
        certificate: Option<Certified>,
        started: Instant,
        mailbox: Arc<Mailbox>,
    ) -> Self {
        let session = Session::new(shared.session.clone(), conn_id).with_certificate(certificate);
        let now = Instant::now();
        // The connect timeout counts from accept, TLS handshake included.
        let silence = Box::pin(sleep_until(started + shared.config.connect_timeout));
        Connection {
            socket,
            conn_id,
            shared,
            session,
            rbuf: BytesMut::new(),
            read_chunk: MIN_READ_CHUNK,
            // Grown by the first answer (a CONNACK, then a few PUBACKs).
            wbuf: BytesMut::new(),
            actions: Vec::new(),
            tap: None,
            mailbox,
            listening: Reasons::DURABLE
                .with(Reasons::KICKED)
                .with(Reasons::SHUTDOWN),
            outcomes: Completion::default(),
            client_id: None,
            keepalive: None,
            client_max_packet: None,
            last_heard: now,
            started,
            silence,
            draining: false,
            closing: None,
        }
    }

    /// Serves the connection until it closes, and hands back its socket for
    /// the caller to close (see [`super::closer`]).
    pub async fn run(mut self) -> S {
        loop {
            self.read_packets();
            self.dispatch();
            self.flush().await;
            if self.closing.is_some() {
                break;
            }
            if self.draining && self.session.inflight() == 0 {
                self.session
                    .close(CloseReason::ServerShutdown, &mut self.actions);
                self.dispatch();
                self.flush().await;
                break;
            }
            let reading = !self.draining && self.session.wants_input();
            let wake = tokio::select! {
                biased;
                raised = self.mailbox.wait(self.listening) => if raised.contains(Reasons::SHUTDOWN) {
                    Wake::Shutdown
                } else if raised.contains(Reasons::KICKED) {
                    Wake::Kicked
                } else {
                    Wake::Durable
                },
                r = read_some(&mut self.socket, &mut self.rbuf, self.read_chunk), if reading => Wake::Read(r),
                Some(m) = tapped(&mut self.tap) => Wake::Tap(m),
                _ = &mut self.silence, if reading => Wake::Deadline,
            };
            match wake {
                Wake::Shutdown => {
                    self.listening = self.listening.without(Reasons::SHUTDOWN);
                    self.draining = true;
                }
                Wake::Kicked => {
                    self.listening = self.listening.without(Reasons::KICKED);
                    self.session
                        .close(CloseReason::TakenOver, &mut self.actions);
                }
                Wake::Durable => {
                    self.settle();
                    self.last_heard = Instant::now();
                }
                Wake::Read(Ok(0)) | Wake::Read(Err(_)) => {
                    self.session
                        .close(CloseReason::SocketClosed, &mut self.actions);
                }
                Wake::Read(Ok(n)) => {
                    add(&self.shared.metrics.bytes_in, n as u64);
                    self.read_chunk = next_read_chunk(self.read_chunk, n);
                    self.last_heard = Instant::now();
                }
                Wake::Tap(m) => {
                    self.write_tap(m);
                    for _ in 1..TAP_BATCH {
                        let Some(Ok(m)) = self.tap.as_mut().map(|(_, rx)| rx.try_recv()) else {
                            break;
                        };
                        self.write_tap(m);
                    }
                }
                Wake::Deadline => {
                    let deadline = self.deadline();
                    if Instant::now() >= deadline {
                        let reason = match self.keepalive {
                            Some(_) => CloseReason::KeepaliveTimeout,
                            None => CloseReason::ProtocolError("no CONNECT in time".into()),
                        };
                        self.session.close(reason, &mut self.actions);
                    } else {
                        self.silence.as_mut().reset(deadline);
                    }
                }
            }
        }
        self.cleanup();
        self.socket
    }

    /// When silence becomes a reason to close: the connect timeout until
    /// CONNECT, then 1.5 × keepalive.
    fn deadline(&self) -> Instant {
        match self.keepalive {
            Some(k) => self.last_heard + k + k / 2,
            None => self.started + self.shared.config.connect_timeout,
        }
    }

    /// Decodes buffered packets while the session takes input.
    fn read_packets(&mut self) {
        let max = self.shared.config.max_packet_bytes;
        let now_ms = (self.shared.config.now_ms)();
        while !self.draining && self.session.wants_input() {
            let frame = match codec::next_frame(&mut self.rbuf, max) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    self.session.refuse(e, &mut self.actions);
                    break;
                }
            };
            let decoded = match self.session.protocol() {
                Some(p) => codec::decode(p, frame),
                None => codec::connect_protocol(&frame).and_then(|p| codec::decode(p, frame)),
            };
            match decoded {
                Ok(packet) => {
                    if matches!(packet, codec::Inbound::Publish(_)) {
                        bump(&self.shared.metrics.messages_in);
                    }
                    self.session.receive(packet, now_ms, &mut self.actions);
                }
                Err(e) => self.session.refuse(e, &mut self.actions),
            }
        }
    }

    fn settle(&mut self) {
        self.mailbox.take(&mut self.outcomes);
        for &token in &self.outcomes.stored {
            self.session.durable(token, true, &mut self.actions);
        }
        for &token in &self.outcomes.failed {
            self.session.durable(token, false, &mut self.actions);
        }
    }

    /// Carries out the session's actions.
    fn dispatch(&mut self) {
        let protocol = self.session.protocol().unwrap_or(Protocol::V4);
        let mut items = Vec::new();
        let metrics = &self.shared.metrics;
        for action in self.actions.drain(..) {
            match action {
                Action::Send(packet) => {
                    if matches!(packet, Outbound::PubAck { .. }) {
                        bump(&metrics.acks_sent);
                    }
                    codec::encode(protocol, packet, &mut self.wbuf);
                }
                Action::Append(a) => {
                    match a.verdict {
                        Verdict::Accepted { readings } => {
                            bump(&metrics.messages_accepted);
                            add(&metrics.readings_accepted, readings as u64);
                        }
                        Verdict::Rejected(reason) => metrics.reject(reason),
                        Verdict::Presence => {}
                    }
                    let tap = a.tap.filter(|_| self.shared.tap.has_subscribers()).map(
                        |(topic, payload)| TapMessage {
                            topic: Bytes::from(topic),
                            payload,
                        },
                    );
                    items.push(AppendItem {
                        token: a.token,
                        record: PutRecord {
                            partition_key: a.partition_key,
                            data: Bytes::from(a.data),
                        },
                        tap,
                    });
                }
                Action::Connected {
                    client_id,
                    keepalive,
                    max_packet_size,
                } => {
                    self.shared
                        .registry
                        .claim(&client_id, self.conn_id, self.mailbox.clone());
                    self.client_id = Some(client_id);
                    self.keepalive = Some(keepalive);
                    self.client_max_packet = max_packet_size;
                    self.last_heard = Instant::now();
                    let k = keepalive;
                    self.silence.as_mut().reset(self.last_heard + k + k / 2);
                }
                Action::Subscribe(filters) => {
                    let queue = self.shared.config.tap_queue.max(1);
                    let (tx, _) = self.tap.get_or_insert_with(|| mpsc::channel(queue));
                    self.shared.tap.subscribe(self.conn_id, filters, tx)
                }
                Action::SubscribeRefused { identity, refused } => {
                    for (filter, reason) in refused {
                        metrics.refuse_subscription(reason);
                        tracing::info!(
                            conn = self.conn_id,
                            client_id = self.client_id.as_deref().unwrap_or_default(),
                            identity = identity.as_deref().unwrap_or_default(),
                            %filter,
                            %reason,
                            "A subscription was refused."
                        );
                    }
                }
                Action::Unsubscribe(filters) => self.shared.tap.unsubscribe(self.conn_id, &filters),
                Action::Close(reason) => {
                    count_close(&reason, metrics);
                    tracing::debug!(conn = self.conn_id, client_id = ?self.client_id, ?reason, "Closing the connection.");
                    self.closing = Some(reason);
                }
            }
        }
        if !items.is_empty() {
            let request = AppendRequest {
                items,
                reply: self.mailbox.clone(),
            };
            if self.shared.appender.send(request).is_err() {
                // The appender is gone: nothing more can become durable.
                self.session
                    .close(CloseReason::AppendFailed, &mut self.actions);
                self.dispatch();
            }
        }
    }

    fn write_tap(&mut self, m: TapMessage) {
        let protocol = self.session.protocol().unwrap_or(Protocol::V4);
        if let Some(max) = self.client_max_packet
            && codec::publish_size(protocol, &m.topic, &m.payload) > max as usize
        {
            bump(&self.shared.metrics.tap_dropped);
            return;
        }
        codec::encode(
            protocol,
            Outbound::Publish {
                topic: m.topic,
                payload: m.payload,
            },
            &mut self.wbuf,
        );
    }

    /// Writes everything queued in one write. A client that does not take it
    /// within `write_timeout` is dropped.
    async fn flush(&mut self) {
        if self.wbuf.is_empty() {
            return;
        }
        let write = timeout(
            self.shared.config.write_timeout,
            self.socket.write_all(&self.wbuf),
        )
        .await;
        self.wbuf.clear();
        let failed = match write {
            Ok(Ok(())) => return,
            Ok(Err(_)) => CloseReason::SocketClosed,
            Err(_) => CloseReason::WriteStalled,
        };
        if self.closing.is_none() {
            self.session.close(failed, &mut self.actions);
            self.dispatch();
            // Whatever the close queued cannot be written either.
            self.wbuf.clear();
        }
    }

    fn cleanup(&mut self) {
        if let Some(id) = &self.client_id {
            self.shared.registry.release(id, self.conn_id);
        }
        self.shared.tap.remove(self.conn_id);
    }
}

fn count_close(reason: &CloseReason, metrics: &crate::IngestMetrics) {
    let counter = match reason {
        CloseReason::ConnectRefused => &metrics.connects_refused,
        CloseReason::TakenOver => &metrics.takeovers,
        CloseReason::KeepaliveTimeout => &metrics.keepalive_timeouts,
        CloseReason::TooLarge => &metrics.refused_too_large,
        CloseReason::QoS2 => &metrics.refused_qos2,
        CloseReason::ProtocolError(_)
        | CloseReason::Malformed(_)
        | CloseReason::TopicAliasInvalid
        | CloseReason::RetainNotSupported => &metrics.protocol_errors,
        _ => return,
    };
    bump(counter);
}

/// What the next read is offered after a read of `n` bytes was offered
/// `chunk`: twice as much if it filled the offer, up to [`MAX_READ_CHUNK`].
fn next_read_chunk(chunk: usize, n: usize) -> usize {
    if n >= chunk {
        (chunk * 2).min(MAX_READ_CHUNK)
    } else {
        chunk
    }
}

/// Reads what the socket has, up to `chunk` bytes beyond what is buffered.
async fn read_some<S: AsyncRead + Unpin>(
    socket: &mut S,
    buf: &mut BytesMut,
    chunk: usize,
) -> std::io::Result<usize> {
    buf.reserve(chunk);
    // `read_buf` fills all the spare capacity, which after a reclaim may be
    // far more than `chunk`: offer exactly `chunk`, so that the doubling
    // above sees a full read as one.
    let mut limited = (&mut *buf).limit(chunk);
    socket.read_buf(&mut limited).await
}

/// The next live-tap message; never, for a connection that has not
/// subscribed.
async fn tapped(
    tap: &mut Option<(mpsc::Sender<TapMessage>, mpsc::Receiver<TapMessage>)>,
) -> Option<TapMessage> {
    match tap {
        Some((_, rx)) => rx.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_that_fills_its_offer_doubles_the_next_up_to_the_most() {
        assert_eq!(next_read_chunk(MIN_READ_CHUNK, 300), MIN_READ_CHUNK);
        assert_eq!(
            next_read_chunk(MIN_READ_CHUNK, MIN_READ_CHUNK),
            2 * MIN_READ_CHUNK
        );
        let mut chunk = MIN_READ_CHUNK;
        for _ in 0..10 {
            chunk = next_read_chunk(chunk, chunk);
        }
        assert_eq!(chunk, MAX_READ_CHUNK);
        // A quiet spell does not shrink it: the buffer is already there.
        assert_eq!(next_read_chunk(MAX_READ_CHUNK, 10), MAX_READ_CHUNK);
    }
}
