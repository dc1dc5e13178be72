//! The durable MQTT ingest endpoint.
//!
//! Devices publish telemetry over MQTT 3.1.1 or 5; the endpoint validates each
//! message, appends it to the stream (refused messages too, as dead letters) and
//! acknowledges a QoS 1 publish only once the stream reports it durable. Records
//! from every connection are group-committed: one appender gathers them and
//! makes one `put` per commit interval (2 ms) under load, at once when idle.
//!
//! Layout:
//! - [`config`]: [`EndpointConfig`], the knobs and their defaults.
//! - [`metrics`]: [`IngestMetrics`], counters and the append latency histogram.
//! - [`auth`]: [`Authorizer`], the per-device publish and subscribe policy
//!   seam, with
//!   [`AllowAll`] (the default), [`OwnDeviceOnly`], [`ClientCertificates`]
//!   and [`UsersFile`].
//! - [`bridge`]: external broker mode, a persistent-session subscriber that
//!   acknowledges the broker after the append, and reads presence from the
//!   devices' status topics.
//! - [`users`]: adding, removing and listing devices in a users file.
//! - [`tls`]: TLS listener settings ([`tls::TlsConfig`]) and the device and
//!   role a client certificate names.
//! - [`record`]: one message → one stream record (validation, packing, dead
//!   letters), shared by the endpoint and the bridge (and the golden tests).
//! - `endpoint`: [`serve_on`] over plain and TLS [`Listener`]s, and the pieces
//!   behind it: `codec` (bytes ↔ packets for either protocol), `session` (the
//!   pure per-connection state machine), `connection` (the only code that
//!   touches a socket), `appender` (group commit) and `tap` (read-only live
//!   subscriptions, on which the process also publishes through a
//!   [`LiveTap`]: alerts).
//!
//! **Architecture Invariant:** a PUBACK leaves only after the stream returned
//! `Stored` for the record that PUBLISH became, and PUBACKs leave in the order
//! their PUBLISHes arrived on the connection.
//!
//! **Architecture Invariant:** nothing here retains messages or keeps sessions
//! across connections; a subscriber sees live, durable telemetry at QoS 0 only.
//! There is no QoS 2 (AWS IoT Core has none either), no retain, no will
//! delivery (a will is accepted and ignored) and no topic alias.

pub mod auth;
pub mod bridge;
pub mod config;
mod endpoint;
pub mod metrics;
pub mod record;
pub mod tls;
pub mod users;

pub use auth::{
    AllowAll, Authorizer, ClientCertificates, ConnectInfo, ConnectRefusal, OwnDeviceOnly,
    Principal, Role, UsersFile, UsersFileError,
};
pub use config::{Clock, EndpointConfig, GroupCommit, LatenessConfig};
pub use endpoint::{Listener, LiveTap, serve, serve_on};

/// The fuzz harness's entry point (see `ingest/fuzz/`); not an API.
#[doc(hidden)]
pub use endpoint::fuzzing;
pub use metrics::{IngestMetrics, LatencyHistogram, MetricsSnapshot, SubscribeRefusal};

/// The in-memory producer the appender's unit tests hold or fail: the test
/// kit's, named here so those tests need not know where it lives.
#[cfg(test)]
mod testing {
    pub(crate) use testkit::MemoryProducer;
}
