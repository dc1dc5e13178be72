//! What the simulator's tests share.

use std::time::Duration;

use device_sim::{BrokerAddr, Rate, SimConfig, Stop};
use testkit::standin::Harness;

/// A small run of fleet `fleet` against the stand-in `h`, verified:
/// 20 devices, 10 messages each at 10 a second.
pub fn config(h: &Harness, fleet: &str) -> SimConfig {
    SimConfig {
        broker: BrokerAddr {
            host: h.mqtt.ip().to_string(),
            port: h.mqtt.port(),
        },
        devices: 20,
        rate: Rate::PerDevice(10.0),
        stop: Stop::Count(10),
        fleet: fleet.into(),
        verify: Some(h.api_url()),
        verify_timeout: Duration::from_secs(10),
        ack_timeout: Duration::from_secs(10),
        ..SimConfig::default()
    }
}
