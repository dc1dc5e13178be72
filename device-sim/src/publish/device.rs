//! One simulated device: its MQTT connection and what it has in flight.
//!
//! Two tasks share an [`Outbox`]: the publisher hands sends to the rumqttc
//! client on schedule, and the connection task drives rumqttc's event loop,
//! matching each written PUBLISH (rumqttc reports only its packet id) to the
//! oldest send handed over, and each PUBACK to the send under that id.
//!
//! After a connection error the connection is rebuilt with a fresh client
//! and channel, and every send not yet acknowledged is published again:
//! delivery is at-least-once, and the pipeline removes the duplicates by seq.
//! A fresh channel (rather than rumqttc's own resend) keeps the match between
//! sends and packet ids exact: nothing from the old connection can arrive
//! out of order.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use super::{ConnectLimiter, FleetShared};
use crate::lateness::{Class, Exceptions};
use crate::payload::{DeviceValues, malformed};
use crate::plan::{RunPlan, Send, SendKind};

/// Requests rumqttc may queue between the publisher and its event loop; a
/// full channel means the connection cannot keep up, and the send is retried.
const CHANNEL_CAP: usize = 4096;
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A send not yet completed (acknowledged, or written at QoS 0).
#[derive(Debug)]
struct Pending {
    send: Send,
    /// When the send was first handed to the client: no copy of it can reach
    /// the pipeline earlier, so this bounds `received_at` from below.
    first_issue_ms: i64,
    /// Handed over more than once (after a reconnect).
    retried: bool,
}

/// Counters of one device, summed into the run's summary.
#[derive(Debug, Default, Clone)]
pub struct DeviceCounters {
    /// Distinct sends handed to the client at least once.
    pub issued: u64,
    pub completed: u64,
    pub telemetry_completed: u64,
    pub readings_issued: u64,
    pub duplicates_issued: u64,
    pub malformed_issued: u64,
    /// Sends handed over again after a reconnect.
    pub retransmissions: u64,
    /// Readings in retransmitted sends: each may reach the pipeline twice.
    pub retransmitted_readings: u64,
    pub retransmitted_malformed: u64,
    pub reconnects: u64,
    /// Sends never completed by the end of the ack timeout.
    pub failed: u64,
    /// The most a send was handed over after its due time.
    pub max_lag_ms: i64,
    /// Sends handed over more than 100 ms after their due time.
    pub behind: u64,
    pub last_error: Option<String>,
}

/// What a device has handed to rumqttc and not yet seen completed.
#[derive(Debug)]
pub struct Outbox {
    index: u32,
    client: AsyncClient,
    topic: String,
    qos: QoS,
    values: DeviceValues,
    /// Send ids handed to the client whose PUBLISH has not been written yet,
    /// oldest first: rumqttc writes them in this order.
    requested: VecDeque<u64>,
    /// Packet id -> (send id, when that PUBLISH was written).
    inflight: HashMap<u16, (u64, Instant)>,
    pending: BTreeMap<u64, Pending>,
    /// Sends to hand over again, in send order.
    retry: BTreeSet<u64>,
    skew_ms: i64,
    allowed_lateness_ms: i64,
    pub exceptions: Exceptions,
    pub counters: DeviceCounters,
    /// The run is over: connection errors end the connection task.
    closing: bool,
}

impl Outbox {
    fn issue(&mut self, sid: u64) {
        let Some(p) = self.pending.get(&sid) else {
            return;
        };
        let payload = match &p.send.kind {
            SendKind::Telemetry(m) | SendKind::Duplicate(m) => self.values.payload(m),
            SendKind::Malformed { k, first_seq } => malformed(*first_seq + k, p.send.due_us / 1000),
        };
        match self
            .client
            .try_publish(&self.topic, self.qos, false, payload)
        {
            Ok(()) => {
                self.requested.push_back(sid);
                self.retry.remove(&sid);
            }
            Err(e) => {
                self.counters.last_error = Some(format!("publish queue: {e}"));
                self.retry.insert(sid);
            }
        }
    }

    pub fn issue_retries(&mut self) {
        let ids: Vec<u64> = self.retry.iter().copied().collect();
        for sid in ids {
            if let Some(p) = self.pending.get_mut(&sid)
                && !p.retried
            {
                p.retried = true;
                self.counters.retransmissions += 1;
                match &p.send.kind {
                    SendKind::Telemetry(m) | SendKind::Duplicate(m) => {
                        self.counters.retransmitted_readings += m.readings.len() as u64
                    }
                    SendKind::Malformed { .. } => self.counters.retransmitted_malformed += 1,
                }
            }
            self.issue(sid);
            if self.retry.contains(&sid) {
                // The channel is full; keep the order and try later.
                break;
            }
        }
    }

    /// Hands send `sid` to the client for the first time.
    pub fn start(&mut self, sid: u64, send: Send, now_ms: i64) {
        let lag = now_ms - send.due_us.div_euclid(1000);
        self.counters.max_lag_ms = self.counters.max_lag_ms.max(lag);
        if lag > 100 {
            self.counters.behind += 1;
        }
        self.counters.issued += 1;
        match &send.kind {
            SendKind::Telemetry(m) => self.counters.readings_issued += m.readings.len() as u64,
            SendKind::Duplicate(_) => self.counters.duplicates_issued += 1,
            SendKind::Malformed { .. } => self.counters.malformed_issued += 1,
        }
        self.issue_retries();
        self.pending.insert(
            sid,
            Pending {
                send,
                first_issue_ms: now_ms,
                retried: false,
            },
        );
        if self.retry.is_empty() {
            self.issue(sid);
        } else {
            self.retry.insert(sid);
        }
    }

    fn on_written(&mut self, pkid: u16, now_ms: i64, fleet: &FleetShared) {
        let Some(sid) = self.requested.pop_front() else {
            return;
        };
        if self.qos == QoS::AtMostOnce {
            // Written is all QoS 0 promises; the skew margin bounds arrival.
            self.complete(sid, now_ms, fleet);
        } else {
            self.inflight.insert(pkid, (sid, Instant::now()));
        }
    }

    fn on_ack(&mut self, pkid: u16, now_ms: i64, fleet: &FleetShared) {
        if let Some((sid, written)) = self.inflight.remove(&pkid) {
            fleet.record_latency(written.elapsed());
            self.complete(sid, now_ms, fleet);
        }
    }

    fn complete(&mut self, sid: u64, ack_ms: i64, fleet: &FleetShared) {
        let Some(p) = self.pending.remove(&sid) else {
            return;
        };
        self.counters.completed += 1;
        if let SendKind::Telemetry(m) = &p.send.kind {
            self.counters.telemetry_completed += 1;
            fleet.completed.fetch_add(1, Ordering::Relaxed);
            let lo = p.first_issue_ms - self.skew_ms;
            let hi = ack_ms + self.skew_ms;
            self.exceptions
                .record_arrival(self.index, m, lo, hi, self.allowed_lateness_ms);
        }
    }

    /// Replaces a broken connection's client; everything it had not
    /// completed is handed to the new one.
    fn rebuild(&mut self, client: AsyncClient) {
        self.client = client;
        self.retry.extend(self.requested.drain(..));
        self.retry
            .extend(self.inflight.drain().map(|(_, (sid, _))| sid));
        self.counters.reconnects += 1;
        self.issue_retries();
    }

    pub fn is_done(&self) -> bool {
        self.pending.is_empty()
    }

    /// Ends the run for this device: what is still pending has failed, and
    /// its readings may or may not have reached the pipeline.
    pub fn close(&mut self) {
        self.closing = true;
        for p in self.pending.values() {
            self.counters.failed += 1;
            if let SendKind::Telemetry(m) = &p.send.kind {
                for r in &m.readings {
                    self.exceptions
                        .too_late
                        .insert((self.index, r.seq), Class::Maybe);
                }
            }
        }
        self.pending.clear();
        let _ = self.client.try_disconnect();
    }
}

/// The state both tasks of a device share.
#[derive(Debug)]
pub struct DeviceShared {
    outbox: Mutex<Outbox>,
    /// Wakes the publisher when a send completes or the connection is rebuilt.
    pub progress: Notify,
}

impl DeviceShared {
    pub fn lock(&self) -> MutexGuard<'_, Outbox> {
        // A panic while holding the lock would already have failed the run;
        // the data is still consistent enough to report.
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Everything a device's connection task needs to (re)connect.
#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    pub options: MqttOptions,
    pub qos: QoS,
    pub skew_ms: i64,
    pub allowed_lateness_ms: i64,
}

/// Creates device `index`'s outbox and spawns its connection task; the task
/// reports the first CONNACK on `connected`.
pub fn spawn(
    plan: &RunPlan,
    index: u32,
    first_seq: u64,
    cfg: ConnectionConfig,
    fleet: Arc<FleetShared>,
    limiter: Arc<ConnectLimiter>,
    connected: mpsc::UnboundedSender<u32>,
) -> (Arc<DeviceShared>, tokio::task::JoinHandle<()>) {
    let (client, eventloop) = AsyncClient::new(cfg.options.clone(), CHANNEL_CAP);
    let shared = Arc::new(DeviceShared {
        outbox: Mutex::new(Outbox {
            index,
            client,
            topic: plan.topic(index),
            qos: cfg.qos,
            values: DeviceValues::new(plan, index, first_seq),
            requested: VecDeque::new(),
            inflight: HashMap::new(),
            pending: BTreeMap::new(),
            retry: BTreeSet::new(),
            skew_ms: cfg.skew_ms,
            allowed_lateness_ms: cfg.allowed_lateness_ms,
            exceptions: Exceptions::default(),
            counters: DeviceCounters::default(),
            closing: false,
        }),
        progress: Notify::new(),
    });
    let task = tokio::spawn(drive(
        shared.clone(),
        eventloop,
        cfg.options,
        fleet,
        limiter,
        connected,
        index,
    ));
    (shared, task)
}

async fn drive(
    shared: Arc<DeviceShared>,
    mut eventloop: EventLoop,
    options: MqttOptions,
    fleet: Arc<FleetShared>,
    limiter: Arc<ConnectLimiter>,
    connected: mpsc::UnboundedSender<u32>,
    index: u32,
) {
    let mut backoff = Duration::from_millis(100);
    let mut announced = false;
    loop {
        limiter.acquire().await;
        loop {
            let event = eventloop.poll().await;
            let now_ms = crate::now_ms();
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff = Duration::from_millis(100);
                    if !announced {
                        announced = true;
                        let _ = connected.send(index);
                    }
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    shared.lock().on_written(pkid, now_ms, &fleet);
                    shared.progress.notify_one();
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    shared.lock().on_ack(ack.pkid, now_ms, &fleet);
                    shared.progress.notify_one();
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                Ok(_) => {}
                Err(e) => {
                    let mut outbox = shared.lock();
                    if outbox.closing {
                        return;
                    }
                    outbox.counters.last_error = Some(e.to_string());
                    break;
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
        let (client, fresh) = AsyncClient::new(options.clone(), CHANNEL_CAP);
        {
            let mut outbox = shared.lock();
            if outbox.closing {
                return;
            }
            outbox.rebuild(client);
        }
        eventloop = fresh;
        shared.progress.notify_one();
    }
}
