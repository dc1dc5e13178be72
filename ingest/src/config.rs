//! The endpoint's knobs, with defaults sized for one small machine.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use schemas::reading::MAX_MESSAGE_BYTES;

use crate::LiveTap;
use crate::auth::{AllowAll, Authorizer};

/// Milliseconds since the Unix epoch. Injected so that tests can pin
/// `received_at`, which decides lateness downstream.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The wall clock, in ms since the Unix epoch.
pub fn wall_clock() -> Clock {
    Arc::new(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    })
}

/// The processors' bounds on a reading's time, as the endpoint needs them: a
/// message with a reading the core may refuse after the stream (`too_late`,
/// `in_future`) carries the client id and the raw payload for the dead
/// letter. The rule is the core's own, so the two cannot drift apart.
pub use rollup::LatenessConfig;

/// How records are gathered into puts to the stream: the endpoint's and the
/// bridge's appender share it.
#[derive(Debug, Clone)]
pub struct GroupCommit {
    /// The least time between the starts of two `put`s. Zero (the default)
    /// puts as soon as a slot in flight is free; records arriving while every
    /// slot is busy gather into the next put, which is all the batching an
    /// embedded log needs. A stream that bills or throttles per call may want
    /// a few milliseconds.
    pub commit_interval: Duration,
    /// `commit_interval` holds only while at least this many connections
    /// are open; with fewer, puts start as soon as a slot is free. A few
    /// publishers that wait for their acknowledgements send nothing while a
    /// put is held, so holding only slows them; many devices publishing on
    /// their own schedule keep sending, and holding turns their many small
    /// syncs into fewer larger ones. Zero: the interval always holds.
    pub commit_interval_min_connections: u64,
    /// A batch is put early once it holds this many records...
    pub commit_max_records: usize,
    /// ...or this many bytes of record data.
    pub commit_max_bytes: usize,
    /// Puts in flight at once, at most (the stream may allow fewer): more
    /// lets a record start its put while earlier ones are still syncing, which
    /// is what bounds throughput when few connections keep many messages in
    /// flight.
    pub max_puts_in_flight: usize,
    /// First wait before retrying a failed append; doubles up to the max.
    pub retry_backoff_min: Duration,
    pub retry_backoff_max: Duration,
}

impl Default for GroupCommit {
    fn default() -> Self {
        GroupCommit {
            commit_interval: Duration::ZERO,
            commit_interval_min_connections: 0,
            commit_max_records: 5000,
            commit_max_bytes: 8 << 20,
            max_puts_in_flight: 4,
            retry_backoff_min: Duration::from_millis(10),
            retry_backoff_max: Duration::from_secs(1),
        }
    }
}

/// How the endpoint behaves. Build with `EndpointConfig::default()` and
/// override fields.
#[derive(Clone)]
pub struct EndpointConfig {
    /// The largest MQTT packet read, fixed header included. It leaves room
    /// above the 128 KiB payload limit for the topic, properties and header, so
    /// that a payload just over the limit is still read and dead-lettered as
    /// `too_large` with its topic; anything bigger closes the connection
    /// before it is buffered.
    pub max_packet_bytes: usize,
    /// Records a connection may have waiting for the stream (QoS 0 and 1).
    /// At the limit the endpoint stops reading that socket, which is what slows
    /// a device down; it is also the Receive Maximum advertised to MQTT 5.
    pub max_inflight: usize,
    /// How accepted records are gathered into puts to the stream.
    pub group_commit: GroupCommit,
    /// The longest keepalive honoured, in seconds. A client asking for 0 (no
    /// keepalive) or more is held to this (IoT Core's 1200 s); MQTT 5 clients
    /// are told so with Server Keep Alive. A connection silent for 1.5 ×
    /// keepalive is closed.
    pub max_keepalive_secs: u16,
    /// How long a new TCP connection may take to send its CONNECT.
    pub connect_timeout: Duration,
    /// How long one socket write may block before the connection is dropped,
    /// so a client that stops reading cannot stall shutdown.
    pub write_timeout: Duration,
    /// Connections served at once; more are closed on accept and counted.
    pub max_connections: usize,
    /// Messages queued per live-tap subscriber; beyond it messages for that
    /// subscriber are dropped and counted, never slowing ingest.
    pub tap_queue: usize,
    /// The live tap, shared with whatever else in the process publishes on
    /// it (alerts); a tap of its own by default.
    pub tap: LiveTap,
    /// After shutdown is requested, how long the appender keeps retrying
    /// records the stream refuses before giving up on them (they stay
    /// unacknowledged, so devices resend them).
    pub shutdown_timeout: Duration,
    /// Stamps `received_at`; the wall clock by default.
    pub now_ms: Clock,
    /// Who may connect and where they may publish; allows everything by
    /// default.
    pub authorizer: Arc<dyn Authorizer>,
    pub lateness: LatenessConfig,
    /// Append a presence record when a device connects, disconnects, or
    /// loses a connection that left a Last Will. Off by default here, so
    /// that the stream holds only what devices published; `iotpipe up`
    /// turns it on (`mqtt.presence`).
    pub presence: bool,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        EndpointConfig {
            max_packet_bytes: MAX_MESSAGE_BYTES + 4096,
            max_inflight: 1000,
            group_commit: GroupCommit::default(),
            max_keepalive_secs: 1200,
            connect_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            tap_queue: 1000,
            tap: LiveTap::default(),
            shutdown_timeout: Duration::from_secs(10),
            now_ms: wall_clock(),
            authorizer: Arc::new(AllowAll),
            lateness: LatenessConfig::default(),
            presence: false,
        }
    }
}

impl fmt::Debug for EndpointConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointConfig")
            .field("max_packet_bytes", &self.max_packet_bytes)
            .field("max_inflight", &self.max_inflight)
            .field("group_commit", &self.group_commit)
            .field("max_keepalive_secs", &self.max_keepalive_secs)
            .field("connect_timeout", &self.connect_timeout)
            .field("write_timeout", &self.write_timeout)
            .field("max_connections", &self.max_connections)
            .field("tap_queue", &self.tap_queue)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .finish_non_exhaustive()
    }
}
