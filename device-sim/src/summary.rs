//! The run's summary: what was sent, how fast, how long PUBACKs took, and
//! what verify found.

use std::fmt;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::freshness::Freshness;
use crate::resources::Usage;
use crate::verify::{StatCheck, VerifyReport};

/// Percentiles of a duration (PUBACK latency, schedule lag), in
/// milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub fn from_histogram(h: &Histogram<u64>) -> Option<Latency> {
        if h.is_empty() {
            return None;
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Some(Latency {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        })
    }
}

/// One fleet's share of a run (a scenario has several).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FleetSummary {
    pub run: u64,
    pub fleet: String,
    pub devices: u32,
    pub qos: u8,
    pub messages_sent: u64,
    pub readings_sent: u64,
    pub acked: u64,
    pub failed: u64,
    pub retransmissions: u64,
    pub reconnects: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// The run's number in the ledger (1 without a ledger; a scenario's
    /// first fleet).
    pub run: u64,
    /// The fleet's name (a scenario's fleets, comma-separated).
    pub fleet: String,
    pub devices: u32,
    /// Devices without a CONNACK when the schedule started.
    pub not_connected: u32,
    pub qos: u8,
    /// Telemetry messages published (each counted once, however often it
    /// was retransmitted).
    pub messages_sent: u64,
    pub readings_sent: u64,
    /// Telemetry messages acknowledged (QoS 1) or written (QoS 0).
    pub acked: u64,
    /// Publishes never acknowledged within the ack timeout.
    pub failed: u64,
    pub duplicates_sent: u64,
    pub malformed_sent: u64,
    pub retransmissions: u64,
    pub reconnects: u64,
    /// What the schedule asks for: planned messages over the planned length.
    pub target_msgs_per_sec: f64,
    /// Telemetry messages acknowledged (QoS 1) or written (QoS 0) per
    /// second of `rate_span_ms`.
    pub achieved_msgs_per_sec: f64,
    pub target_readings_per_sec: f64,
    /// `acked_readings` per second of `rate_span_ms`.
    pub achieved_readings_per_sec: f64,
    /// Readings in the telemetry messages acknowledged (QoS 1) or written
    /// (QoS 0).
    pub acked_readings: u64,
    /// From the first publish to the last PUBACK (QoS 0: the last write),
    /// real time: what the achieved rates divide by.
    pub rate_span_ms: f64,
    /// How far each publish ran behind its due time, from due to first
    /// write (a publish never written: to the end of the run).
    pub schedule_lag: Option<Latency>,
    /// Publishes more than 100 ms behind their due time.
    pub behind_schedule: u64,
    pub max_lag_ms: i64,
    pub puback: Option<Latency>,
    /// PUBACKs per 100 ms of wall-clock time, in the JSON report only.
    pub puback_timeline: Vec<crate::publish::AckBucket>,
    pub elapsed_ms: u64,
    pub last_error: Option<String>,
    pub verify: Option<VerifyReport>,
    /// The alerts check, with `--alert-rules`.
    pub alerts: Option<crate::verify::alerts::AlertCheck>,
    /// MQTT protocol: "3.1.1" or "5".
    pub protocol: String,
    pub tls: bool,
    /// From the first connection attempt until every device had connected
    /// (or the connect timeout passed).
    pub connect_ms: u64,
    /// PUBACKs with a refusing MQTT 5 reason code.
    pub refused: u64,
    /// Sends that waited because the in-flight window was full: the
    /// broker acknowledging slower than the schedule publishes.
    pub window_waits: u64,
    /// Whether the schedule was kept and, if not, which side fell behind.
    pub verdict: String,
    pub fleets: Vec<FleetSummary>,
    pub freshness: Option<Freshness>,
    /// The simulator's own memory and CPU.
    pub usage: Usage,
    /// Resident memory once every device had connected, before publishing.
    pub rss_connected_mib: f64,
    /// What one connected, idle device adds to resident memory, KiB.
    pub idle_kib_per_device: f64,
    pub warnings: Vec<String>,
    /// Each fleet's devices chosen to stop or leave with a will, and the
    /// check that the API listed exactly them (see [`crate::liveness`]).
    pub liveness: Vec<crate::liveness::LivenessReport>,
}

impl Summary {
    /// Every publish completed and, if asked for, verify passed.
    pub fn ok(&self) -> bool {
        self.failed == 0
            && self.verify.as_ref().is_none_or(|v| v.ok)
            && self.alerts.as_ref().is_none_or(|a| a.ok)
            && self.liveness.iter().all(|l| l.ok)
    }

    /// Verify's check of the pipeline counter `counter` (`rejected.schema`),
    /// if verify ran and checked it.
    pub fn stat(&self, counter: &str) -> Option<&StatCheck> {
        let verify = self.verify.as_ref()?;
        verify.stats.iter().find(|c| c.counter == counter)
    }
}

/// The freshness line: percentiles over every sample, and what missed.
fn write_freshness(f: &mut fmt::Formatter<'_>, fr: &Freshness) -> fmt::Result {
    let (Some(p50), Some(p99), Some(max)) = (fr.p50_ms, fr.p99_ms, fr.max_ms) else {
        return writeln!(f, "freshness: no samples");
    };
    let missed = if fr.missed == 0 {
        "none missed".to_string()
    } else {
        format!(
            "{} missed: {} dropped, {} not visible within {:.0} s",
            fr.missed,
            fr.dropped,
            fr.timed_out,
            fr.timeout_ms as f64 / 1000.0
        )
    };
    // How late the probe itself polled bounds how much of each figure is
    // the probe's own delay rather than the pipeline's.
    let late = fr
        .poll_late_p99_ms
        .map(|ms| format!(", polls went out p99 {ms:.0} ms late"))
        .unwrap_or_default();
    writeln!(
        f,
        "freshness: p50 {p50}, p99 {p99}, max {max} over {} samples (one publish in {}), {missed}; polled every {} ms{late}",
        fr.samples, fr.sample_every, fr.poll_ms
    )
}

impl Summary {
    /// Connections, messages, rates, schedule lag and PUBACK latency.
    fn write_traffic(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "connect: {} devices in {:.2} s",
            self.devices - self.not_connected,
            self.connect_ms as f64 / 1000.0
        )?;
        let acked = if self.qos == 0 {
            "n/a at QoS 0".to_string()
        } else {
            self.acked.to_string()
        };
        writeln!(
            f,
            "messages: {} sent, {} acked, {} failed; {} readings; {} duplicates, {} malformed, {} retransmitted, {} reconnects",
            self.messages_sent,
            acked,
            self.failed,
            self.readings_sent,
            self.duplicates_sent,
            self.malformed_sent,
            self.retransmissions,
            self.reconnects
        )?;
        let (done, last) = if self.qos == 0 {
            ("written", "last write")
        } else {
            ("acknowledged", "last PUBACK")
        };
        writeln!(
            f,
            "rate: {:.1} msgs/s {done} over {:.2} s (first publish to {last}), target {:.1}; {:.1} readings/s, target {:.1}",
            self.achieved_msgs_per_sec,
            self.rate_span_ms / 1000.0,
            self.target_msgs_per_sec,
            self.achieved_readings_per_sec,
            self.target_readings_per_sec
        )?;
        if let Some(l) = &self.schedule_lag {
            writeln!(
                f,
                "schedule lag: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {} publishes more than 100 ms late",
                l.p50_ms, l.p99_ms, l.max_ms, self.behind_schedule
            )?;
        }
        match &self.puback {
            Some(l) => writeln!(
                f,
                "puback latency: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} acks)",
                l.p50_ms, l.p99_ms, l.max_ms, l.count
            )?,
            None => writeln!(f, "puback latency: none measured")?,
        }
        Ok(())
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        writeln!(
            f,
            "run {} of fleet {}: {} devices ({} not connected at start), QoS {}, MQTT {}{}",
            self.run,
            self.fleet,
            self.devices,
            self.not_connected,
            self.qos,
            self.protocol,
            if self.tls { " over TLS" } else { "" }
        )?;
        if self.fleets.len() > 1 {
            for fl in &self.fleets {
                writeln!(
                    f,
                    "  fleet {} (run {}): {} devices, QoS {}: {} sent, {} acked, {} failed, {} readings, {} retransmitted, {} reconnects",
                    fl.fleet,
                    fl.run,
                    fl.devices,
                    fl.qos,
                    fl.messages_sent,
                    fl.acked,
                    fl.failed,
                    fl.readings_sent,
                    fl.retransmissions,
                    fl.reconnects
                )?;
            }
        }
        self.write_traffic(f)?;
        writeln!(f, "verdict: {}", self.verdict)?;
        if self.refused > 0 {
            writeln!(f, "refused by the broker: {} publishes", self.refused)?;
        }
        if let Some(fr) = &self.freshness {
            write_freshness(f, fr)?;
        }
        writeln!(f, "elapsed: {:.2} s", self.elapsed_ms as f64 / 1000.0)?;
        writeln!(
            f,
            "simulator: peak RSS {:.0} MiB ({:.0} MiB with every device connected and idle, {:.1} KiB per device), {:.1} s CPU",
            self.usage.peak_rss_mib,
            self.rss_connected_mib,
            self.idle_kib_per_device,
            self.usage.cpu_seconds
        )?;
        if let Some(e) = &self.last_error {
            writeln!(f, "last connection error: {e}")?;
        }
        if let Some(v) = &self.verify {
            write!(f, "{v}")?;
        }
        if let Some(a) = &self.alerts {
            write!(f, "{a}")?;
        }
        for l in &self.liveness {
            write!(f, "{l}")?;
        }
        Ok(())
    }
}
