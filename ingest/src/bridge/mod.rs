//! External broker mode: subscribe to an MQTT broker that devices publish to,
//! and acknowledge each message to the broker only once it is durable in the
//! stream.
//!
//! The bridge holds a persistent session (clean session off, a fixed client
//! id) subscribed to `dt/+/+/telemetry` at QoS 1, with manual acks. A broker
//! keeps every message of such a session until it is acknowledged, and sends
//! the unacknowledged ones again when the session reconnects, so a crash of
//! iotpipe loses nothing: what was durable may arrive twice (the processors
//! absorb duplicates), what was not is delivered again.
//!
//! Messages are judged and packed exactly as the endpoint does (`record`),
//! and group-committed through the same appender: many messages are in flight
//! at once, bounded by the broker's per-client in-flight limit (Mosquitto's
//! `max_inflight_messages`) and by [`BridgeConfig::max_pending`].
//!
//! **Architecture Invariant:** an acknowledgement goes to the broker only for
//! a message whose record the stream reported stored, and only on the
//! connection that delivered it: after a reconnect the broker sends the
//! message again, and that copy is acknowledged instead. An ack for the old
//! delivery could otherwise land on a packet id the broker has since given to
//! another message.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::mqttbytes::v4::Packet;
use rumqttc::{AsyncClient, Event, MqttOptions, QoS};
use stream::{PutRecord, StreamProducer};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Clock, GroupCommit, wall_clock};
use crate::endpoint::appender::{self, AppendItem, AppendRequest, Completion};
use crate::endpoint::tap::TapHub;
use crate::metrics::{IngestMetrics, add, bump};
use crate::record::{self, Verdict};

/// The topic filter the bridge subscribes to: every device's telemetry.
pub const TELEMETRY_FILTER: &str = "dt/+/+/telemetry";

/// How the bridge reaches the broker and commits what it receives. Build with
/// [`BridgeConfig::new`] and override fields.
#[derive(Clone)]
pub struct BridgeConfig {
    pub host: String,
    pub port: u16,
    /// Names the persistent session at the broker. It must be fixed across
    /// restarts (the broker keeps unacknowledged messages under it) and used
    /// by one bridge at a time (a second one takes the session over).
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// TLS to the broker (`mqtts://`); `None` for plain TCP.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub topic_filter: String,
    pub keepalive: Duration,
    /// Messages received and not yet acknowledged, at most; beyond it the
    /// bridge stops reading from the broker until appends complete. The
    /// broker's in-flight limit is usually the tighter bound.
    pub max_pending: usize,
    /// Group commit, as in [`crate::EndpointConfig`]. The bridge keeps a
    /// 2 ms cadence where the endpoint puts at once: its one connection has
    /// the broker's whole in-flight window, so latency buys it little, while
    /// bigger batches keep the processors ahead. `scripts/bench`, Mosquitto
    /// at QoS 1: 30,143 msgs/s sustained at 2 ms, 24,326 at 0.
    pub group_commit: GroupCommit,
    /// Waits between reconnect attempts, doubling from min to max.
    pub reconnect_backoff_min: Duration,
    pub reconnect_backoff_max: Duration,
    /// After shutdown is requested, how long appends in flight may take;
    /// what is not durable by then stays unacknowledged (the broker keeps it).
    pub shutdown_timeout: Duration,
    /// Stamps `received_at`.
    pub now_ms: Clock,
    pub lateness: crate::LatenessConfig,
}

impl std::fmt::Debug for BridgeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BridgeConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("tls", &self.tls.is_some())
            .field("topic_filter", &self.topic_filter)
            .field("max_pending", &self.max_pending)
            .field("group_commit", &self.group_commit)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("invalid broker URL `{url}`: {detail}")]
    BadUrl { url: String, detail: String },
}

/// The default session name; see [`BridgeConfig::client_id`].
pub const DEFAULT_CLIENT_ID: &str = "iotpipe-bridge";

impl BridgeConfig {
    /// A bridge to `url`: `mqtt://HOST[:PORT]` (default port 1883) or
    /// `mqtts://HOST[:PORT]` (8883; set [`tls`](Self::tls) too).
    pub fn new(url: &str) -> Result<BridgeConfig, BridgeError> {
        let bad = |detail: &str| BridgeError::BadUrl {
            url: url.to_string(),
            detail: detail.to_string(),
        };
        let (rest, default_port) = if let Some(r) = url.strip_prefix("mqtt://") {
            (r, 1883)
        } else if let Some(r) = url.strip_prefix("mqtts://") {
            (r, 8883)
        } else {
            return Err(bad("expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"));
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains(['/', '@', '?']) {
            return Err(bad(
                "only a host and port may follow the scheme (credentials are separate options)",
            ));
        }
        let (host, port) = match rest.rsplit_once(':') {
            // A bracketed IPv6 literal without a port.
            _ if rest.starts_with('[') && rest.ends_with(']') => (rest, default_port),
            Some((h, p)) => (h, p.parse().map_err(|_| bad("the port is not a number"))?),
            None => (rest, default_port),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(BridgeConfig {
            host: host.to_string(),
            port,
            client_id: DEFAULT_CLIENT_ID.to_string(),
            username: None,
            password: None,
            tls: None,
            topic_filter: TELEMETRY_FILTER.to_string(),
            keepalive: Duration::from_secs(30),
            max_pending: 20_000,
            group_commit: GroupCommit {
                commit_interval: Duration::from_millis(2),
                ..GroupCommit::default()
            },
            reconnect_backoff_min: Duration::from_millis(100),
            reconnect_backoff_max: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(10),
            now_ms: wall_clock(),
            lateness: crate::LatenessConfig::default(),
        })
    }

    fn mqtt_options(&self) -> MqttOptions {
        let mut o = MqttOptions::new(&self.client_id, &self.host, self.port);
        o.set_clean_session(false);
        o.set_manual_acks(true);
        o.set_keep_alive(self.keepalive.max(Duration::from_secs(5)));
        // Incoming messages may be as large as the endpoint accepts.
        let max = schemas::reading::MAX_MESSAGE_BYTES + 4096;
        o.set_max_packet_size(max, max);
        if let Some(user) = &self.username {
            o.set_credentials(user, self.password.as_deref().unwrap_or(""));
        }
        if let Some(tls) = &self.tls {
            o.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls.clone()),
            ));
        }
        o
    }
}

/// A message delivered by the broker, waiting for its record to be durable.
#[derive(Debug)]
struct Delivery {
    /// Which connection delivered it; an ack goes out only on that one.
    connection: u64,
    /// QoS 1: the packet id to acknowledge.
    pkid: Option<u16>,
}

/// What the event-loop task reports.
enum Polled {
    Event(Event),
    /// The connection failed; the task waits before reconnecting.
    Failed(String),
}

/// What can wake the bridge.
enum Wake {
    Shutdown,
    Polled(Option<(u64, Polled)>),
    Durable(Completion),
}

/// Runs the bridge until `shutdown` completes: subscribe, append, ack.
///
/// The broker being unreachable is not an error: the bridge keeps trying
/// with backoff (and says so in the log). On shutdown it stops taking
/// messages, lets appends in flight finish (within `shutdown_timeout`), sends
/// their acks and disconnects, keeping the session at the broker.
pub async fn run(
    config: BridgeConfig,
    producer: Arc<dyn StreamProducer>,
    metrics: Arc<IngestMetrics>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let (append_tx, append_rx) = mpsc::unbounded_channel();
    let abandon = CancellationToken::new();
    let appender = spawn_appender(
        &config,
        append_rx,
        producer,
        metrics.clone(),
        abandon.clone(),
    );
    let max_pending = config.max_pending.max(1);
    // Room for one ack per pending message plus the odd subscribe, so that
    // queueing an ack never has to wait for the event loop.
    let (client, eventloop) = AsyncClient::new(config.mqtt_options(), max_pending + 16);
    let connection = Arc::new(AtomicU64::new(0));
    let (events_tx, mut events) = mpsc::channel(1024);
    let poller = spawn_poller(eventloop, events_tx, connection.clone(), &config);
    tracing::info!(broker = %format!("{}:{}", config.host, config.port), client_id = %config.client_id, "The bridge is connecting to the broker.");

    let (done_tx, mut done) = mpsc::unbounded_channel();
    let mut bridge = Bridge {
        client: &client,
        connection: &connection,
        metrics: &metrics,
        pending: HashMap::new(),
        latest: HashMap::new(),
        next_token: 0,
        config: &config,
    };
    tokio::pin!(shutdown);
    loop {
        let reading = bridge.pending.len() < max_pending;
        let wake = tokio::select! {
            biased;
            _ = &mut shutdown => Wake::Shutdown,
            Some(c) = done.recv() => Wake::Durable(c),
            e = events.recv(), if reading => Wake::Polled(e),
        };
        match wake {
            Wake::Shutdown | Wake::Polled(None) => break,
            Wake::Durable(c) => bridge.settle(c),
            Wake::Polled(Some((conn, polled))) => {
                let items = bridge.gather(conn, polled, &mut events, max_pending);
                if items.is_empty() {
                    continue;
                }
                let request = AppendRequest {
                    items,
                    reply: done_tx.clone(),
                };
                if append_tx.send(request).is_err() {
                    tracing::error!("The bridge's appender stopped; the bridge stops.");
                    break;
                }
            }
        }
    }

    // Let what is in flight become durable and acknowledged, then leave the
    // session to the broker.
    tracing::info!(
        pending = bridge.pending.len(),
        "The bridge is shutting down."
    );
    drop(append_tx);
    bridge
        .drain(&mut done, config.shutdown_timeout, &abandon)
        .await;
    // The appender ends once every request is answered.
    drop(done);
    abandon.cancel();
    if let Err(e) = appender.await {
        tracing::error!(error = %e, "The bridge's appender failed.");
    }
    disconnect(&client, &mut events).await;
    poller.abort();
    tracing::info!(
        unacknowledged = bridge.pending.len(),
        "The bridge has stopped."
    );
}

/// The group-commit appender the endpoint uses, with the bridge's limits.
fn spawn_appender(
    config: &BridgeConfig,
    requests: mpsc::UnboundedReceiver<AppendRequest>,
    producer: Arc<dyn StreamProducer>,
    metrics: Arc<IngestMetrics>,
    abandon: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(appender::run(
        requests,
        producer,
        config.group_commit.clone(),
        metrics,
        // The bridge has no live tap of its own: the broker is the place to
        // watch telemetry.
        Arc::new(TapHub::default()),
        abandon,
    ))
}

/// Disconnects, keeping the session at the broker. The acks queued before
/// the DISCONNECT are written with it; the connection is done once the
/// broker has closed it (the event loop reports that as a failure), or after
/// a moment.
async fn disconnect(client: &AsyncClient, events: &mut mpsc::Receiver<(u64, Polled)>) {
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some((_, polled)) = events.recv().await {
            if let Polled::Failed(_) = polled {
                break;
            }
        }
    })
    .await;
}

/// The bridge's state between wakes.
struct Bridge<'a> {
    client: &'a AsyncClient,
    /// The current connection's number, shared with the event-loop task,
    /// which bumps it the moment a connection fails.
    connection: &'a AtomicU64,
    metrics: &'a IngestMetrics,
    /// Messages handed to the appender, by token.
    pending: HashMap<u64, Delivery>,
    /// Packet id → the token of its latest delivery on the current
    /// connection: only that delivery's record may release the ack.
    latest: HashMap<u16, u64>,
    next_token: u64,
    config: &'a BridgeConfig,
}

impl Bridge<'_> {
    /// The append items of a polled event and of whatever else is ready,
    /// so that they join the same request.
    fn gather(
        &mut self,
        conn: u64,
        polled: Polled,
        events: &mut mpsc::Receiver<(u64, Polled)>,
        max_pending: usize,
    ) -> Vec<AppendItem> {
        let mut items = Vec::new();
        self.on_event(conn, polled, &mut items);
        while self.pending.len() < max_pending {
            match events.try_recv() {
                Ok((conn, polled)) => self.on_event(conn, polled, &mut items),
                Err(_) => break,
            }
        }
        items
    }

    /// Settles appends in flight as they complete, for at most `timeout`;
    /// then tells the appender to abandon the rest.
    async fn drain(
        &mut self,
        done: &mut mpsc::UnboundedReceiver<Completion>,
        timeout: Duration,
        abandon: &CancellationToken,
    ) {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.pending.is_empty() {
            tokio::select! {
                c = done.recv() => match c {
                    Some(c) => self.settle(c),
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => {
                    abandon.cancel();
                    break;
                }
            }
        }
    }

    fn on_event(&mut self, conn: u64, polled: Polled, items: &mut Vec<AppendItem>) {
        match polled {
            Polled::Event(Event::Incoming(Packet::ConnAck(ack))) => {
                self.latest.clear();
                bump(&self.metrics.connections_total);
                self.metrics.connections_current.store(1, Ordering::Relaxed);
                tracing::info!(
                    session_present = ack.session_present,
                    "The bridge is connected to the broker."
                );
                // A kept session keeps its subscription; subscribing again
                // is harmless and covers a session the broker lost.
                if self
                    .client
                    .try_subscribe(&self.config.topic_filter, QoS::AtLeastOnce)
                    .is_err()
                {
                    tracing::warn!("The bridge could not queue its SUBSCRIBE.");
                }
            }
            Polled::Event(Event::Incoming(Packet::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                {
                    tracing::error!(filter = %self.config.topic_filter, "The broker refused the bridge's subscription.");
                } else {
                    self.metrics.bridge_subscribed.store(1, Ordering::Relaxed);
                }
            }
            Polled::Event(Event::Incoming(Packet::Publish(p))) => {
                bump(&self.metrics.messages_in);
                let token = self.next_token;
                self.next_token += 1;
                let pkid = (p.qos != QoS::AtMostOnce).then_some(p.pkid);
                if let Some(id) = pkid {
                    self.latest.insert(id, token);
                }
                self.pending.insert(
                    token,
                    Delivery {
                        connection: conn,
                        pkid,
                    },
                );
                items.push(self.append_item(token, p.topic, p.payload));
            }
            Polled::Event(_) => {}
            Polled::Failed(why) => {
                self.latest.clear();
                self.metrics.connections_current.store(0, Ordering::Relaxed);
                self.metrics.bridge_subscribed.store(0, Ordering::Relaxed);
                tracing::warn!(error = %why, pending = self.pending.len(), "The bridge lost the broker; it reconnects, and the broker resends what was not acknowledged.");
            }
        }
    }

    fn append_item(&self, token: u64, topic: String, payload: Bytes) -> AppendItem {
        // The broker authenticated the publisher and does not say who it
        // was: the bridge's policy is the broker's, and dead letters name
        // the bridge.
        let built = record::build(
            topic,
            payload,
            &self.config.client_id,
            |_| true,
            (self.config.now_ms)(),
            &self.config.lateness,
        );
        match built.verdict {
            Verdict::Accepted { readings } => {
                bump(&self.metrics.messages_accepted);
                add(&self.metrics.readings_accepted, readings as u64);
            }
            Verdict::Rejected(reason) => self.metrics.reject(reason),
            Verdict::Presence => {}
        }
        AppendItem {
            token,
            record: PutRecord {
                partition_key: built.partition_key,
                data: Bytes::from(built.data),
            },
            tap: None,
        }
    }

    fn settle(&mut self, c: Completion) {
        let current = self.connection.load(Ordering::Acquire);
        for token in c.stored {
            let Some(d) = self.pending.remove(&token) else {
                continue;
            };
            let Some(pkid) = d.pkid else { continue };
            if d.connection != current || self.latest.get(&pkid) != Some(&token) {
                // Delivered again on a later connection: that copy acks.
                continue;
            }
            self.latest.remove(&pkid);
            let ack = rumqttc::Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: String::new(),
                pkid,
                payload: Bytes::new(),
            };
            if self.client.try_ack(&ack).is_ok() {
                bump(&self.metrics.acks_sent);
            }
        }
        for token in c.failed {
            // Never acknowledged: the broker keeps it and resends it on the
            // next connection.
            self.pending.remove(&token);
        }
    }
}

/// Runs the event loop on a task of its own, forwarding events with the
/// number of the connection they came from; on a failure it bumps that
/// number at once and waits with backoff before polling (reconnecting).
fn spawn_poller(
    mut eventloop: rumqttc::EventLoop,
    events: mpsc::Sender<(u64, Polled)>,
    connection: Arc<AtomicU64>,
    config: &BridgeConfig,
) -> JoinHandle<()> {
    let (min, max) = (
        config.reconnect_backoff_min,
        config
            .reconnect_backoff_max
            .max(config.reconnect_backoff_min),
    );
    tokio::spawn(async move {
        let mut backoff = min;
        loop {
            let polled = eventloop.poll().await;
            let conn = connection.load(Ordering::Acquire);
            let failed = match polled {
                Ok(event) => {
                    if matches!(event, Event::Incoming(Packet::ConnAck(_))) {
                        backoff = min;
                    }
                    if events.send((conn, Polled::Event(event))).await.is_err() {
                        return;
                    }
                    continue;
                }
                Err(e) => e,
            };
            // The event loop dropped queued acks with the connection; acks
            // settled from now on belong to a connection that is gone.
            connection.fetch_add(1, Ordering::AcqRel);
            if events
                .send((conn, Polled::Failed(failed.to_string())))
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(max);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let c = BridgeConfig::new("mqtt://127.0.0.1:1884").unwrap();
        assert_eq!((c.host.as_str(), c.port), ("127.0.0.1", 1884));
        let c = BridgeConfig::new("mqtt://broker.local").unwrap();
        assert_eq!((c.host.as_str(), c.port), ("broker.local", 1883));
        let c = BridgeConfig::new("mqtts://[::1]").unwrap();
        assert_eq!((c.host.as_str(), c.port), ("::1", 8883));
        let c = BridgeConfig::new("mqtt://[::1]:2000/").unwrap();
        assert_eq!((c.host.as_str(), c.port), ("::1", 2000));
        for bad in [
            "tcp://h:1",
            "mqtt://",
            "mqtt://h:port",
            "mqtt://u:p@h:1",
            "mqtt://h/x",
        ] {
            assert!(BridgeConfig::new(bad).is_err(), "{bad}");
        }
    }
}
