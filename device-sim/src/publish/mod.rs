//! Publishing: one MQTT connection per device, each device publishing its
//! schedule, and the fleet's counters and PUBACK latencies.
//!
//! - [`device`]: one device's connection and outbox.
//! - [`Fleet`]: connects every device (at `--connect-rate`), then runs the
//!   schedule and collects the outcome.

pub mod device;

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use rumqttc::{MqttOptions, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::BrokerAddr;
use crate::lateness::Exceptions;
use crate::plan::{RunPlan, SendKind};
use device::{ConnectionConfig, DeviceCounters, DeviceShared};

/// Largest MQTT packet either way: above the pipeline's 128 KiB payload limit
/// so that the pipeline, not the client, judges size.
const MAX_PACKET: usize = 256 * 1024;

/// State every device of the fleet writes to.
#[derive(Debug)]
pub struct FleetShared {
    /// PUBACK latency in µs, from the PUBLISH being written to its PUBACK.
    latency: Mutex<Histogram<u64>>,
    /// Telemetry messages handed to their connections, for the progress line.
    pub issued: AtomicU64,
    /// Telemetry messages acknowledged (or written, at QoS 0).
    pub completed: AtomicU64,
}

impl FleetShared {
    fn new() -> anyhow::Result<Self> {
        Ok(FleetShared {
            latency: Mutex::new(Histogram::new_with_bounds(1, 3_600_000_000, 3)?),
            issued: AtomicU64::new(0),
            completed: AtomicU64::new(0),
        })
    }

    pub fn record_latency(&self, d: Duration) {
        let us = (d.as_micros() as u64).clamp(1, 3_600_000_000);
        let mut h = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        let _ = h.record(us);
    }
}

/// Spaces connection attempts across the fleet, so that thousands of
/// devices do not storm the broker at once.
#[derive(Debug)]
pub struct ConnectLimiter {
    interval: Option<Duration>,
    next: Mutex<Instant>,
}

impl ConnectLimiter {
    pub fn new(per_second: Option<f64>) -> Self {
        ConnectLimiter {
            interval: per_second
                .filter(|r| *r > 0.0)
                .map(|r| Duration::from_secs_f64(1.0 / r)),
            next: Mutex::new(Instant::now()),
        }
    }

    pub async fn acquire(&self) {
        let Some(interval) = self.interval else {
            return;
        };
        let slot = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let slot = (*next).max(Instant::now());
            *next = slot + interval;
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

/// How to reach the broker and publish.
#[derive(Debug, Clone)]
pub struct PublishConfig {
    pub broker: BrokerAddr,
    pub qos: QoS,
    /// New connections per second across the fleet; `None`: as fast as possible.
    pub connect_rate: Option<f64>,
    /// How long to wait for outstanding PUBACKs after the last send.
    pub ack_timeout: Duration,
    /// How long to wait for every device's first CONNACK.
    pub connect_timeout: Duration,
}

/// What publishing a run did.
#[derive(Debug)]
pub struct PublishOutcome {
    /// The plan as run: its `run_start_ms` is set.
    pub plan: RunPlan,
    pub counters: DeviceCounters,
    pub exceptions: Exceptions,
    pub latency: Histogram<u64>,
    /// The time the schedule took: its planned length (the most messages a
    /// device sends, times the period) plus how late its last send went out.
    pub publish_window: Duration,
    /// From the schedule's start to the last PUBACK (or the ack timeout).
    pub elapsed: Duration,
    /// Devices that had not connected when the schedule started.
    pub not_connected: u32,
}

/// A connected fleet, ready to run its schedule.
#[derive(Debug)]
pub struct Fleet {
    devices: Vec<(Arc<DeviceShared>, JoinHandle<()>)>,
    shared: Arc<FleetShared>,
    not_connected: u32,
}

impl Fleet {
    /// Connects every device of `plan` (one connection each, client id =
    /// device id) and waits for their CONNACKs.
    pub async fn connect(
        plan: &RunPlan,
        first_seq: &[u64],
        cfg: &PublishConfig,
        allowed_lateness_ms: i64,
        skew_ms: i64,
    ) -> anyhow::Result<Fleet> {
        let shared = Arc::new(FleetShared::new()?);
        let limiter = Arc::new(ConnectLimiter::new(cfg.connect_rate));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut devices = Vec::with_capacity(plan.devices as usize);
        for index in 0..plan.devices {
            let mut options = MqttOptions::new(
                plan.device_id(index),
                cfg.broker.host.clone(),
                cfg.broker.port,
            );
            options
                .set_keep_alive(Duration::from_secs(30))
                .set_clean_session(true)
                .set_max_packet_size(MAX_PACKET, MAX_PACKET);
            let conn = ConnectionConfig {
                options,
                qos: cfg.qos,
                skew_ms,
                allowed_lateness_ms,
            };
            let first = first_seq.get(index as usize).copied().unwrap_or(0);
            devices.push(device::spawn(
                plan,
                index,
                first,
                conn,
                shared.clone(),
                limiter.clone(),
                tx.clone(),
            ));
        }
        drop(tx);
        let deadline = Instant::now() + cfg.connect_timeout;
        let mut connected = 0u32;
        while connected < plan.devices {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(_)) => connected += 1,
                Ok(None) | Err(_) => break,
            }
        }
        if connected == 0 && plan.devices > 0 {
            let err = devices[0].0.lock().counters.last_error.clone();
            for (d, task) in &devices {
                d.lock().close();
                task.abort();
            }
            bail!(
                "no device could connect to {} within {:?}: {}",
                cfg.broker,
                cfg.connect_timeout,
                err.unwrap_or_else(|| "no answer".into())
            );
        }
        Ok(Fleet {
            devices,
            shared,
            not_connected: plan.devices - connected,
        })
    }

    /// Runs the schedule: `plan.run_start_ms` is set to now (plus a moment to
    /// spawn the publishers), `before_start` sees the final plan (the ledger
    /// records it), then every device publishes its sends on time and waits
    /// for its PUBACKs.
    pub async fn run(
        self,
        mut plan: RunPlan,
        first_seq: &[u64],
        messages: &[u64],
        ack_timeout: Duration,
        progress: bool,
        before_start: impl FnOnce(&RunPlan) -> anyhow::Result<()>,
    ) -> anyhow::Result<PublishOutcome> {
        let origin = Instant::now();
        let origin_ms = crate::now_ms();
        plan.run_start_ms = origin_ms + 100;
        before_start(&plan)?;
        let plan = Arc::new(plan);
        let mut publishers = Vec::with_capacity(self.devices.len());
        for (index, (device, _)) in self.devices.iter().enumerate() {
            let index = index as u32;
            let first = first_seq.get(index as usize).copied().unwrap_or(0);
            let count = messages.get(index as usize).copied().unwrap_or(0);
            publishers.push(tokio::spawn(publish_device(
                device.clone(),
                self.shared.clone(),
                plan.clone(),
                DeviceSchedule {
                    index,
                    first_seq: first,
                    messages: count,
                },
                (origin, origin_ms),
                ack_timeout,
            )));
        }
        let total: u64 = messages.iter().sum();
        let (stop_progress, progress_task) = if progress {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let task = tokio::spawn(show_progress(self.shared.clone(), total, origin, rx));
            (Some(tx), Some(task))
        } else {
            (None, None)
        };
        let mut final_lag = Duration::ZERO;
        for p in publishers {
            final_lag = final_lag.max(p.await.context("a device's publisher panicked")?);
        }
        let elapsed = origin.elapsed().saturating_sub(Duration::from_millis(100));
        if let (Some(stop), Some(task)) = (stop_progress, progress_task) {
            let _ = stop.send(());
            let _ = task.await;
        }
        let mut counters = DeviceCounters::default();
        let mut exceptions = Exceptions::default();
        for (device, task) in self.devices {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                // The connection did not close in time; its outcome is
                // already recorded.
                abort.abort();
            }
            let mut outbox = device.lock();
            add_counters(&mut counters, &outbox.counters);
            exceptions.merge(std::mem::take(&mut outbox.exceptions));
        }
        let latency = self
            .shared
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let longest = messages.iter().copied().max().unwrap_or(0);
        let publish_window =
            Duration::from_micros(plan.period_us.saturating_mul(longest)) + final_lag;
        Ok(PublishOutcome {
            plan: Arc::unwrap_or_clone(plan),
            counters,
            exceptions,
            latency,
            publish_window,
            elapsed,
            not_connected: self.not_connected,
        })
    }
}

/// Which device, and its part of the run.
#[derive(Debug, Clone, Copy)]
struct DeviceSchedule {
    index: u32,
    first_seq: u64,
    messages: u64,
}

/// One device's schedule; returns how late its last send was handed over.
async fn publish_device(
    device: Arc<DeviceShared>,
    fleet: Arc<FleetShared>,
    plan: Arc<RunPlan>,
    sched: DeviceSchedule,
    (origin, origin_ms): (Instant, i64),
    ack_timeout: Duration,
) -> Duration {
    let mut lag = Duration::ZERO;
    let sends = plan.sends(sched.index, sched.first_seq, sched.messages);
    for (sid, send) in sends.enumerate() {
        let offset_us = (send.due_us - origin_ms * 1000).max(0) as u64;
        let due = origin + Duration::from_micros(offset_us);
        tokio::time::sleep_until(due).await;
        if matches!(send.kind, SendKind::Telemetry(_)) {
            fleet.issued.fetch_add(1, Ordering::Relaxed);
        }
        device.lock().start(sid as u64, send, crate::now_ms());
        lag = Instant::now().saturating_duration_since(due);
    }
    let deadline = Instant::now() + ack_timeout;
    loop {
        {
            let mut outbox = device.lock();
            outbox.issue_retries();
            if outbox.is_done() {
                break;
            }
        }
        if tokio::time::timeout_at(deadline, device.progress.notified())
            .await
            .is_err()
        {
            break;
        }
    }
    device.lock().close();
    lag
}

/// A live line on stdout, redrawn every second, until `stop` fires.
async fn show_progress(
    fleet: Arc<FleetShared>,
    total: u64,
    origin: Instant,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let line = format!(
                    "\r{:>7.1} s  sent {}/{}  acked {}  ",
                    origin.elapsed().as_secs_f64(),
                    fleet.issued.load(Ordering::Relaxed),
                    total,
                    fleet.completed.load(Ordering::Relaxed),
                );
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(line.as_bytes()).and_then(|()| out.flush());
            }
            _ = &mut stop => {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(b"\r\x1b[2K").and_then(|()| out.flush());
                return;
            }
        }
    }
}

fn add_counters(total: &mut DeviceCounters, c: &DeviceCounters) {
    total.issued += c.issued;
    total.completed += c.completed;
    total.telemetry_completed += c.telemetry_completed;
    total.readings_issued += c.readings_issued;
    total.duplicates_issued += c.duplicates_issued;
    total.malformed_issued += c.malformed_issued;
    total.retransmissions += c.retransmissions;
    total.retransmitted_readings += c.retransmitted_readings;
    total.retransmitted_malformed += c.retransmitted_malformed;
    total.reconnects += c.reconnects;
    total.failed += c.failed;
    total.max_lag_ms = total.max_lag_ms.max(c.max_lag_ms);
    total.behind += c.behind;
    if total.last_error.is_none() {
        total.last_error.clone_from(&c.last_error);
    }
}

/// Maps the CLI's QoS number to rumqttc's.
pub fn qos(level: u8) -> anyhow::Result<QoS> {
    match level {
        0 => Ok(QoS::AtMostOnce),
        1 => Ok(QoS::AtLeastOnce),
        n => bail!("QoS {n} is not supported: the pipeline speaks QoS 0 and 1"),
    }
}
