//! The run's summary: what was sent, how fast, how long PUBACKs took, and
//! what verify found.

use std::fmt;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::freshness::Freshness;
use crate::resources::Usage;
use crate::verify::VerifyReport;

/// PUBACK latency percentiles, in milliseconds.
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
    pub target_msgs_per_sec: f64,
    pub achieved_msgs_per_sec: f64,
    pub target_readings_per_sec: f64,
    pub achieved_readings_per_sec: f64,
    /// Publishes handed over more than 100 ms after their due time.
    pub behind_schedule: u64,
    pub max_lag_ms: i64,
    pub puback: Option<Latency>,
    pub elapsed_ms: u64,
    pub last_error: Option<String>,
    pub verify: Option<VerifyReport>,
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
}

impl Summary {
    /// Every publish completed and, if asked for, verify passed.
    pub fn ok(&self) -> bool {
        self.failed == 0 && self.verify.as_ref().is_none_or(|v| v.ok)
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
        writeln!(
            f,
            "rate: {:.1} msgs/s of {:.1} target, {:.1} readings/s of {:.1} target",
            self.achieved_msgs_per_sec,
            self.target_msgs_per_sec,
            self.achieved_readings_per_sec,
            self.target_readings_per_sec
        )?;
        if self.behind_schedule > 0 {
            writeln!(
                f,
                "behind schedule: {} publishes more than 100 ms late, at most {} ms",
                self.behind_schedule, self.max_lag_ms
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
        writeln!(f, "verdict: {}", self.verdict)?;
        if self.refused > 0 {
            writeln!(f, "refused by the broker: {} publishes", self.refused)?;
        }
        if let Some(fr) = &self.freshness {
            match (fr.p50_ms, fr.p99_ms) {
                (Some(p50), Some(p99)) => writeln!(
                    f,
                    "freshness: p50 {p50:.0} ms, p99 {p99:.0} ms ({} of {} samples visible, {} timed out, {} dropped; polled every {} ms)",
                    fr.visible, fr.samples, fr.timed_out, fr.dropped, fr.poll_ms
                )?,
                _ => writeln!(
                    f,
                    "freshness: no sample became visible ({} samples)",
                    fr.samples
                )?,
            }
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
        Ok(())
    }
}
