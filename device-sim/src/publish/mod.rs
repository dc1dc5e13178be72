//! Publishing: one MQTT connection per device, each device a single task
//! publishing its schedule, and the fleet's counters and PUBACK latencies.
//!
//! - [`codec`]: the packets a device writes and reads.
//! - [`transport`]: TCP or TLS from a chosen source address.
//! - [`device`]: one device's task.
//! - [`Fleet`]: connects every device (at `--connect-rate`), starts the
//!   schedule and collects the outcome.

pub mod codec;
pub mod device;
pub mod finishing;
pub mod transport;

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use rustls_pki_types::ServerName;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::BrokerAddr;
use crate::freshness::Sample;
use crate::plan::RunPlan;
use codec::Protocol;
use device::{DeviceEnv, DeviceOutcome};
use transport::{TlsOptions, TlsSetup};

/// State every device of the fleet writes to.
#[derive(Debug)]
pub struct FleetShared {
    /// PUBACK latency in µs, from the PUBLISH being written to its PUBACK,
    /// and per 100 ms of wall-clock time, so that a tail can be placed in
    /// time next to the broker's own events.
    latency: Mutex<(Histogram<u64>, AckTimeline)>,
    /// Every send's lag in µs, from its due time to its first write: how
    /// far behind schedule publishing ran.
    lag: Mutex<Histogram<u64>>,
    /// Telemetry messages handed to their connections, for the progress line.
    pub issued: AtomicU64,
    /// Telemetry messages acknowledged (or written, at QoS 0).
    pub completed: AtomicU64,
    /// Devices that have connected at least once.
    pub connected: AtomicU32,
    /// Freshness samples dropped because the probe queue was full.
    pub freshness_dropped: AtomicU64,
    /// The devices' counters of the same names, as they happen, for
    /// `--metrics-listen` (the summary adds up the devices' own at the end).
    pub refused: AtomicU64,
    pub failed: AtomicU64,
    pub retransmissions: AtomicU64,
    pub reconnects: AtomicU64,
}

impl FleetShared {
    pub fn new() -> anyhow::Result<Self> {
        Ok(FleetShared {
            latency: Mutex::new((
                Histogram::new_with_bounds(1, 3_600_000_000, 3)?,
                AckTimeline::default(),
            )),
            lag: Mutex::new(Histogram::new_with_bounds(1, 3_600_000_000, 3)?),
            issued: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            connected: AtomicU32::new(0),
            freshness_dropped: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            retransmissions: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
        })
    }

    pub fn record_latency(&self, d: Duration) {
        let us = (d.as_micros() as u64).clamp(1, 3_600_000_000);
        let mut l = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        let _ = l.0.record(us);
        l.1.record(crate::now_ms(), us);
    }

    /// Records lags in µs (0: on time).
    pub fn record_lags(&self, lags_us: &[u64]) {
        if lags_us.is_empty() {
            return;
        }
        let mut h = self.lag.lock().unwrap_or_else(|e| e.into_inner());
        for &us in lags_us {
            let _ = h.record(us.min(3_600_000_000));
        }
    }

    pub fn lag(&self) -> Histogram<u64> {
        self.lag.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn latency(&self) -> Histogram<u64> {
        self.latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    pub fn ack_timeline(&self) -> AckTimeline {
        self.latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }

    /// Adds what another process's fleet recorded: its PUBACK latencies,
    /// their timeline and its lags.
    pub fn absorb(
        &self,
        latency: &Histogram<u64>,
        timeline: &AckTimeline,
        lag: &Histogram<u64>,
    ) -> anyhow::Result<()> {
        let mut l = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        l.0.add(latency)?;
        l.1.merge(timeline);
        self.lag
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(lag)?;
        Ok(())
    }
}

/// PUBACKs per 100 ms of wall-clock time (when the PUBACK arrived): how
/// many, the slowest, and how many took over 100 ms. A tail that recurs at
/// a period shows here as a row of slow buckets.
#[derive(Debug, Clone, Default)]
pub struct AckTimeline {
    buckets: std::collections::BTreeMap<i64, AckBucket>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AckBucket {
    /// Wall-clock ms since the epoch at the bucket's start.
    pub at_ms: i64,
    pub acks: u64,
    pub max_ms: f64,
    /// PUBACKs that took more than 100 ms.
    pub slow: u64,
}

/// The timeline's bucket width.
const ACK_BUCKET_MS: i64 = 100;

impl AckTimeline {
    fn record(&mut self, now_ms: i64, us: u64) {
        let at_ms = now_ms.div_euclid(ACK_BUCKET_MS) * ACK_BUCKET_MS;
        let b = self.buckets.entry(at_ms).or_insert(AckBucket {
            at_ms,
            ..AckBucket::default()
        });
        b.acks += 1;
        b.max_ms = b.max_ms.max(us as f64 / 1000.0);
        b.slow += u64::from(us > 100_000);
    }

    pub fn merge(&mut self, other: &AckTimeline) {
        for (at, o) in &other.buckets {
            let b = self.buckets.entry(*at).or_insert(AckBucket {
                at_ms: *at,
                ..AckBucket::default()
            });
            b.acks += o.acks;
            b.max_ms = b.max_ms.max(o.max_ms);
            b.slow += o.slow;
        }
    }

    pub fn buckets(&self) -> Vec<AckBucket> {
        self.buckets.values().copied().collect()
    }

    pub fn from_buckets(buckets: &[AckBucket]) -> AckTimeline {
        AckTimeline {
            buckets: buckets.iter().map(|b| (b.at_ms, *b)).collect(),
        }
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
    /// Further brokers, devices assigned round-robin over all (see
    /// [`crate::SimConfig::more_brokers`]).
    pub more_brokers: Vec<BrokerAddr>,
    pub protocol: Protocol,
    /// `None`: plain TCP.
    pub tls: Option<TlsOptions>,
    /// Source addresses to spread connections over; empty: automatic (see
    /// [`source_addresses`]).
    pub source_addrs: Vec<IpAddr>,
    pub qos: u8,
    pub keep_alive: Duration,
    pub max_inflight: usize,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Publish `online` on the device's status topic
    /// (`dt/{fleet}/{device}/status`) after each CONNACK and `offline` before
    /// each DISCONNECT: with a broker in front, iotpipe's bridge reads
    /// presence from them (and from the will, on the same topic).
    pub presence_topic: bool,
    /// Keep every device connected until all of this process's devices have
    /// published and have their PUBACKs (see [`finishing`]).
    pub hold_connections: bool,
    /// New connections per second across the fleet; `None`: as fast as possible.
    pub connect_rate: Option<f64>,
    /// How long to wait for outstanding PUBACKs after the last send.
    pub ack_timeout: Duration,
    /// How long to wait for every device's first CONNACK.
    pub connect_timeout: Duration,
    /// The devices this process runs, when a run is spread over several
    /// (see `--processes`); `None`: all of them.
    pub slot: Option<crate::processes::Slot>,
}

/// Connections one source address can hold to one broker address: the
/// ephemeral port range, less a margin for other sockets.
pub fn ports_per_address() -> u32 {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|n| n.parse::<u32>().ok());
            match (it.next().flatten(), it.next().flatten()) {
                (Some(lo), Some(hi)) if hi > lo => Some(hi - lo + 1),
                _ => None,
            }
        })
        .unwrap_or(28_232);
    range.saturating_sub(1_000).max(1)
}

/// The source addresses for `devices` connections to `broker`: those given,
/// or, for a loopback broker with more devices than one address has ports,
/// as many of 127.0.0.1, 127.0.0.2, ... as [`loopback_sources`] says.
pub fn source_addresses(given: &[IpAddr], broker: SocketAddr, devices: u32) -> Vec<IpAddr> {
    if !given.is_empty() {
        return given.to_vec();
    }
    if !broker.ip().is_loopback() || !broker.is_ipv4() {
        return Vec::new();
    }
    (1..=loopback_sources(devices, ports_per_address()))
        .map(|n| IpAddr::from([127, 0, 0, n as u8]))
        .collect()
}

/// How many loopback addresses `devices` connections are spread over when
/// one address has `ports` ephemeral ports: none while they fit in one
/// (the kernel then picks ports per destination), else enough that each is
/// at most half full. A socket bound to an address with port 0 gets a port
/// from a search of that address's range, and a nearly full range makes
/// each search walk most of it: 50,000 devices on two addresses spent most
/// of the machine's time in that search and never all connected. Every
/// simulator process of a run counts the whole fleet, since they share the
/// addresses.
pub fn loopback_sources(devices: u32, ports: u32) -> u32 {
    if devices <= ports {
        return 0;
    }
    devices.div_ceil((ports / 2).max(1)).min(254)
}

/// What publishing a run did.
#[derive(Debug)]
pub struct PublishOutcome {
    /// The plan as run: its `run_start_ms` is set.
    pub plan: RunPlan,
    /// Every device's outcome, added up.
    pub sum: DeviceOutcome,
    /// From the schedule's start to the last PUBACK (or the ack timeout).
    pub elapsed: Duration,
    /// Devices that had not connected when the schedule started.
    pub not_connected: u32,
}

/// Why no device of a fleet connected: the first device's last error, once
/// every device has given up (its start signal is gone).
async fn no_device_connected(
    tasks: Vec<JoinHandle<DeviceOutcome>>,
    cfg: &PublishConfig,
) -> anyhow::Error {
    let mut err = None;
    for t in tasks {
        if let Ok(o) = t.await {
            err = err.or(o.counters.last_error);
        }
    }
    anyhow::anyhow!(
        "no device could connect to {} within {:?}: {}",
        cfg.broker,
        cfg.connect_timeout,
        err.unwrap_or_else(|| "no answer".into())
    )
}

/// A connected fleet, ready to run its schedule.
#[derive(Debug)]
pub struct Fleet {
    plan: RunPlan,
    tasks: Vec<JoinHandle<DeviceOutcome>>,
    start: watch::Sender<Option<Arc<RunPlan>>>,
    pub shared: Arc<FleetShared>,
    pub not_connected: u32,
    /// How long connecting every device took.
    pub connect_time: Duration,
}

impl Fleet {
    /// Connects every device of `plan` (one connection each, client id =
    /// device id) and waits for their CONNACKs, at most `connect_timeout`.
    #[allow(clippy::too_many_arguments)]
    pub async fn connect(
        plan: &RunPlan,
        first_seq: &[u64],
        messages: &[u64],
        cfg: &PublishConfig,
        limiter: Arc<ConnectLimiter>,
        shared: Arc<FleetShared>,
        freshness: Option<(u64, mpsc::Sender<Sample>)>,
        progress: bool,
    ) -> anyhow::Result<Fleet> {
        let broker = tokio::net::lookup_host((cfg.broker.host.as_str(), cfg.broker.port))
            .await
            .with_context(|| format!("resolving {}", cfg.broker))?
            .next()
            .with_context(|| format!("{} resolves to no address", cfg.broker))?;
        let mut more_brokers = Vec::with_capacity(cfg.more_brokers.len());
        for more in &cfg.more_brokers {
            let addr = tokio::net::lookup_host((more.host.as_str(), more.port))
                .await
                .with_context(|| format!("resolving {more}"))?
                .next()
                .with_context(|| format!("{more} resolves to no address"))?;
            more_brokers.push(addr);
        }
        let (tls, server_name) = match &cfg.tls {
            Some(opts) => {
                let setup = TlsSetup::new(opts, cfg.broker.port)?;
                if plan.devices > 0 {
                    setup.check_device(&plan.device_id(0))?;
                }
                let name = ServerName::try_from(cfg.broker.host.clone())
                    .with_context(|| format!("`{}` is no TLS server name", cfg.broker.host))?;
                (Some(setup), Some(name))
            }
            None => (None, None),
        };
        let mine = |index: &u32| cfg.slot.is_none_or(|s| s.holds(*index));
        let devices = (0..plan.devices).filter(mine).count() as u32;
        let env = Arc::new(DeviceEnv {
            cfg: cfg.clone(),
            plan: Arc::new(plan.clone()),
            broker,
            more_brokers,
            server_name,
            tls,
            source: source_addresses(&cfg.source_addrs, broker, plan.devices),
            limiter,
            shared: shared.clone(),
            freshness,
            roles: plan.liveness_roles(),
            finishing: cfg
                .hold_connections
                .then(|| finishing::Finishing::new(devices)),
        });
        let started = Instant::now();
        let (start, start_rx) = watch::channel(None);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut tasks = Vec::with_capacity(devices as usize);
        for index in (0..plan.devices).filter(mine) {
            let i = index as usize;
            tasks.push(tokio::spawn(device::run(
                env.clone(),
                index,
                first_seq.get(i).copied().unwrap_or(0),
                messages.get(i).copied().unwrap_or(0),
                start_rx.clone(),
                tx.clone(),
            )));
        }
        drop((tx, start_rx));
        let deadline = started + cfg.connect_timeout;
        let mut connected = 0u32;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        while connected < devices {
            tokio::select! {
                got = tokio::time::timeout_at(deadline, rx.recv()) => match got {
                    Ok(Some(_)) => connected += 1,
                    Ok(None) | Err(_) => break,
                },
                _ = tick.tick(), if progress => {
                    draw(&format!(
                        "{:>7.1} s  connected {connected}/{devices} devices of fleet {}",
                        started.elapsed().as_secs_f64(), plan.fleet
                    ));
                }
            }
        }
        let connect_time = started.elapsed();
        if progress {
            draw("");
        }
        if connected == 0 && devices > 0 {
            drop(start);
            return Err(no_device_connected(tasks, cfg).await);
        }
        Ok(Fleet {
            plan: plan.clone(),
            tasks,
            start,
            shared,
            not_connected: devices - connected,
            connect_time,
        })
    }

    /// Starts the schedule with `plan.run_start_ms` set.
    pub fn start(&mut self, run_start_ms: i64) -> RunPlan {
        self.plan.run_start_ms = run_start_ms;
        let _ = self.start.send(Some(Arc::new(self.plan.clone())));
        self.plan.clone()
    }

    /// Waits for every device to finish and sums up.
    pub async fn finish(self, started: Instant) -> anyhow::Result<PublishOutcome> {
        let mut sum = DeviceOutcome::default();
        for t in self.tasks {
            sum.merge(t.await.context("a device's task panicked")?);
        }
        Ok(PublishOutcome {
            plan: self.plan,
            sum,
            elapsed: started.elapsed(),
            not_connected: self.not_connected,
        })
    }
}

/// The earlier of two instants, either of which may be unknown.
pub fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Redraws the progress line on stdout (an empty line clears it).
pub fn draw(line: &str) {
    let mut out = std::io::stdout().lock();
    let text = if line.is_empty() {
        "\r\x1b[2K".to_string()
    } else {
        format!("\r\x1b[2K{line}")
    };
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// A live line on stdout, redrawn every second, until `stop` fires.
pub async fn show_progress(
    fleets: Vec<Arc<FleetShared>>,
    total: u64,
    origin: Instant,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let sum = |f: fn(&FleetShared) -> u64| fleets.iter().map(|s| f(s)).sum::<u64>();
                draw(&format!(
                    "{:>7.1} s  sent {}/{}  acked {}",
                    origin.elapsed().as_secs_f64(),
                    sum(|s| s.issued.load(Ordering::Relaxed)),
                    total,
                    sum(|s| s.completed.load(Ordering::Relaxed)),
                ));
            }
            _ = &mut stop => {
                draw("");
                return;
            }
        }
    }
}

/// Checks the CLI's QoS number.
pub fn qos(level: u8) -> anyhow::Result<u8> {
    match level {
        0 | 1 => Ok(level),
        n => bail!("QoS {n} is not supported: the pipeline speaks QoS 0 and 1"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fleet_past_one_address_is_spread_so_that_each_address_is_at_most_half_full() {
        assert_eq!(loopback_sources(27_000, 27_232), 0);
        // 50,000 would fit in two addresses' ports, but only just.
        assert_eq!(loopback_sources(50_000, 27_232), 4);
        assert_eq!(loopback_sources(27_233, 27_232), 3);
        assert_eq!(loopback_sources(u32::MAX, 27_232), 254);
        assert_eq!(loopback_sources(10, 1), 10);
    }
}
