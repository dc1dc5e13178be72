//! A running endpoint and clients to poke it with.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use ingest::{EndpointConfig, IngestMetrics, Listener, MetricsSnapshot, serve_on};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use schemas::{Metric, PackedRecord, Reading, StreamRecord};
use testkit::MemoryProducer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// How long any single expectation may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(5);
/// The endpoint's clock in these tests.
pub const NOW: i64 = 1_764_240_000_500;

pub fn payload(seq: u64) -> String {
    format!(r#"{{"seq": {seq}, "ts": 1764240000123, "metrics": {{"temperature": 21.5}}}}"#)
}

/// The bytes the endpoint appends for `payload(seq)` from `device` in fleet `f`.
pub fn record_bytes(device: &str, seq: u64) -> Vec<u8> {
    PackedRecord {
        device_id: device.into(),
        fleet: "f".into(),
        received_at: NOW,
        readings: vec![Reading {
            seq: Some(seq),
            ts: 1_764_240_000_123,
            metrics: vec![Metric {
                name: "temperature".into(),
                value: 21.5,
            }],
        }],
    }
    .encode()
}

pub fn config() -> EndpointConfig {
    EndpointConfig {
        now_ms: Arc::new(|| NOW),
        ..EndpointConfig::default()
    }
}

pub struct Endpoint {
    pub addr: SocketAddr,
    /// The TLS listener, when started with one.
    pub tls_addr: Option<SocketAddr>,
    pub producer: Arc<MemoryProducer>,
    pub metrics: Arc<IngestMetrics>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

pub async fn start(config: EndpointConfig) -> Result<Endpoint> {
    start_on(config, None).await
}

/// An endpoint with a plain listener and, given TLS settings, a TLS one.
pub async fn start_on(
    config: EndpointConfig,
    tls: Option<ingest::tls::TlsConfig>,
) -> Result<Endpoint> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut listeners = vec![Listener::tcp(listener)];
    let mut tls_addr = None;
    if let Some(tls) = tls {
        let socket = TcpListener::bind("127.0.0.1:0").await?;
        tls_addr = Some(socket.local_addr()?);
        listeners.push(Listener::tls(socket, ingest::tls::acceptor(&tls)?));
    }
    let producer = Arc::new(MemoryProducer::new());
    let metrics = Arc::new(IngestMetrics::new());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve_on(
        listeners,
        producer.clone(),
        config,
        metrics.clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    Ok(Endpoint {
        addr,
        tls_addr,
        producer,
        metrics,
        stop: Some(stop),
        task: Some(task),
    })
}

impl Endpoint {
    pub fn snapshot(&self) -> MetricsSnapshot {
        self.metrics.snapshot()
    }

    /// Asks the endpoint to shut down, without waiting.
    pub fn request_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Shuts down and waits for `serve` to return.
    pub async fn stop(mut self) -> Result<()> {
        self.request_stop();
        let task = self.task.take().context("already stopped")?;
        tokio::time::timeout(WAIT, task)
            .await
            .context("serve did not return")???;
        Ok(())
    }

    /// Stored records, decoded.
    pub fn stored(&self) -> Result<Vec<StreamRecord>> {
        self.producer
            .records()
            .iter()
            .map(|r| schemas::decode_record(&r.data).context("an unreadable record"))
            .collect()
    }
}

pub async fn eventually(what: &str, condition: impl FnMut() -> bool) -> Result<()> {
    testkit::eventually(what, WAIT, condition).await
}

pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> Result<T> {
    tokio::time::timeout(WAIT, f)
        .await
        .with_context(|| format!("timed out waiting for {what}"))
}

/// A rumqttc event loop, of either protocol.
trait EventLoop: Send + 'static {
    type Event: Send + 'static;
    type Error: std::fmt::Display + Send + 'static;
    type Packet;
    fn next(&mut self) -> impl Future<Output = Result<Self::Event, Self::Error>> + Send + '_;
    /// The packet `event` brings in, if it is an incoming one.
    fn incoming(event: Self::Event) -> Option<Self::Packet>;
}

impl EventLoop for rumqttc::EventLoop {
    type Event = rumqttc::Event;
    type Error = rumqttc::ConnectionError;
    type Packet = v4::Packet;
    fn next(&mut self) -> impl Future<Output = Result<Self::Event, Self::Error>> + Send + '_ {
        self.poll()
    }
    fn incoming(event: rumqttc::Event) -> Option<v4::Packet> {
        match event {
            rumqttc::Event::Incoming(p) => Some(p),
            rumqttc::Event::Outgoing(_) => None,
        }
    }
}

impl EventLoop for rumqttc::v5::EventLoop {
    type Event = rumqttc::v5::Event;
    type Error = rumqttc::v5::ConnectionError;
    type Packet = v5::Packet;
    fn next(&mut self) -> impl Future<Output = Result<Self::Event, Self::Error>> + Send + '_ {
        self.poll()
    }
    fn incoming(event: rumqttc::v5::Event) -> Option<v5::Packet> {
        match event {
            rumqttc::v5::Event::Incoming(p) => Some(p),
            rumqttc::v5::Event::Outgoing(_) => None,
        }
    }
}

/// A connection's events as [`pump`] hands them over.
struct Events<L: EventLoop>(mpsc::UnboundedReceiver<Result<L::Event, L::Error>>);

impl<L: EventLoop> Events<L> {
    async fn recv(&mut self) -> Option<Result<L::Event, L::Error>> {
        self.0.recv().await
    }

    /// What `pick` makes of the first incoming packet it takes, skipping
    /// the packets it gives back `None` for.
    async fn next<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(L::Packet) -> Option<T>,
    ) -> Result<T> {
        within(what, async {
            loop {
                match self.recv().await {
                    Some(Ok(event)) => {
                        if let Some(t) = L::incoming(event).and_then(&mut pick) {
                            return Ok(t);
                        }
                    }
                    Some(Err(e)) => bail!("connection ended: {e}"),
                    None => bail!("event loop ended"),
                }
            }
        })
        .await?
    }

    /// Every incoming packet before the first that `end` is true of.
    async fn until(
        &mut self,
        what: &str,
        end: impl Fn(&L::Packet) -> bool,
    ) -> Result<Vec<L::Packet>> {
        let mut before = Vec::new();
        self.next(what, |p| {
            if end(&p) {
                return Some(());
            }
            before.push(p);
            None
        })
        .await?;
        Ok(before)
    }
}

/// Runs `eventloop` on its own task and hands over every event, until the
/// connection fails or the receiver is dropped.
fn pump<L: EventLoop>(mut eventloop: L) -> Events<L> {
    let (tx, events) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let event = eventloop.next().await;
            let failed = event.is_err();
            if tx.send(event).is_err() || failed {
                break;
            }
        }
    });
    Events(events)
}

/// A rumqttc 3.1.1 client whose event loop runs on its own task.
pub struct V4 {
    pub client: rumqttc::AsyncClient,
    events: Events<rumqttc::EventLoop>,
}

pub fn v4_options(addr: SocketAddr, id: &str) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(1 << 20, 1 << 20);
    o
}

impl V4 {
    pub async fn connect(addr: SocketAddr, id: &str) -> Result<V4> {
        Self::connect_with(v4_options(addr, id)).await
    }

    pub async fn connect_with(options: rumqttc::MqttOptions) -> Result<V4> {
        let (client, eventloop) = rumqttc::AsyncClient::new(options, 1000);
        let events = pump(eventloop);
        let mut c = V4 { client, events };
        c.incoming(|p| matches!(p, v4::Packet::ConnAck(_)))
            .await
            .context("CONNACK")?;
        Ok(c)
    }

    /// The next incoming packet matching `want`, skipping others.
    pub async fn incoming(&mut self, want: impl Fn(&v4::Packet) -> bool) -> Result<v4::Packet> {
        let wanted = |p| want(&p).then_some(p);
        self.events.next("an incoming packet", wanted).await
    }

    /// Publishes `payload(seq)` to `device`'s telemetry topic at `qos`.
    pub async fn telemetry(&self, device: &str, qos: rumqttc::QoS, seq: u64) -> Result<()> {
        self.client
            .publish(format!("dt/f/{device}/telemetry"), qos, false, payload(seq))
            .await?;
        Ok(())
    }

    /// A round trip that finds no PUBACK sent before it: nothing published
    /// so far has been acknowledged.
    pub async fn no_puback_yet(&mut self) -> Result<()> {
        let before = self.round_trip("nothing/here").await?;
        if before.iter().any(|p| matches!(p, v4::Packet::PubAck(_))) {
            bail!("acknowledged too early: {before:?}");
        }
        Ok(())
    }

    /// SUBSCRIBEs to `filters` in one packet and returns the SUBACK's codes.
    pub async fn suback(&mut self, filters: &[&str]) -> Result<Vec<v4::SubscribeReasonCode>> {
        let filters = filters
            .iter()
            .map(|f| rumqttc::SubscribeFilter::new(f.to_string(), rumqttc::QoS::AtMostOnce));
        self.client.subscribe_many(filters).await?;
        let codes = |p| match p {
            v4::Packet::SubAck(a) => Some(a.return_codes),
            _ => None,
        };
        self.events.next("a SUBACK", codes).await
    }

    /// PUBACK packet ids, the next `n` of them, in arrival order.
    pub async fn pubacks(&mut self, n: usize) -> Result<Vec<u16>> {
        let id = |p| match p {
            v4::Packet::PubAck(a) => Some(a.pkid),
            _ => None,
        };
        let mut ids = Vec::new();
        while ids.len() < n {
            ids.push(self.events.next("a PUBACK", id).await?);
        }
        Ok(ids)
    }

    /// Subscribes and waits for the SUBACK: a round trip that proves
    /// everything the endpoint sent before it has arrived.
    pub async fn round_trip(&mut self, filter: &str) -> Result<Vec<v4::Packet>> {
        self.client
            .subscribe(filter, rumqttc::QoS::AtMostOnce)
            .await?;
        let suback = |p: &v4::Packet| matches!(p, v4::Packet::SubAck(_));
        self.events.until("a SUBACK", suback).await
    }

    /// Waits for the connection to end and returns why.
    /// Publishes at QoS 1 as `dev-1`, which is acknowledged, then as
    /// `dev-2`, which a client that is `dev-1` may not: MQTT 3.1.1 has no
    /// refusal but to end the connection, and it ends.
    pub async fn publish_as_dev1_then_dev2(&mut self) -> Result<()> {
        self.client
            .publish(
                "dt/f/dev-1/telemetry",
                rumqttc::QoS::AtLeastOnce,
                false,
                payload(1),
            )
            .await?;
        assert_eq!(self.pubacks(1).await?, vec![1]);
        self.client
            .publish(
                "dt/f/dev-2/telemetry",
                rumqttc::QoS::AtLeastOnce,
                false,
                payload(2),
            )
            .await?;
        self.ended().await?;
        Ok(())
    }

    pub async fn ended(&mut self) -> Result<rumqttc::ConnectionError> {
        within("the connection to end", async {
            loop {
                match self.events.recv().await {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Ok(e),
                    None => bail!("event loop ended without an error"),
                }
            }
        })
        .await?
    }
}

/// A PUBLISH or a PUBACK a client received, whichever protocol it speaks,
/// for the tests that ask the same of both.
#[derive(Debug, PartialEq)]
pub enum Received {
    /// Its topic and payload.
    Publish(String, String),
    /// Whether it acknowledged success (MQTT 3.1.1 has nothing else).
    PubAck(bool),
}

/// A client of either protocol, as a test watching topics reads it.
pub trait Watcher {
    /// The next PUBLISH or PUBACK, skipping other packets.
    async fn received(&mut self) -> Result<Received>;

    /// Subscribes to `filter`; fails unless it is granted at QoS 0.
    async fn granted(&mut self, filter: &str) -> Result<()>;
}

impl Watcher for V4 {
    async fn received(&mut self) -> Result<Received> {
        let wanted = |p: &v4::Packet| matches!(p, v4::Packet::Publish(_) | v4::Packet::PubAck(_));
        Ok(match self.incoming(wanted).await? {
            v4::Packet::Publish(p) => {
                Received::Publish(p.topic, String::from_utf8(p.payload.to_vec())?)
            }
            _ => Received::PubAck(true),
        })
    }

    async fn granted(&mut self, filter: &str) -> Result<()> {
        let codes = self.suback(&[filter]).await?;
        let qos0 = v4::SubscribeReasonCode::Success(rumqttc::QoS::AtMostOnce);
        anyhow::ensure!(codes == [qos0], "{filter} was not granted: {codes:?}");
        Ok(())
    }
}

impl Watcher for V5 {
    async fn received(&mut self) -> Result<Received> {
        let wanted = |p: &v5::Packet| matches!(p, v5::Packet::Publish(_) | v5::Packet::PubAck(_));
        Ok(match self.incoming(wanted).await? {
            v5::Packet::Publish(p) => Received::Publish(
                String::from_utf8(p.topic.to_vec())?,
                String::from_utf8(p.payload.to_vec())?,
            ),
            v5::Packet::PubAck(a) => Received::PubAck(a.reason == v5::PubAckReason::Success),
            other => bail!("neither a PUBLISH nor a PUBACK: {other:?}"),
        })
    }

    async fn granted(&mut self, filter: &str) -> Result<()> {
        let codes = self.suback(&[filter]).await?;
        let qos0 = v5::SubscribeReasonCode::Success(rumqttc::v5::mqttbytes::QoS::AtMostOnce);
        anyhow::ensure!(codes == [qos0], "{filter} was not granted: {codes:?}");
        Ok(())
    }
}

/// A rumqttc MQTT 5 client whose event loop runs on its own task.
pub struct V5 {
    pub client: rumqttc::v5::AsyncClient,
    pub connack: v5::ConnAck,
    events: Events<rumqttc::v5::EventLoop>,
}

pub fn v5_options(addr: SocketAddr, id: &str) -> rumqttc::v5::MqttOptions {
    let mut o = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o
}

impl V5 {
    pub async fn connect(addr: SocketAddr, id: &str) -> Result<V5> {
        Self::connect_with(v5_options(addr, id)).await
    }

    pub async fn connect_with(options: rumqttc::v5::MqttOptions) -> Result<V5> {
        let (client, eventloop) = rumqttc::v5::AsyncClient::new(options, 1000);
        let events = pump(eventloop);
        let mut c = V5 {
            client,
            connack: v5::ConnAck {
                session_present: false,
                code: v5::ConnectReturnCode::Success,
                properties: None,
            },
            events,
        };
        let v5::Packet::ConnAck(ack) = c.incoming(|p| matches!(p, v5::Packet::ConnAck(_))).await?
        else {
            bail!("not a CONNACK");
        };
        c.connack = ack;
        Ok(c)
    }

    pub async fn incoming(&mut self, want: impl Fn(&v5::Packet) -> bool) -> Result<v5::Packet> {
        let wanted = |p| want(&p).then_some(p);
        self.events.next("an incoming packet", wanted).await
    }

    /// SUBSCRIBEs to `filters` in one packet and returns the SUBACK's codes.
    pub async fn suback(&mut self, filters: &[&str]) -> Result<Vec<v5::SubscribeReasonCode>> {
        let filters = filters
            .iter()
            .map(|f| v5::Filter::new(f.to_string(), rumqttc::v5::mqttbytes::QoS::AtMostOnce));
        self.client.subscribe_many(filters).await?;
        let codes = |p| match p {
            v5::Packet::SubAck(a) => Some(a.return_codes),
            _ => None,
        };
        self.events.next("a SUBACK", codes).await
    }

    /// Publishes `payload(1)` at QoS 1 to each device's telemetry topic in
    /// turn, then returns the PUBACKs, one per device.
    pub async fn publish_as(&mut self, devices: &[&str]) -> Result<Vec<(u16, v5::PubAckReason)>> {
        for device in devices {
            self.client
                .publish(
                    format!("dt/f/{device}/telemetry"),
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    false,
                    payload(1),
                )
                .await?;
        }
        self.pubacks(devices.len()).await
    }

    /// The next `n` PUBACKs as (packet id, reason), in arrival order.
    pub async fn pubacks(&mut self, n: usize) -> Result<Vec<(u16, v5::PubAckReason)>> {
        let ack = |p| match p {
            v5::Packet::PubAck(a) => Some((a.pkid, a.reason)),
            _ => None,
        };
        let mut acks = Vec::new();
        while acks.len() < n {
            acks.push(self.events.next("a PUBACK", ack).await?);
        }
        Ok(acks)
    }

    /// Subscribes and waits for the SUBACK, returning what arrived before it.
    pub async fn round_trip(&mut self, filter: &str) -> Result<Vec<v5::Packet>> {
        self.client
            .subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtMostOnce)
            .await?;
        let suback = |p: &v5::Packet| matches!(p, v5::Packet::SubAck(_));
        self.events.until("a SUBACK", suback).await
    }

    /// Waits for the server's DISCONNECT and returns its reason.
    pub async fn disconnected(&mut self) -> Result<v5::DisconnectReasonCode> {
        within("a DISCONNECT", async {
            loop {
                match self.events.recv().await {
                    Some(Ok(_)) => {}
                    Some(Err(rumqttc::v5::ConnectionError::MqttState(
                        rumqttc::v5::StateError::ServerDisconnect { reason_code, .. },
                    ))) => return Ok(reason_code),
                    Some(Err(e)) => bail!("connection ended without a DISCONNECT: {e}"),
                    None => bail!("event loop ended"),
                }
            }
        })
        .await?
    }
}

/// A client that writes whatever bytes it is given, for what rumqttc will
/// not send (wildcard topics, oversized packets, garbage, silence).
pub struct Raw {
    stream: TcpStream,
    buf: BytesMut,
}

impl Raw {
    pub async fn open(addr: SocketAddr) -> Result<Raw> {
        Ok(Raw {
            stream: TcpStream::connect(addr).await?,
            buf: BytesMut::new(),
        })
    }

    /// Opens and completes a 3.1.1 CONNECT.
    pub async fn connect_v4(addr: SocketAddr, id: &str, keepalive: u16) -> Result<Raw> {
        let mut raw = Raw::open(addr).await?;
        let mut c = v4::Connect::new(id);
        c.keep_alive = keepalive;
        raw.send_v4(v4::Packet::Connect(c)).await?;
        match raw.recv_v4().await? {
            Some(v4::Packet::ConnAck(a)) if a.code == v4::ConnectReturnCode::Success => Ok(raw),
            other => bail!("expected a successful CONNACK, got {other:?}"),
        }
    }

    /// Opens and completes an MQTT 5 CONNECT.
    pub async fn connect_v5(addr: SocketAddr, id: &str) -> Result<Raw> {
        let mut raw = Raw::open(addr).await?;
        let c = v5::Connect {
            keep_alive: 30,
            client_id: id.into(),
            clean_start: true,
            properties: None,
        };
        raw.send_v5(v5::Packet::Connect(c, None, None)).await?;
        match raw.recv_v5().await? {
            Some(v5::Packet::ConnAck(a)) if a.code == v5::ConnectReturnCode::Success => Ok(raw),
            other => bail!("expected a successful CONNACK, got {other:?}"),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).await?;
        Ok(())
    }

    pub async fn send_v4(&mut self, p: v4::Packet) -> Result<()> {
        let mut b = BytesMut::new();
        p.write(&mut b, usize::MAX)?;
        self.send(&b).await
    }

    pub async fn send_v5(&mut self, p: v5::Packet) -> Result<()> {
        let mut b = BytesMut::new();
        p.write(&mut b, None)?;
        self.send(&b).await
    }

    /// The next packet, or `None` once the server closed the connection.
    pub async fn recv_v4(&mut self) -> Result<Option<v4::Packet>> {
        within("a packet", async {
            loop {
                match v4::Packet::read(&mut self.buf, usize::MAX) {
                    Ok(p) => return Ok(Some(p)),
                    Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                    Err(e) => bail!("unreadable packet: {e}"),
                }
                if self.read_more().await? == 0 {
                    return Ok(None);
                }
            }
        })
        .await?
    }

    pub async fn recv_v5(&mut self) -> Result<Option<v5::Packet>> {
        within("a packet", async {
            loop {
                match v5::Packet::read(&mut self.buf, None) {
                    Ok(p) => return Ok(Some(p)),
                    Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
                    Err(e) => bail!("unreadable packet: {e}"),
                }
                if self.read_more().await? == 0 {
                    return Ok(None);
                }
            }
        })
        .await?
    }

    /// Reads until the server closes, failing if it sends anything.
    pub async fn expect_closed(&mut self) -> Result<()> {
        within("the server to close", async {
            match self.read_more().await? {
                0 => Ok(()),
                n => bail!("the server sent {n} bytes instead of closing"),
            }
        })
        .await?
    }

    async fn read_more(&mut self) -> Result<usize> {
        self.buf.reserve(4096);
        match self.stream.read_buf(&mut self.buf).await {
            Ok(n) => Ok(n),
            // A reset is a close too.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(0),
            Err(e) => Err(e.into()),
        }
    }
}

pub fn publish_v4(topic: &str, qos: rumqttc::QoS, pkid: u16, payload: &[u8]) -> v4::Packet {
    let mut p = v4::Publish::new(topic, qos, payload.to_vec());
    p.pkid = pkid;
    v4::Packet::Publish(p)
}
