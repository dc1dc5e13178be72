//! The endpoint's counters: plain atomics, cheap enough to bump per message,
//! read through [`IngestMetrics::snapshot`] and rendered for `/metrics` by
//! [`render`].

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use schemas::RejectReason;

const REASONS: usize = RejectReason::ALL.len();
const SUBSCRIBE_REFUSALS: usize = SubscribeRefusal::ALL.len();

/// Why a SUBSCRIBE filter was refused: the label of the refusal counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeRefusal {
    /// The policy does not let the client watch what the filter matches:
    /// another device's topics, or the fleet without the operator role.
    NotAuthorized,
    FilterInvalid,
    SharedNotSupported,
    SubscriptionIdsNotSupported,
}

impl SubscribeRefusal {
    pub const ALL: [SubscribeRefusal; 4] = [
        SubscribeRefusal::NotAuthorized,
        SubscribeRefusal::FilterInvalid,
        SubscribeRefusal::SharedNotSupported,
        SubscribeRefusal::SubscriptionIdsNotSupported,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SubscribeRefusal::NotAuthorized => "not_authorized",
            SubscribeRefusal::FilterInvalid => "filter_invalid",
            SubscribeRefusal::SharedNotSupported => "shared_not_supported",
            SubscribeRefusal::SubscriptionIdsNotSupported => "subscription_ids_not_supported",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for SubscribeRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything the endpoint counts. Counters only grow, except the gauge
/// `connections_current`.
#[derive(Debug, Default)]
pub struct IngestMetrics {
    pub connections_current: AtomicU64,
    pub connections_total: AtomicU64,
    /// TCP connections closed on accept because `max_connections` were open.
    pub connections_refused: AtomicU64,
    /// CONNECTs refused (bad client id, credentials, protocol version).
    pub connects_refused: AtomicU64,
    /// TLS handshakes that failed or timed out (no certificate where one is
    /// required, an untrusted one, a client speaking plain MQTT).
    pub tls_handshake_failures: AtomicU64,
    /// Connections closed because another took over their client id.
    pub takeovers: AtomicU64,
    pub keepalive_timeouts: AtomicU64,
    /// PUBLISH packets received, accepted or not.
    pub messages_in: AtomicU64,
    /// Messages whose every reading was accepted.
    pub messages_accepted: AtomicU64,
    pub readings_accepted: AtomicU64,
    /// Refused messages, dead-lettered into the stream, by
    /// [`RejectReason::index`].
    pub rejected: [AtomicU64; REASONS],
    /// Bytes read from sockets.
    pub bytes_in: AtomicU64,
    pub acks_sent: AtomicU64,
    /// `put` calls made (each carries one group commit or a retry of one).
    pub appends: AtomicU64,
    pub records_appended: AtomicU64,
    /// Records the stream did not store on a try (they are retried).
    pub append_failures: AtomicU64,
    /// Records given up on (the stream refused them for good, or shutdown ran
    /// out of time); never acknowledged.
    pub append_abandoned: AtomicU64,
    pub append_latency: LatencyHistogram,
    /// Packets larger than `max_packet_bytes`; each closed its connection.
    pub refused_too_large: AtomicU64,
    /// QoS 2 PUBLISHes; each closed its connection, as IoT Core does.
    pub refused_qos2: AtomicU64,
    /// Malformed or out-of-order packets; each closed its connection.
    pub protocol_errors: AtomicU64,
    pub tap_delivered: AtomicU64,
    /// External broker mode: 1 while the bridge's subscription is granted on
    /// its current connection, else 0.
    pub bridge_subscribed: AtomicU64,
    /// Live-tap messages dropped because a subscriber's queue was full.
    pub tap_dropped: AtomicU64,
    /// SUBSCRIBE filters refused, by [`SubscribeRefusal`].
    pub subscriptions_refused: [AtomicU64; SUBSCRIBE_REFUSALS],
}

impl IngestMetrics {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn reject(&self, reason: RejectReason) {
        bump(&self.rejected[reason.index()]);
    }

    pub fn refuse_subscription(&self, reason: SubscribeRefusal) {
        bump(&self.subscriptions_refused[reason.index()]);
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MetricsSnapshot {
            connections_current: get(&self.connections_current),
            connections_total: get(&self.connections_total),
            connections_refused: get(&self.connections_refused),
            connects_refused: get(&self.connects_refused),
            tls_handshake_failures: get(&self.tls_handshake_failures),
            takeovers: get(&self.takeovers),
            keepalive_timeouts: get(&self.keepalive_timeouts),
            messages_in: get(&self.messages_in),
            messages_accepted: get(&self.messages_accepted),
            readings_accepted: get(&self.readings_accepted),
            rejected: RejectReason::ALL.map(|r| (r, get(&self.rejected[r.index()]))),
            bytes_in: get(&self.bytes_in),
            acks_sent: get(&self.acks_sent),
            appends: get(&self.appends),
            records_appended: get(&self.records_appended),
            append_failures: get(&self.append_failures),
            append_abandoned: get(&self.append_abandoned),
            append_latency_buckets: self.append_latency.cumulative(),
            append_latency_sum: Duration::from_micros(get(&self.append_latency.sum_micros)),
            append_latency_count: get(&self.append_latency.count),
            refused_too_large: get(&self.refused_too_large),
            refused_qos2: get(&self.refused_qos2),
            protocol_errors: get(&self.protocol_errors),
            tap_delivered: get(&self.tap_delivered),
            bridge_subscribed: get(&self.bridge_subscribed),
            tap_dropped: get(&self.tap_dropped),
            subscriptions_refused: SubscribeRefusal::ALL
                .map(|r| (r, get(&self.subscriptions_refused[r.index()]))),
        }
    }
}

pub(crate) fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn add(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

/// Upper bounds of the latency buckets, in µs: a group commit is expected in
/// the low milliseconds, a stalled one in seconds.
pub const LATENCY_BOUNDS_MICROS: [u64; 14] = [
    100, 250, 500, 1_000, 2_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 5_000_000,
];

/// A fixed-bucket histogram, Prometheus style: per-bucket counts plus an
/// overflow bucket, a sum and a count.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// One per bound in [`LATENCY_BOUNDS_MICROS`], then the overflow bucket.
    buckets: [AtomicU64; LATENCY_BOUNDS_MICROS.len() + 1],
    pub sum_micros: AtomicU64,
    pub count: AtomicU64,
}

impl LatencyHistogram {
    pub fn record(&self, d: Duration) {
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = LATENCY_BOUNDS_MICROS.partition_point(|b| *b < micros);
        bump(&self.buckets[i]);
        add(&self.sum_micros, micros);
        bump(&self.count);
    }

    /// `(upper bound, observations ≤ bound)`, the last bound being `None` for
    /// +Inf.
    pub fn cumulative(&self) -> Vec<(Option<Duration>, u64)> {
        let mut total = 0;
        self.buckets
            .iter()
            .enumerate()
            .map(|(i, b)| {
                total += b.load(Ordering::Relaxed);
                let bound = LATENCY_BOUNDS_MICROS
                    .get(i)
                    .map(|m| Duration::from_micros(*m));
                (bound, total)
            })
            .collect()
    }
}

/// A point-in-time copy of [`IngestMetrics`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsSnapshot {
    pub connections_current: u64,
    pub connections_total: u64,
    pub connections_refused: u64,
    pub connects_refused: u64,
    pub tls_handshake_failures: u64,
    pub takeovers: u64,
    pub keepalive_timeouts: u64,
    pub messages_in: u64,
    pub messages_accepted: u64,
    pub readings_accepted: u64,
    pub rejected: [(RejectReason, u64); REASONS],
    pub bytes_in: u64,
    pub acks_sent: u64,
    pub appends: u64,
    pub records_appended: u64,
    pub append_failures: u64,
    pub append_abandoned: u64,
    pub append_latency_buckets: Vec<(Option<Duration>, u64)>,
    pub append_latency_sum: Duration,
    pub append_latency_count: u64,
    pub refused_too_large: u64,
    pub refused_qos2: u64,
    pub protocol_errors: u64,
    pub tap_delivered: u64,
    pub bridge_subscribed: u64,
    pub tap_dropped: u64,
    pub subscriptions_refused: [(SubscribeRefusal, u64); SUBSCRIBE_REFUSALS],
}

impl MetricsSnapshot {
    pub fn rejected(&self, reason: RejectReason) -> u64 {
        self.rejected[reason.index()].1
    }

    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().map(|(_, n)| n).sum()
    }

    pub fn subscriptions_refused(&self, reason: SubscribeRefusal) -> u64 {
        self.subscriptions_refused[reason.index()].1
    }
}

/// Appends the endpoint's metrics to `out`, in Prometheus text format.
/// Device ids are never labels (cardinality).
pub fn render(s: &MetricsSnapshot, out: &mut String) {
    for (name, help, v) in counters(s) {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
        );
    }
    let gauges = [
        (
            "iotpipe_bridge_subscribed",
            "Whether the broker bridge holds its subscription (1) or not (0).",
            s.bridge_subscribed,
        ),
        (
            "iotpipe_mqtt_connections_open",
            "Open MQTT connections.",
            s.connections_current,
        ),
    ];
    for (name, help, v) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    }
    by_reason(
        out,
        "iotpipe_mqtt_messages_refused_total",
        "Messages refused at the endpoint, by reason.",
        s.rejected.iter().map(|(r, n)| (r.as_str(), *n)),
    );
    by_reason(
        out,
        "iotpipe_mqtt_subscriptions_refused_total",
        "SUBSCRIBE filters refused, by reason.",
        s.subscriptions_refused
            .iter()
            .map(|(r, n)| (r.as_str(), *n)),
    );
    let name = "iotpipe_stream_append_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Time for one group commit to become durable.\n# TYPE {name} histogram"
    );
    for (bound, n) in &s.append_latency_buckets {
        match bound {
            Some(b) => {
                let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {n}", b.as_secs_f64());
            }
            None => {
                let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
            }
        }
    }
    let _ = writeln!(out, "{name}_sum {}", s.append_latency_sum.as_secs_f64());
    let _ = writeln!(out, "{name}_count {}", s.append_latency_count);
}

/// The plain counters, in the order `/metrics` has always listed them:
/// name, help, value.
fn counters(s: &MetricsSnapshot) -> [(&'static str, &'static str, u64); 19] {
    [
        (
            "iotpipe_mqtt_connections_accepted_total",
            "MQTT connections accepted.",
            s.connections_total,
        ),
        (
            "iotpipe_mqtt_connections_refused_total",
            "Connections closed at accept because max_connections was reached.",
            s.connections_refused,
        ),
        (
            "iotpipe_mqtt_connects_refused_total",
            "CONNECTs refused (bad credentials, protocol).",
            s.connects_refused,
        ),
        (
            "iotpipe_mqtt_takeovers_total",
            "Connections closed because their client id connected again.",
            s.takeovers,
        ),
        (
            "iotpipe_mqtt_keepalive_timeouts_total",
            "Connections closed for silence beyond 1.5 x keepalive.",
            s.keepalive_timeouts,
        ),
        (
            "iotpipe_mqtt_messages_received_total",
            "PUBLISH messages received.",
            s.messages_in,
        ),
        (
            "iotpipe_mqtt_messages_accepted_total",
            "Messages that passed validation.",
            s.messages_accepted,
        ),
        (
            "iotpipe_mqtt_readings_accepted_total",
            "Readings in messages that passed validation.",
            s.readings_accepted,
        ),
        (
            "iotpipe_mqtt_payload_received_bytes_total",
            "Payload bytes received.",
            s.bytes_in,
        ),
        (
            "iotpipe_mqtt_acks_sent_total",
            "PUBACKs sent, each after the message was durable.",
            s.acks_sent,
        ),
        (
            "iotpipe_stream_appends_total",
            "Group-committed appends to the stream.",
            s.appends,
        ),
        (
            "iotpipe_stream_records_appended_total",
            "Records appended to the stream.",
            s.records_appended,
        ),
        (
            "iotpipe_stream_append_failures_total",
            "Appends the stream refused (retried).",
            s.append_failures,
        ),
        (
            "iotpipe_stream_append_abandoned_total",
            "Records given up at shutdown, never acknowledged.",
            s.append_abandoned,
        ),
        (
            "iotpipe_mqtt_packets_too_large_total",
            "Packets over the size limit.",
            s.refused_too_large,
        ),
        (
            "iotpipe_mqtt_publishes_qos2_refused_total",
            "QoS 2 publishes refused.",
            s.refused_qos2,
        ),
        (
            "iotpipe_mqtt_protocol_errors_total",
            "Connections closed for malformed packets.",
            s.protocol_errors,
        ),
        (
            "iotpipe_tap_delivered_total",
            "Messages delivered to live-tap subscribers.",
            s.tap_delivered,
        ),
        (
            "iotpipe_tap_dropped_total",
            "Messages dropped for slow live-tap subscribers.",
            s.tap_dropped,
        ),
    ]
}

/// A counter with one series per reason.
fn by_reason<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    values: impl Iterator<Item = (&'a str, u64)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (reason, n) in values {
        let _ = writeln!(out, "{name}{{reason=\"{reason}\"}} {n}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = LatencyHistogram::default();
        h.record(Duration::from_micros(90));
        h.record(Duration::from_micros(100));
        h.record(Duration::from_millis(3));
        h.record(Duration::from_secs(60));
        let c = h.cumulative();
        assert_eq!(c[0], (Some(Duration::from_micros(100)), 2));
        assert_eq!(c[4], (Some(Duration::from_millis(2)), 2));
        assert_eq!(c[5], (Some(Duration::from_millis(5)), 3));
        assert_eq!(c.last(), Some(&(None, 4)));
        assert_eq!(h.count.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn rejections_are_counted_by_reason() {
        let m = IngestMetrics::new();
        m.reject(RejectReason::BadTopic);
        m.reject(RejectReason::BadTopic);
        m.reject(RejectReason::Schema);
        let s = m.snapshot();
        assert_eq!(s.rejected(RejectReason::BadTopic), 2);
        assert_eq!(s.rejected(RejectReason::Schema), 1);
        assert_eq!(s.rejected_total(), 3);
    }

    #[test]
    fn render_writes_each_counter_reason_and_bucket() {
        let m = IngestMetrics::new();
        bump(&m.messages_in);
        m.reject(RejectReason::Schema);
        m.refuse_subscription(SubscribeRefusal::NotAuthorized);
        m.append_latency.record(Duration::from_millis(3));
        let mut out = String::new();
        render(&m.snapshot(), &mut out);
        let lines: Vec<&str> = out.lines().collect();
        for line in [
            "# TYPE iotpipe_mqtt_messages_received_total counter",
            "iotpipe_mqtt_messages_received_total 1",
            "iotpipe_mqtt_connections_open 0",
            "iotpipe_mqtt_messages_refused_total{reason=\"schema\"} 1",
            "iotpipe_mqtt_subscriptions_refused_total{reason=\"not_authorized\"} 1",
            "iotpipe_stream_append_seconds_bucket{le=\"0.002\"} 0",
            "iotpipe_stream_append_seconds_bucket{le=\"0.005\"} 1",
            "iotpipe_stream_append_seconds_bucket{le=\"+Inf\"} 1",
            "iotpipe_stream_append_seconds_count 1",
        ] {
            assert!(lines.contains(&line), "{line} missing from\n{out}");
        }
        let helps = lines.iter().filter(|l| l.starts_with("# HELP")).count();
        let types = lines.iter().filter(|l| l.starts_with("# TYPE")).count();
        assert_eq!((helps, types), (24, 24), "{out}");
    }
}
