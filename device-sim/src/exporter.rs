//! The simulator's own Prometheus endpoint (`--metrics-listen ADDR`), so
//! that a long soak can be watched while it runs: messages published,
//! acknowledged, refused and failed, devices connected, reconnects, PUBACK
//! latency, freshness, and where the run is (connecting, publishing,
//! verifying, done) with verify's result once known.
//!
//! [`Live`] reads what the devices already count for the summary (each
//! fleet's [`FleetShared`]), so the figures it serves are the summary's own,
//! only earlier. [`serve`] takes a bound listener and a shutdown future, so
//! a test binds port 0 and scrapes while a run goes on.
//!
//! Names follow the pipeline's rule (docs/METRICS.md) with the stage
//! `device_sim`: `device_sim_<what>[_<unit>][_total]`, no device id as a
//! label.

use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use hdrhistogram::Histogram;
use tokio::net::TcpListener;

use crate::publish::FleetShared;
use crate::summary::Summary;

/// Where a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Connecting = 0,
    Publishing = 1,
    Verifying = 2,
    Done = 3,
}

const PHASES: [(Phase, &str); 4] = [
    (Phase::Connecting, "connecting"),
    (Phase::Publishing, "publishing"),
    (Phase::Verifying, "verifying"),
    (Phase::Done, "done"),
];

/// PUBACK latency buckets, seconds: 1 ms to 10 s, the span between a
/// loopback broker and one that is falling behind.
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A run's figures as they change, shared by the run and the endpoint.
#[derive(Debug)]
pub struct Live {
    /// Every fleet's shared state, added as the fleets connect.
    fleets: Mutex<Vec<Arc<FleetShared>>>,
    /// Devices and telemetry messages the run plans, once planned.
    devices: AtomicU64,
    planned: AtomicU64,
    phase: AtomicU8,
    /// What only the end of the run knows: freshness and verify.
    finished: Mutex<Option<Finished>>,
}

/// The figures a run knows only once it is over.
#[derive(Debug, Clone, Default)]
struct Finished {
    freshness: Option<(u64, u64, u64)>,
    verify: Option<(bool, u64, u64, u64)>,
}

impl Default for Live {
    fn default() -> Self {
        Live {
            fleets: Mutex::new(Vec::new()),
            devices: AtomicU64::new(0),
            planned: AtomicU64::new(0),
            phase: AtomicU8::new(Phase::Connecting as u8),
            finished: Mutex::new(None),
        }
    }
}

impl Live {
    pub fn new() -> Arc<Live> {
        Arc::new(Live::default())
    }

    /// The run's size, once its fleets are planned.
    pub fn planned(&self, devices: u64, messages: u64) {
        self.devices.store(devices, Ordering::Relaxed);
        self.planned.store(messages, Ordering::Relaxed);
    }

    pub fn add_fleet(&self, shared: Arc<FleetShared>) {
        self.fleets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(shared);
    }

    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    /// Takes what only the finished run knows (freshness, verify), and
    /// marks it done.
    pub fn finish(&self, s: &Summary) {
        let f = Finished {
            freshness: s
                .freshness
                .as_ref()
                .map(|f| (f.samples, f.visible, f.missed)),
            verify: s.verify.as_ref().map(|v| {
                (
                    v.ok,
                    v.windows + v.uncertain_windows,
                    v.mismatch_count,
                    v.devices,
                )
            }),
        };
        *self.finished.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
        self.set_phase(Phase::Done);
    }

    /// The run's counters and gauges: (name, type, help, value).
    fn counters(
        &self,
        fleets: &[Arc<FleetShared>],
    ) -> [(&'static str, &'static str, &'static str, u64); 10] {
        let sum = |f: &dyn Fn(&FleetShared) -> u64| fleets.iter().map(|s| f(s)).sum::<u64>();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            (
                "device_sim_devices",
                "gauge",
                "Devices the run plans.",
                load(&self.devices),
            ),
            (
                "device_sim_devices_connected",
                "gauge",
                "Devices that have connected at least once.",
                sum(&|s| u64::from(s.connected.load(Ordering::Relaxed))),
            ),
            (
                "device_sim_messages_planned",
                "gauge",
                "Telemetry messages the run plans.",
                load(&self.planned),
            ),
            (
                "device_sim_messages_published_total",
                "counter",
                "Telemetry messages handed to their connections (each once, however often retransmitted).",
                sum(&|s| load(&s.issued)),
            ),
            (
                "device_sim_messages_acknowledged_total",
                "counter",
                "Telemetry messages acknowledged (QoS 1) or written (QoS 0).",
                sum(&|s| load(&s.completed)),
            ),
            (
                "device_sim_messages_refused_total",
                "counter",
                "PUBACKs with a refusing MQTT 5 reason code.",
                sum(&|s| load(&s.refused)),
            ),
            (
                "device_sim_messages_failed_total",
                "counter",
                "Publishes never acknowledged within the ack timeout.",
                sum(&|s| load(&s.failed)),
            ),
            (
                "device_sim_messages_retransmitted_total",
                "counter",
                "Publishes written again after a reconnect.",
                sum(&|s| load(&s.retransmissions)),
            ),
            (
                "device_sim_reconnects_total",
                "counter",
                "Connections lost or dropped after they were up.",
                sum(&|s| load(&s.reconnects)),
            ),
            (
                "device_sim_freshness_samples_dropped_total",
                "counter",
                "Freshness samples dropped because the probe's queue was full.",
                sum(&|s| load(&s.freshness_dropped)),
            ),
        ]
    }

    /// The figures in Prometheus's text format.
    pub fn render(&self) -> String {
        let fleets = self
            .fleets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut out = String::new();
        let phase = self.phase.load(Ordering::Relaxed);
        family(
            &mut out,
            "device_sim_phase",
            "gauge",
            "Where the run is: 1 for the current phase.",
        );
        for (p, name) in PHASES {
            let _ = writeln!(
                out,
                "device_sim_phase{{phase=\"{name}\"}} {}",
                u8::from(p as u8 == phase)
            );
        }
        for (name, kind, help, value) in self.counters(&fleets) {
            family(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        }
        let mut latency: Option<Histogram<u64>> = None;
        for s in &fleets {
            let h = s.latency();
            match latency.as_mut() {
                Some(all) => {
                    let _ = all.add(&h);
                }
                None => latency = Some(h),
            }
        }
        if let Some(h) = latency {
            histogram(&mut out, &h);
        }
        let finished = self
            .finished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_default();
        if let Some((samples, visible, missed)) = finished.freshness {
            for (name, help, v) in [
                (
                    "device_sim_freshness_samples",
                    "Publishes followed until the API showed them.",
                    samples,
                ),
                (
                    "device_sim_freshness_samples_visible",
                    "Samples the API showed before the timeout.",
                    visible,
                ),
                (
                    "device_sim_freshness_samples_missed",
                    "Samples dropped or not shown before the timeout.",
                    missed,
                ),
            ] {
                family(&mut out, name, "gauge", help);
                let _ = writeln!(out, "{name} {v}");
            }
        }
        if let Some((ok, windows, mismatches, devices)) = finished.verify {
            for (name, help, v) in [
                (
                    "device_sim_verify_ok",
                    "1 if verify found every window as expected.",
                    u64::from(ok),
                ),
                (
                    "device_sim_verify_windows",
                    "Windows verify compared.",
                    windows,
                ),
                (
                    "device_sim_verify_mismatches",
                    "Fields verify found different from the expected ones.",
                    mismatches,
                ),
                (
                    "device_sim_verify_devices",
                    "Devices verify checked.",
                    devices,
                ),
            ] {
                family(&mut out, name, "gauge", help);
                let _ = writeln!(out, "{name} {v}");
            }
        }
        out
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// PUBACK latency (recorded in µs) as a Prometheus histogram in seconds.
fn histogram(out: &mut String, h: &Histogram<u64>) {
    let name = "device_sim_puback_latency_seconds";
    family(
        out,
        name,
        "histogram",
        "From a PUBLISH written to its PUBACK.",
    );
    for le in LATENCY_BUCKETS {
        let us = (le * 1e6) as u64;
        let n = h.count_between(0, us);
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.len());
    let sum_us: f64 = h
        .iter_recorded()
        .map(|v| v.value_iterated_to() as f64 * v.count_at_value() as f64)
        .sum();
    let _ = writeln!(out, "{name}_sum {}", sum_us / 1e6);
    let _ = writeln!(out, "{name}_count {}", h.len());
}

/// The endpoint: `GET /metrics`.
pub fn app(live: Arc<Live>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(live)
}

async fn metrics(State(live): State<Arc<Live>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        live.render(),
    )
}

/// Serves [`app`] on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    live: Arc<Live>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app(live))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Binds `addr` (port 0 allowed), says where on stderr, and serves `live`
/// until the returned sender is dropped or fires.
pub async fn start(
    addr: SocketAddr,
    live: Arc<Live>,
) -> anyhow::Result<(SocketAddr, tokio::sync::oneshot::Sender<()>)> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding --metrics-listen {addr}"))?;
    let bound = listener.local_addr()?;
    eprintln!("device-sim: metrics on http://{bound}/metrics");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(listener, live, async move {
        let _ = stopped.await;
    }));
    Ok((bound, stop))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_a_cumulative_histogram() {
        let live = Live::new();
        let shared = Arc::new(FleetShared::new().unwrap());
        shared.issued.fetch_add(3, Ordering::Relaxed);
        shared.completed.fetch_add(2, Ordering::Relaxed);
        for ms in [2, 2, 40] {
            shared.record_latency(std::time::Duration::from_millis(ms));
        }
        live.add_fleet(shared);
        live.set_phase(Phase::Publishing);
        let text = live.render();
        for line in [
            "device_sim_phase{phase=\"publishing\"} 1",
            "device_sim_phase{phase=\"connecting\"} 0",
            "device_sim_messages_published_total 3",
            "device_sim_messages_acknowledged_total 2",
            "device_sim_puback_latency_seconds_bucket{le=\"0.001\"} 0",
            "device_sim_puback_latency_seconds_bucket{le=\"0.0025\"} 2",
            "device_sim_puback_latency_seconds_bucket{le=\"0.05\"} 3",
            "device_sim_puback_latency_seconds_bucket{le=\"+Inf\"} 3",
            "device_sim_puback_latency_seconds_count 3",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
        assert!(!text.contains("device_sim_verify_ok"), "not verified yet");
    }
}
