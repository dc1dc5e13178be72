//! The embedded rumqttd that `ingest`'s comparison examples (`vs_rumqttd`,
//! `baseline`) run, configured and started in one place so that both measure
//! the same broker.

/// Starts rumqttd on its own thread and returns an in-process link named
/// `link`, subscribed to `filter`.
pub fn start(
    listen: &str,
    max_connections: usize,
    max_inflight: usize,
    link: &str,
    filter: &str,
) -> anyhow::Result<(rumqttd::local::LinkTx, rumqttd::local::LinkRx)> {
    let mut broker = rumqttd::Broker::new(config(listen, max_connections, max_inflight)?);
    let (mut link_tx, link_rx) = broker.link(link)?;
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                eprintln!("rumqttd stopped: {e}");
            }
        })?;
    link_tx.subscribe(filter)?;
    Ok((link_tx, link_rx))
}

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
