//! The embedded rumqttd both comparison examples run, configured once so
//! that `vs_rumqttd` and `baseline` measure the same broker.

/// A rumqttd with one MQTT 3.1.1 listener on `listen`. The router's segment
/// must hold a burst of load-test traffic, or it drops what it cannot hold.
pub fn config(
    listen: &str,
    max_connections: usize,
    max_inflight: usize,
) -> anyhow::Result<rumqttd::Config> {
    Ok(serde_json::from_value(serde_json::json!({
        "id": 0,
        "router": {
            "max_connections": max_connections,
            "max_outgoing_packet_count": 200,
            "max_segment_size": 104857600,
            "max_segment_count": 10,
        },
        "v4": { "1": {
            "name": "v4-1",
            "listen": listen,
            "next_connection_delay_ms": 1,
            "connections": {
                "connection_timeout_ms": 60000,
                "max_payload_size": 200000,
                "max_inflight_count": max_inflight,
            },
        }},
    }))?)
}
