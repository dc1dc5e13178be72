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
//! With [`BridgeConfig::presence`] it also subscribes to the devices' status
//! topics and turns each `online` or `offline` into the presence record the
//! endpoint writes for a connect or a disconnect (`presence`).
//!
//! - `config`: the broker URL, the session and the limits.
//! - `presence`: status messages as presence records.
//!
//! **Architecture Invariant:** an acknowledgement goes to the broker only for
//! a message whose record the stream reported stored (or that has no record
//! to store: a retained status message, see `presence`), and only on the
//! connection that delivered it: after a reconnect the broker sends the
//! message again, and that copy is acknowledged instead. An ack for the old
//! delivery could otherwise land on a packet id the broker has since given to
//! another message.

mod config;
pub mod presence;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::mqttbytes::v4::{Packet, Publish};
use rumqttc::{AsyncClient, Event, QoS, SubscribeFilter};
use stream::{PutRecord, StreamProducer};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::{BridgeConfig, BridgeError, DEFAULT_CLIENT_ID, TELEMETRY_FILTER};

use crate::endpoint::appender::{self, AppendItem, AppendRequest};
use crate::endpoint::mailbox::{Completion, Mailbox, Reasons};
use crate::endpoint::tap::TapHub;
use crate::metrics::{IngestMetrics, add, bump};
use crate::record::{self, Verdict};

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
    Durable,
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
    let mut appender = spawn_appender(
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

    // Where the appender reports what became of the bridge's records.
    let done = Mailbox::new();
    let mut bridge = Bridge {
        client: &client,
        connection: &connection,
        metrics: &metrics,
        pending: HashMap::new(),
        latest: HashMap::new(),
        next_token: 0,
        config: &config,
        outcomes: Completion::default(),
    };
    tokio::pin!(shutdown);
    loop {
        let reading = bridge.pending.len() < max_pending;
        let wake = tokio::select! {
            biased;
            _ = &mut shutdown => Wake::Shutdown,
            _ = done.wait(Reasons::DURABLE) => Wake::Durable,
            e = events.recv(), if reading => Wake::Polled(e),
        };
        match wake {
            Wake::Shutdown | Wake::Polled(None) => break,
            Wake::Durable => bridge.settle(&done),
            Wake::Polled(Some((conn, polled))) => {
                let items = bridge.gather(conn, polled, &mut events, max_pending);
                if items.is_empty() {
                    continue;
                }
                let request = AppendRequest {
                    items,
                    reply: done.clone(),
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
    // The appender ends once every request is answered.
    let finished = bridge
        .drain(&done, config.shutdown_timeout, &abandon, &mut appender)
        .await;
    abandon.cancel();
    let finished = match finished {
        Some(r) => r,
        None => appender.await,
    };
    if let Err(e) = finished {
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
    /// Outcomes taken from the mailbox; kept so that its vectors' capacity
    /// serves every delivery, as a connection does.
    outcomes: Completion,
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
    /// then tells the appender to abandon the rest. Returns the appender's
    /// result if it ended meanwhile: it has answered every request then, so
    /// nothing more can settle.
    async fn drain(
        &mut self,
        done: &Mailbox,
        timeout: Duration,
        abandon: &CancellationToken,
        appender: &mut JoinHandle<()>,
    ) -> Option<Result<(), tokio::task::JoinError>> {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.pending.is_empty() {
            tokio::select! {
                _ = done.wait(Reasons::DURABLE) => self.settle(done),
                ended = &mut *appender => {
                    self.settle(done);
                    return Some(ended);
                }
                _ = tokio::time::sleep_until(deadline) => {
                    abandon.cancel();
                    break;
                }
            }
        }
        None
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
                if self.client.try_subscribe_many(self.filters()).is_err() {
                    tracing::warn!("The bridge could not queue its SUBSCRIBE.");
                }
            }
            Polled::Event(Event::Incoming(Packet::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                {
                    tracing::error!(filter = %self.config.topic_filter, presence = self.config.presence, "The broker refused the bridge's subscription.");
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
                match self.append_item(token, p) {
                    Some(item) => items.push(item),
                    // Nothing to store: acknowledged at once.
                    None => self.release(token),
                }
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

    /// The topic filters the bridge subscribes to, at QoS 1.
    fn filters(&self) -> Vec<SubscribeFilter> {
        let mut filters = vec![self.config.topic_filter.clone()];
        if self.config.presence {
            filters.push(presence::STATUS_FILTER.to_string());
        }
        filters
            .into_iter()
            .map(|f| SubscribeFilter::new(f, QoS::AtLeastOnce))
            .collect()
    }

    /// The record of a delivered message; `None` for one that has none.
    fn append_item(&self, token: u64, p: Publish) -> Option<AppendItem> {
        // The broker authenticated the publisher and does not say who it
        // was: the bridge's policy is the broker's, and dead letters name
        // the bridge.
        let (publisher, now_ms) = (&self.config.client_id, (self.config.now_ms)());
        let built = if self.config.presence && presence::is_status_topic(&p.topic) {
            presence::build(p.topic, p.payload, p.retain, publisher, now_ms)?
        } else {
            record::build(
                p.topic,
                p.payload,
                publisher,
                |_| true,
                now_ms,
                &self.config.lateness,
            )
        };
        match built.verdict {
            Verdict::Accepted { readings } => {
                bump(&self.metrics.messages_accepted);
                add(&self.metrics.readings_accepted, readings as u64);
            }
            Verdict::Rejected(reason) => self.metrics.reject(reason),
            Verdict::Presence => {}
        }
        Some(AppendItem {
            token,
            record: PutRecord {
                partition_key: built.partition_key,
                data: Bytes::from(built.data),
            },
            tap: None,
        })
    }

    fn settle(&mut self, done: &Mailbox) {
        let mut c = std::mem::take(&mut self.outcomes);
        done.take(&mut c);
        for &token in &c.stored {
            self.release(token);
        }
        for token in &c.failed {
            // Never acknowledged: the broker keeps it and resends it on the
            // next connection.
            self.pending.remove(token);
        }
        self.outcomes = c;
    }

    /// Acknowledges the delivery `token`, whose record is stored (or which
    /// has none), if its connection is still the current one.
    fn release(&mut self, token: u64) {
        let current = self.connection.load(Ordering::Acquire);
        let Some(d) = self.pending.remove(&token) else {
            return;
        };
        let Some(pkid) = d.pkid else { return };
        if d.connection != current || self.latest.get(&pkid) != Some(&token) {
            // Delivered again on a later connection: that copy acks.
            return;
        }
        self.latest.remove(&pkid);
        let ack = Publish {
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
