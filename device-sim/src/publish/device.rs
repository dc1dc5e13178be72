//! One simulated device: a single task that owns its connection, publishes
//! its schedule and matches PUBACKs.
//!
//! The task is the only code that touches the device's socket; everything
//! it owns is small (a few hundred bytes of buffers, the schedule iterator
//! and the value generators), so that an idle device costs a few KB.
//!
//! Sends wait in `queued` until encoded, then in `inflight` until
//! acknowledged (QoS 1) or written to the socket (QoS 0). After a connection
//! error the device reconnects with backoff and writes everything in flight
//! again, in order, with the DUP flag: delivery is at-least-once, and the
//! pipeline removes the copies by seq.
//!
//! - `send`: queueing, encoding and writing sends.
//! - `link`: the connection lost, dropped, closed and opened again.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::codec::{self, Incoming, Login};
use super::finishing::{Arrival, Finishing};
use super::transport::{self, Stream, TlsSetup};
use super::{ConnectLimiter, FleetShared, PublishConfig};
use crate::freshness::Sample;
use crate::lateness::{Class, Exceptions};
use crate::liveness::Role;
use crate::payload::{DeviceValues, malformed};
use crate::plan::{RunPlan, Send, SendKind};

mod link;
mod send;

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long one connection attempt (TCP, TLS, CONNECT/CONNACK) may take.
const CONNECT_ATTEMPT: Duration = Duration::from_secs(10);
/// A write buffer larger than this is let go once written, so that a burst
/// does not leave every device holding a large buffer.
const KEEP_WBUF: usize = 4096;

/// Counters of one device, summed into the run's summary.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct DeviceCounters {
    /// Distinct sends handed to the connection at least once.
    pub issued: u64,
    pub completed: u64,
    pub telemetry_completed: u64,
    /// Readings in telemetry messages acknowledged (or written, at QoS 0).
    pub readings_completed: u64,
    pub readings_issued: u64,
    pub duplicates_issued: u64,
    pub malformed_issued: u64,
    /// Sends written again after a reconnect.
    pub retransmissions: u64,
    /// Readings in retransmitted sends: each may reach the pipeline twice.
    pub retransmitted_readings: u64,
    pub retransmitted_malformed: u64,
    pub reconnects: u64,
    /// Sends never completed by the end of the ack timeout.
    pub failed: u64,
    /// PUBACKs with an MQTT 5 reason code of 0x80 or more: the broker
    /// refused the message.
    pub refused: u64,
    /// Sends that waited for room in the in-flight window.
    pub window_waits: u64,
    /// The most a send was written after its due time.
    pub max_lag_ms: i64,
    /// Sends written more than 100 ms after their due time (or never
    /// written, and that far behind when the run ended).
    pub behind: u64,
    pub last_error: Option<String>,
}

impl DeviceCounters {
    pub fn add(&mut self, c: &DeviceCounters) {
        self.issued += c.issued;
        self.completed += c.completed;
        self.telemetry_completed += c.telemetry_completed;
        self.readings_completed += c.readings_completed;
        self.readings_issued += c.readings_issued;
        self.duplicates_issued += c.duplicates_issued;
        self.malformed_issued += c.malformed_issued;
        self.retransmissions += c.retransmissions;
        self.retransmitted_readings += c.retransmitted_readings;
        self.retransmitted_malformed += c.retransmitted_malformed;
        self.reconnects += c.reconnects;
        self.failed += c.failed;
        self.refused += c.refused;
        self.window_waits += c.window_waits;
        self.max_lag_ms = self.max_lag_ms.max(c.max_lag_ms);
        self.behind += c.behind;
        if self.last_error.is_none() {
            self.last_error.clone_from(&c.last_error);
        }
    }
}

/// What a device's task hands back at the end.
#[derive(Debug, Default)]
pub struct DeviceOutcome {
    pub counters: DeviceCounters,
    pub exceptions: Exceptions,
    /// When its first telemetry message was first written: where the
    /// achieved rate's time starts.
    pub first_publish: Option<Instant>,
    /// When its last telemetry message was acknowledged (QoS 1) or written
    /// (QoS 0): where the achieved rate's time ends.
    pub last_done: Option<Instant>,
}

impl DeviceOutcome {
    /// Adds another device's outcome to this one: a fleet's, or a run's.
    pub fn merge(&mut self, o: DeviceOutcome) {
        self.counters.add(&o.counters);
        self.exceptions.merge(o.exceptions);
        self.first_publish = super::earliest(self.first_publish, o.first_publish);
        self.last_done = self.last_done.max(o.last_done);
    }
}

/// Everything the devices of one fleet share.
#[derive(Debug)]
pub struct DeviceEnv {
    /// How to reach the broker and publish, as the fleet was given it.
    pub cfg: PublishConfig,
    /// The fleet's plan before it starts: what the devices are, and the
    /// bounds on when the pipeline stamps a message (`clock_skew_ms`,
    /// `arrival_slack_ms`, `allowed_lateness_ms`).
    pub plan: Arc<RunPlan>,
    /// The broker's address, resolved once for the fleet.
    pub broker: SocketAddr,
    /// Further brokers' addresses: the fleet is spread round-robin over
    /// `broker` and these.
    pub more_brokers: Vec<SocketAddr>,
    /// The broker's host name, for TLS's server name check.
    pub server_name: Option<ServerName<'static>>,
    pub tls: Option<TlsSetup>,
    /// Source addresses, device `i` using `source[i % len]`; empty: the
    /// system's choice.
    pub source: Vec<IpAddr>,
    pub limiter: Arc<ConnectLimiter>,
    pub shared: Arc<FleetShared>,
    /// Sampled publishes for the freshness probe; `None`: not measured.
    pub freshness: Option<(u64, mpsc::Sender<Sample>)>,
    /// Each device's liveness role; empty: every device stays.
    pub roles: Vec<Role>,
    /// With `--hold-connections`: where finished devices wait for the rest.
    pub finishing: Option<Arc<Finishing>>,
}

impl DeviceEnv {
    fn qos1(&self) -> bool {
        self.cfg.qos == 1
    }

    /// The broker device `index` connects to.
    fn broker_of(&self, index: u32) -> SocketAddr {
        match index as usize % (1 + self.more_brokers.len()) {
            0 => self.broker,
            k => self.more_brokers.get(k - 1).copied().unwrap_or(self.broker),
        }
    }
}

/// A send not yet completed.
#[derive(Debug)]
struct Pending {
    send: Send,
    /// When the send was first written: no copy of it can reach the
    /// pipeline earlier, so this bounds `received_at` from below.
    first_write_ms: i64,
    /// Packet id and write time of the current copy, once written.
    pkid: u16,
    written_at: Option<Instant>,
    /// Written more than once (after a reconnect).
    retried: bool,
    /// The freshness sample this send carries, offered to the probe once
    /// the send's fate is known (see [`Device::offer_sample`]).
    sample: Option<Sample>,
}

/// Why a device's connection ended.
#[derive(Debug)]
enum Lost {
    Io(std::io::Error),
    Protocol(String),
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lost::Io(e) => write!(f, "{e}"),
            Lost::Protocol(s) => f.write_str(s),
        }
    }
}

/// The connection's state.
#[derive(Debug)]
enum Link {
    Up(Stream),
    /// Reconnect at this time; `bypass` skips the fleet's connect limiter
    /// (a reconnect storm comes back all at once).
    Down {
        retry_at: Instant,
        bypass: bool,
    },
    /// Offline on purpose until told otherwise.
    Offline,
}

struct Device {
    env: Arc<DeviceEnv>,
    index: u32,
    /// Whether it leaves mid-run, and how (see [`crate::liveness`]).
    role: Role,
    device_id: String,
    topic: String,
    values: DeviceValues,
    link: Link,
    backoff: Duration,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// Sends not yet written, in send order.
    queued: VecDeque<Pending>,
    /// Sends written and awaiting their PUBACK, in write order.
    inflight: VecDeque<Pending>,
    next_pkid: u16,
    /// The current connection's limit on `inflight`.
    inflight_cap: usize,
    /// When the connection must next show life (a PINGREQ if nothing else).
    ping_at: Instant,
    counters: DeviceCounters,
    exceptions: Exceptions,
    /// Whether this device has announced its first connection.
    announced: Option<mpsc::UnboundedSender<u32>>,
    /// Sends handed over so far: the freshness sample is every n-th.
    sent_telemetry: u64,
    /// Where this device's freshness samples fall within each `every`
    /// sends, so that the fleet's samples spread over time.
    sample_offset: u64,
    /// The newest reading ts this device has written.
    newest_ts: i64,
    /// A sample is due, waiting for a message newer than `newest_ts`.
    sample_wanted: bool,
    /// The schedule's clock: an instant and the wall-clock µs it stands
    /// for, set when the run starts (due times are wall-clock µs).
    schedule_origin: Option<(Instant, i64)>,
    /// Lags behind due time (µs) not yet handed to the fleet's histogram:
    /// batched, so that publishing takes the shared lock rarely.
    lags: Vec<u64>,
    first_publish: Option<Instant>,
    last_done: Option<Instant>,
}

/// Lags a device collects before recording them in the fleet's histogram.
const LAG_BATCH: usize = 64;

/// Runs device `index`: connects, waits for the plan on `start`, publishes
/// its schedule and waits for its PUBACKs.
pub async fn run(
    env: Arc<DeviceEnv>,
    index: u32,
    first_seq: u64,
    messages: u64,
    mut start: watch::Receiver<Option<Arc<RunPlan>>>,
    connected: mpsc::UnboundedSender<u32>,
) -> DeviceOutcome {
    let mut arrival = Arrival::new(env.finishing.clone());
    let mut dev = Device::new(env, index, first_seq, connected);

    // Until the run starts: stay connected.
    let plan = loop {
        if let Some(p) = start.borrow_and_update().clone() {
            break p;
        }
        tokio::select! {
            changed = start.changed() => {
                if changed.is_err() {
                    // The run was called off before it started.
                    dev.close().await;
                    return dev.outcome();
                }
            }
            () = dev.serve(None, false) => {}
        }
    };

    let mut sends = plan.sends(index, first_seq, messages).peekable();
    let offline = plan.offline_windows(index);
    let storms = plan.storm_times(index);
    let (mut next_offline, mut next_storm) = (0usize, 0usize);
    // A device that leaves does nothing more once its messages are sent.
    let leaves_at = plan.leaves_at_us(dev.role);
    let origin = (Instant::now(), crate::now_us());
    dev.schedule_origin = Some(origin);
    let at = |us: i64| {
        let ahead = (us - origin.1).max(0) as u64;
        origin.0 + Duration::from_micros(ahead)
    };
    loop {
        let send_due = sends.peek().map(|s| s.due_us);
        let offline_due = offline.get(next_offline).map(|w| w.0);
        let storm_due = storms.get(next_storm).copied();
        let Some(due) = [send_due, offline_due, storm_due]
            .into_iter()
            .flatten()
            .min()
        else {
            break;
        };
        if leaves_at.is_some_and(|t| due >= t) {
            break;
        }
        dev.serve(Some(at(due)), false).await;
        if storm_due == Some(due) {
            next_storm += 1;
            dev.drop_link(true);
        } else if offline_due == Some(due) {
            let (_, end, _) = offline[next_offline];
            next_offline += 1;
            dev.go_offline().await;
            dev.serve(Some(at(end)), false).await;
            dev.link = Link::Down {
                retry_at: Instant::now(),
                bypass: false,
            };
        } else if let Some(send) = sends.next() {
            dev.submit(send);
        }
    }
    let deadline = Instant::now() + dev.env.cfg.ack_timeout;
    dev.serve(Some(deadline), true).await;
    if leaves_at.is_some() {
        drop(arrival);
        dev.leave();
    } else {
        if let Some(finishing) = arrival.arrive() {
            // Still answering pings and reading whatever the broker sends.
            tokio::select! {
                () = finishing.released() => {}
                () = dev.serve(None, false) => {}
            }
        }
        dev.close().await;
    }
    dev.outcome()
}

impl Device {
    /// Device `index` of the fleet's plan, not yet connected; it tells
    /// `connected` when it first is.
    fn new(
        env: Arc<DeviceEnv>,
        index: u32,
        first_seq: u64,
        connected: mpsc::UnboundedSender<u32>,
    ) -> Device {
        let plan = &env.plan;
        let max_inflight = env.cfg.max_inflight.max(1);
        let mut dev = Device {
            device_id: plan.device_id(index),
            topic: plan.topic(index),
            values: DeviceValues::new(plan, index, first_seq),
            role: env
                .roles
                .get(index as usize)
                .copied()
                .unwrap_or(Role::Stays),
            env,
            index,
            link: Link::Down {
                retry_at: Instant::now(),
                bypass: false,
            },
            backoff: MIN_BACKOFF,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            queued: VecDeque::new(),
            inflight: VecDeque::new(),
            next_pkid: 1,
            inflight_cap: max_inflight,
            ping_at: Instant::now(),
            counters: DeviceCounters::default(),
            exceptions: Exceptions::default(),
            announced: Some(connected),
            sent_telemetry: 0,
            sample_offset: 0,
            newest_ts: i64::MIN,
            sample_wanted: false,
            schedule_origin: None,
            lags: Vec::new(),
            first_publish: None,
            last_done: None,
        };
        if let Some((every, _)) = &dev.env.freshness {
            // A multiplicative hash spreads the devices' offsets over the
            // whole interval, rather than bunching them at its start.
            dev.sample_offset =
                u64::from(index).wrapping_mul(0x9E37_79B9_7F4A_7C15) % (*every).max(1);
        }
        dev
    }

    fn outcome(mut self) -> DeviceOutcome {
        self.env.shared.record_lags(&self.lags);
        self.lags.clear();
        DeviceOutcome {
            counters: self.counters,
            exceptions: self.exceptions,
            first_publish: self.first_publish,
            last_done: self.last_done,
        }
    }

    /// How far behind its due time a send is at `now`, in µs.
    fn lag_us(&self, due_us: i64, now: Instant) -> u64 {
        let Some((at, at_us)) = self.schedule_origin else {
            return 0;
        };
        let due = at + Duration::from_micros((due_us - at_us).max(0) as u64);
        now.saturating_duration_since(due).as_micros() as u64
    }

    fn note_lag(&mut self, lag_us: u64) {
        let lag_ms = (lag_us / 1000) as i64;
        self.counters.max_lag_ms = self.counters.max_lag_ms.max(lag_ms);
        if lag_ms > 100 {
            self.counters.behind += 1;
        }
        self.lags.push(lag_us);
        if self.lags.len() >= LAG_BATCH {
            self.env.shared.record_lags(&self.lags);
            self.lags.clear();
        }
    }

    fn drained(&self) -> bool {
        self.queued.is_empty() && self.inflight.is_empty()
    }

    /// Keeps the connection going (reading acks, pinging, reconnecting)
    /// until `until` (or forever), or with `drain` until nothing is pending.
    async fn serve(&mut self, until: Option<Instant>, drain: bool) {
        loop {
            if until.is_some_and(|u| Instant::now() >= u) || (drain && self.drained()) {
                return;
            }
            match &mut self.link {
                Link::Offline => match until {
                    Some(u) => return tokio::time::sleep_until(u).await,
                    None => return std::future::pending().await,
                },
                Link::Down { retry_at, bypass } => {
                    let (retry_at, bypass) = (*retry_at, *bypass);
                    if let Some(u) = until
                        && u < retry_at
                    {
                        return tokio::time::sleep_until(u).await;
                    }
                    tokio::time::sleep_until(retry_at).await;
                    if !bypass {
                        self.env.limiter.acquire().await;
                    }
                    self.reconnect().await;
                }
                Link::Up(stream) => {
                    let wake = match until {
                        Some(u) => u.min(self.ping_at),
                        None => self.ping_at,
                    };
                    let read = tokio::select! {
                        r = stream.read_buf(&mut self.rbuf) => Some(r),
                        () = tokio::time::sleep_until(wake) => None,
                    };
                    match read {
                        Some(Ok(0)) => {
                            self.lost(Lost::Protocol("the broker closed the connection".into()))
                        }
                        Some(Ok(_)) => {
                            if let Err(e) = self.on_bytes() {
                                self.lost(e);
                            } else {
                                self.flush().await;
                            }
                        }
                        Some(Err(e)) => self.lost(Lost::Io(e)),
                        None => {
                            if !self.wbuf.is_empty() {
                                // What a synchronous write left behind.
                                self.flush().await;
                            } else if Instant::now() >= self.ping_at {
                                codec::pingreq(&mut self.wbuf);
                                self.flush().await;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Handles every whole packet in the read buffer.
    fn on_bytes(&mut self) -> Result<(), Lost> {
        loop {
            let packet = codec::decode(self.env.cfg.protocol, &mut self.rbuf)
                .map_err(|e| Lost::Protocol(e.to_string()))?;
            match packet {
                None => return Ok(()),
                Some(Incoming::PubAck { pkid, reason }) => self.on_ack(pkid, reason),
                Some(Incoming::Disconnect { reason }) => {
                    return Err(Lost::Protocol(format!("the broker disconnected: {reason}")));
                }
                Some(_) => {}
            }
        }
    }

    fn on_ack(&mut self, pkid: u16, reason: u8) {
        // PUBACKs come in order, so the match is almost always the oldest.
        let Some(pos) = self.inflight.iter().position(|p| p.pkid == pkid) else {
            return;
        };
        let Some(p) = self.inflight.remove(pos) else {
            return;
        };
        if let Some(written) = p.written_at {
            self.env.shared.record_latency(written.elapsed());
        }
        if reason >= 0x80 {
            self.counters.refused += 1;
            self.env.shared.refused.fetch_add(1, Ordering::Relaxed);
            self.counters.last_error = Some(format!("PUBACK reason code {reason:#04x}"));
        }
        self.complete(p, crate::now_ms());
    }

    fn complete(&mut self, mut p: Pending, done_ms: i64) {
        self.offer_sample(p.sample.take());
        self.counters.completed += 1;
        if let SendKind::Telemetry(m) = &p.send.kind {
            self.counters.telemetry_completed += 1;
            self.env.shared.completed.fetch_add(1, Ordering::Relaxed);
            let plan = &self.env.plan;
            let lo = p.first_write_ms - plan.clock_skew_ms;
            let hi = done_ms + plan.clock_skew_ms + plan.arrival_slack_ms;
            self.exceptions
                .record_arrival(self.index, m, lo, hi, plan.allowed_lateness_ms);
            self.counters.readings_completed += m.readings.len() as u64;
            self.last_done = Some(Instant::now());
        }
    }
}
