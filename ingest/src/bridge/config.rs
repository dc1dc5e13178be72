//! How the bridge reaches the broker: the URL, the session, the limits.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::MqttOptions;

use crate::config::{Clock, GroupCommit, wall_clock};

/// The topic filter the bridge subscribes to: every device's telemetry.
pub const TELEMETRY_FILTER: &str = "dt/+/+/telemetry";

/// How the bridge reaches the broker and commits what it receives. Build with
/// [`BridgeConfig::new`] and override fields.
#[derive(Clone)]
pub struct BridgeConfig {
    pub host: String,
    pub port: u16,
    /// Names the persistent session at the broker. It must be fixed across
    /// restarts (the broker keeps unacknowledged messages under it) and used
    /// by one bridge at a time (a second one takes the session over).
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// TLS to the broker (`mqtts://`); `None` for plain TCP.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub topic_filter: String,
    /// Also subscribe to the devices' status topics
    /// ([`STATUS_FILTER`](super::presence::STATUS_FILTER)) and append a
    /// presence record for each `online` or `offline` (see
    /// [`presence`](super::presence)); as the endpoint's `mqtt.presence`.
    pub presence: bool,
    pub keepalive: Duration,
    /// Messages received and not yet acknowledged, at most; beyond it the
    /// bridge stops reading from the broker until appends complete. The
    /// broker's in-flight limit is usually the tighter bound.
    pub max_pending: usize,
    /// Group commit, as in [`crate::EndpointConfig`]. The bridge keeps a
    /// 2 ms cadence where the endpoint puts at once: its one connection has
    /// the broker's whole in-flight window, so latency buys it little, while
    /// bigger batches keep the processors ahead. `scripts/bench`, Mosquitto
    /// at QoS 1: 30,143 msgs/s sustained at 2 ms, 24,326 at 0.
    pub group_commit: GroupCommit,
    /// Waits between reconnect attempts, doubling from min to max.
    pub reconnect_backoff_min: Duration,
    pub reconnect_backoff_max: Duration,
    /// After shutdown is requested, how long appends in flight may take;
    /// what is not durable by then stays unacknowledged (the broker keeps it).
    pub shutdown_timeout: Duration,
    /// Stamps `received_at`.
    pub now_ms: Clock,
    pub lateness: crate::LatenessConfig,
}

impl std::fmt::Debug for BridgeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BridgeConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("tls", &self.tls.is_some())
            .field("topic_filter", &self.topic_filter)
            .field("presence", &self.presence)
            .field("max_pending", &self.max_pending)
            .field("group_commit", &self.group_commit)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("invalid broker URL `{url}`: {detail}")]
    BadUrl { url: String, detail: String },
}

/// The default session name; see [`BridgeConfig::client_id`].
pub const DEFAULT_CLIENT_ID: &str = "iotpipe-bridge";

impl BridgeConfig {
    /// A bridge to `url`: `mqtt://HOST[:PORT]` (default port 1883) or
    /// `mqtts://HOST[:PORT]` (8883; set [`tls`](Self::tls) too).
    pub fn new(url: &str) -> Result<BridgeConfig, BridgeError> {
        let bad = |detail: &str| BridgeError::BadUrl {
            url: url.to_string(),
            detail: detail.to_string(),
        };
        let (rest, default_port) = if let Some(r) = url.strip_prefix("mqtt://") {
            (r, 1883)
        } else if let Some(r) = url.strip_prefix("mqtts://") {
            (r, 8883)
        } else {
            return Err(bad("expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"));
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains(['/', '@', '?']) {
            return Err(bad(
                "only a host and port may follow the scheme (credentials are separate options)",
            ));
        }
        let (host, port) = match rest.rsplit_once(':') {
            // A bracketed IPv6 literal without a port.
            _ if rest.starts_with('[') && rest.ends_with(']') => (rest, default_port),
            Some((h, p)) => (h, p.parse().map_err(|_| bad("the port is not a number"))?),
            None => (rest, default_port),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(BridgeConfig {
            host: host.to_string(),
            port,
            client_id: DEFAULT_CLIENT_ID.to_string(),
            username: None,
            password: None,
            tls: None,
            topic_filter: TELEMETRY_FILTER.to_string(),
            presence: false,
            keepalive: Duration::from_secs(30),
            max_pending: 20_000,
            group_commit: GroupCommit {
                commit_interval: Duration::from_millis(2),
                ..GroupCommit::default()
            },
            reconnect_backoff_min: Duration::from_millis(100),
            reconnect_backoff_max: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(10),
            now_ms: wall_clock(),
            lateness: crate::LatenessConfig::default(),
        })
    }

    pub(super) fn mqtt_options(&self) -> MqttOptions {
        let mut o = MqttOptions::new(&self.client_id, &self.host, self.port);
        o.set_clean_session(false);
        o.set_manual_acks(true);
        o.set_keep_alive(self.keepalive.max(Duration::from_secs(5)));
        // Incoming messages may be as large as the endpoint accepts.
        let max = schemas::reading::MAX_MESSAGE_BYTES + 4096;
        o.set_max_packet_size(max, max);
        if let Some(user) = &self.username {
            o.set_credentials(user, self.password.as_deref().unwrap_or(""));
        }
        if let Some(tls) = &self.tls {
            o.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls.clone()),
            ));
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let c = BridgeConfig::new("mqtt://127.0.0.1:1884").unwrap();
        assert_eq!((c.host.as_str(), c.port), ("127.0.0.1", 1884));
        let c = BridgeConfig::new("mqtt://broker.local").unwrap();
        assert_eq!((c.host.as_str(), c.port), ("broker.local", 1883));
        let c = BridgeConfig::new("mqtts://[::1]").unwrap();
        assert_eq!((c.host.as_str(), c.port), ("::1", 8883));
        let c = BridgeConfig::new("mqtt://[::1]:2000/").unwrap();
        assert_eq!((c.host.as_str(), c.port), ("::1", 2000));
        for bad in [
            "tcp://h:1",
            "mqtt://",
            "mqtt://h:port",
            "mqtt://u:p@h:1",
            "mqtt://h/x",
        ] {
            assert!(BridgeConfig::new(bad).is_err(), "{bad}");
        }
    }
}
