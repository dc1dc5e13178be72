//! `/metrics` for the ingest endpoint, in Prometheus text format. The
//! processors render their own; device ids are never labels.

use std::fmt::Write;

use ingest::MetricsSnapshot;

/// Appends the endpoint's metrics to `out`.
pub fn render_ingest(s: &MetricsSnapshot, out: &mut String) {
    let mut counter = |name: &str, help: &str, v: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
        );
    };
    counter(
        "iotpipe_mqtt_connections_total",
        "MQTT connections accepted.",
        s.connections_total,
    );
    counter(
        "iotpipe_mqtt_connections_refused_total",
        "Connections closed at accept because max_connections was reached.",
        s.connections_refused,
    );
    counter(
        "iotpipe_mqtt_connects_refused_total",
        "CONNECTs refused (bad credentials, protocol).",
        s.connects_refused,
    );
    counter(
        "iotpipe_mqtt_takeovers_total",
        "Connections closed because their client id connected again.",
        s.takeovers,
    );
    counter(
        "iotpipe_mqtt_keepalive_timeouts_total",
        "Connections closed for silence beyond 1.5 x keepalive.",
        s.keepalive_timeouts,
    );
    counter(
        "iotpipe_messages_in_total",
        "PUBLISH messages received.",
        s.messages_in,
    );
    counter(
        "iotpipe_messages_accepted_total",
        "Messages that passed validation.",
        s.messages_accepted,
    );
    counter(
        "iotpipe_ingest_readings_accepted_total",
        "Readings in messages that passed validation.",
        s.readings_accepted,
    );
    counter(
        "iotpipe_mqtt_bytes_in_total",
        "Payload bytes received.",
        s.bytes_in,
    );
    counter(
        "iotpipe_mqtt_acks_sent_total",
        "PUBACKs sent, each after the message was durable.",
        s.acks_sent,
    );
    counter(
        "iotpipe_stream_appends_total",
        "Group-committed appends to the stream.",
        s.appends,
    );
    counter(
        "iotpipe_stream_records_appended_total",
        "Records appended to the stream.",
        s.records_appended,
    );
    counter(
        "iotpipe_stream_append_failures_total",
        "Appends the stream refused (retried).",
        s.append_failures,
    );
    counter(
        "iotpipe_stream_append_abandoned_total",
        "Records given up at shutdown, never acknowledged.",
        s.append_abandoned,
    );
    counter(
        "iotpipe_mqtt_refused_too_large_total",
        "Packets over the size limit.",
        s.refused_too_large,
    );
    counter(
        "iotpipe_mqtt_refused_qos2_total",
        "QoS 2 publishes refused.",
        s.refused_qos2,
    );
    counter(
        "iotpipe_mqtt_protocol_errors_total",
        "Connections closed for malformed packets.",
        s.protocol_errors,
    );
    counter(
        "iotpipe_tap_delivered_total",
        "Messages delivered to live-tap subscribers.",
        s.tap_delivered,
    );
    counter(
        "iotpipe_tap_dropped_total",
        "Messages dropped for slow live-tap subscribers.",
        s.tap_dropped,
    );
    let _ = writeln!(
        out,
        "# HELP iotpipe_broker_subscribed Whether the broker bridge holds its subscription (1) or not (0).\n# TYPE iotpipe_broker_subscribed gauge\niotpipe_broker_subscribed {}",
        s.bridge_subscribed
    );
    let _ = writeln!(
        out,
        "# HELP iotpipe_mqtt_connections Open MQTT connections.\n# TYPE iotpipe_mqtt_connections gauge\niotpipe_mqtt_connections {}",
        s.connections_current
    );
    let name = "iotpipe_ingest_rejected_total";
    let _ = writeln!(
        out,
        "# HELP {name} Messages refused at the endpoint, by reason.\n# TYPE {name} counter"
    );
    for (reason, n) in &s.rejected {
        let _ = writeln!(out, "{name}{{reason=\"{reason}\"}} {n}");
    }
    let name = "iotpipe_mqtt_subscriptions_refused_total";
    let _ = writeln!(
        out,
        "# HELP {name} SUBSCRIBE filters refused, by reason.\n# TYPE {name} counter"
    );
    for (reason, n) in &s.subscriptions_refused {
        let _ = writeln!(out, "{name}{{reason=\"{reason}\"}} {n}");
    }
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
