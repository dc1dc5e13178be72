//! The external-broker bridge against a real Mosquitto: every message is
//! appended before the broker hears it acknowledged, and what was not
//! acknowledged comes back to the next bridge on the same session.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ingest::bridge::{self, BridgeConfig};
use ingest::{IngestMetrics, MetricsSnapshot};
use rumqttc::QoS;
use schemas::{RejectReason, StreamRecord};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use testkit::MemoryProducer;
use testkit::mosquitto::Mosquitto;

const WAIT: Duration = Duration::from_secs(10);

fn payload(seq: u64) -> String {
    format!(r#"{{"seq": {seq}, "ts": 1764240000123, "metrics": {{"t": 1.5}}}}"#)
}

struct Running {
    producer: Arc<MemoryProducer>,
    metrics: Arc<IngestMetrics>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

fn config(broker: &Mosquitto, client_id: &str) -> Result<BridgeConfig> {
    let mut c = BridgeConfig::new(&format!("mqtt://{}", broker.addr))?;
    c.client_id = client_id.into();
    c.now_ms = Arc::new(|| 1_764_240_000_500);
    c.reconnect_backoff_min = Duration::from_millis(20);
    Ok(c)
}

async fn start_bridge(config: BridgeConfig) -> Result<Running> {
    let producer = Arc::new(MemoryProducer::new());
    let metrics = Arc::new(IngestMetrics::new());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(bridge::run(
        config,
        producer.clone(),
        metrics.clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    let running = Running {
        producer,
        metrics,
        stop,
        task,
    };
    eventually("the bridge to subscribe", || {
        running.snapshot().bridge_subscribed == 1
    })
    .await?;
    Ok(running)
}

impl Running {
    fn snapshot(&self) -> MetricsSnapshot {
        self.metrics.snapshot()
    }

    async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        tokio::time::timeout(WAIT, self.task)
            .await
            .context("the bridge did not stop")??;
        Ok(())
    }
}

async fn eventually(what: &str, condition: impl FnMut() -> bool) -> Result<()> {
    testkit::eventually(what, WAIT, condition).await
}

/// Publishes `seqs` from `dev-1` at QoS 1 and waits for the broker's PUBACKs.
async fn publish(
    broker: &Mosquitto,
    seqs: std::ops::Range<u64>,
    body: impl Fn(u64) -> String + Send + 'static,
) -> Result<()> {
    let mut o = rumqttc::MqttOptions::new("dev-1", "127.0.0.1", broker.addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(o, 1000);
    let n = seqs.end - seqs.start;
    let publisher = tokio::spawn(async move {
        for seq in seqs {
            client
                .publish("dt/f/dev-1/telemetry", QoS::AtLeastOnce, false, body(seq))
                .await?;
        }
        anyhow::Ok(client)
    });
    let mut acked = 0;
    tokio::time::timeout(WAIT, async {
        while acked < n {
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = eventloop.poll().await? {
                acked += 1;
            }
        }
        anyhow::Ok(())
    })
    .await
    .context("PUBACKs from the broker")??;
    let client = publisher.await??;
    client.disconnect().await?;
    Ok(())
}

fn seqs(producer: &MemoryProducer) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    for r in producer.records() {
        match schemas::decode_record(&r.data)? {
            StreamRecord::Readings(p) => out.extend(p.readings.iter().filter_map(|r| r.seq)),
            StreamRecord::Rejected(m) => bail!("unexpected dead letter: {m:?}"),
            StreamRecord::Presence(p) => bail!("unexpected presence: {p:?}"),
        }
    }
    out.sort_unstable();
    Ok(out)
}

#[tokio::test]
async fn every_message_is_appended_then_acknowledged_once() -> Result<()> {
    let broker = Mosquitto::start("max_inflight_messages 100")?;
    let first = start_bridge(config(&broker, "bridge-a")?).await?;
    publish(&broker, 0..300, payload).await?;
    first.producer.wait_stored(300, WAIT).await?;
    assert_eq!(seqs(&first.producer)?, (0..300).collect::<Vec<_>>());
    eventually("300 acks", || first.snapshot().acks_sent == 300).await?;
    assert!(
        first.producer.puts() < 300,
        "no group commit: {} puts",
        first.producer.puts()
    );
    first.stop().await?;

    // The session holds nothing more: the next bridge sees only new messages.
    let second = start_bridge(config(&broker, "bridge-a")?).await?;
    publish(&broker, 1000..1001, payload).await?;
    second.producer.wait_stored(1, WAIT).await?;
    assert_eq!(seqs(&second.producer)?, vec![1000]);
    second.stop().await
}

#[tokio::test]
async fn what_was_not_durable_is_delivered_again_to_the_next_bridge() -> Result<()> {
    let broker = Mosquitto::start("max_inflight_messages 20")?;
    let mut cfg = config(&broker, "bridge-b")?;
    cfg.shutdown_timeout = Duration::ZERO;
    let first = start_bridge(cfg.clone()).await?;
    first.producer.hold();
    publish(&broker, 0..50, payload).await?;
    first.producer.wait_puts_begun(1, WAIT).await?;
    assert_eq!(first.snapshot().acks_sent, 0);
    // Shutdown gives up at once on appends the stream has not finished.
    let held = first.producer.clone();
    first.stop().await?;
    assert!(held.records().is_empty());

    let second = start_bridge(cfg).await?;
    second.producer.wait_stored(50, WAIT).await?;
    assert_eq!(seqs(&second.producer)?, (0..50).collect::<Vec<_>>());
    eventually("50 acks", || second.snapshot().acks_sent == 50).await?;
    second.stop().await
}

#[tokio::test]
async fn refused_messages_are_dead_lettered_and_acknowledged() -> Result<()> {
    let broker = Mosquitto::start("")?;
    let bridge = start_bridge(config(&broker, "bridge-c")?).await?;
    publish(&broker, 0..1, |_| "{not json".to_string()).await?;
    bridge.producer.wait_stored(1, WAIT).await?;
    let records = bridge.producer.records();
    let StreamRecord::Rejected(m) = schemas::decode_record(&records[0].data)? else {
        bail!("not a dead letter");
    };
    assert_eq!(m.reason, RejectReason::MalformedJson);
    assert_eq!(m.client_id, "bridge-c");
    assert_eq!(records[0].partition_key, "dev-1");
    eventually("the ack", || bridge.snapshot().acks_sent == 1).await?;
    assert_eq!(bridge.snapshot().rejected(RejectReason::MalformedJson), 1);
    bridge.stop().await
}

/// A device as the documented ACL knows it: logged in as `id`, with a will
/// of `offline` on `will` if given. `None` when the broker refused it.
async fn device(
    broker: &Mosquitto,
    id: &str,
    will: Option<&str>,
) -> Result<Option<(rumqttc::AsyncClient, rumqttc::EventLoop)>> {
    let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", broker.addr.port());
    o.set_credentials(id, "");
    o.set_keep_alive(Duration::from_secs(30));
    if let Some(topic) = will {
        o.set_last_will(rumqttc::LastWill::new(
            topic,
            "offline",
            QoS::AtLeastOnce,
            false,
        ));
    }
    let (client, mut eventloop) = rumqttc::AsyncClient::new(o, 10);
    match tokio::time::timeout(WAIT, eventloop.poll()).await? {
        Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => Ok(Some((client, eventloop))),
        Err(rumqttc::ConnectionError::ConnectionRefused(_)) => Ok(None),
        other => bail!("expected CONNACK, got {other:?}"),
    }
}

/// Publishes `payload` to `topic` at QoS 1 and waits for the broker's
/// PUBACK, which Mosquitto sends for a publish its ACL denies too.
async fn say(
    (client, eventloop): &mut (rumqttc::AsyncClient, rumqttc::EventLoop),
    topic: &str,
    payload: &str,
    retain: bool,
) -> Result<()> {
    client
        .publish(topic, QoS::AtLeastOnce, retain, payload.to_string())
        .await?;
    tokio::time::timeout(WAIT, async {
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = eventloop.poll().await? {
                return anyhow::Ok(());
            }
        }
    })
    .await
    .context("PUBACK from the broker")?
}

/// The presence records stored, by device.
fn presences(producer: &MemoryProducer) -> Result<Vec<schemas::Presence>> {
    let mut out = Vec::new();
    for r in producer.records() {
        match schemas::decode_record(&r.data)? {
            StreamRecord::Presence(p) => out.push(p),
            other => bail!("unexpected record: {other:?}"),
        }
    }
    Ok(out)
}

/// Behind the documented ACL: `online` on a device's status topic is a
/// connect and its will is a disconnect, as the endpoint records them; a
/// device saying another's status (a publish or a will) is refused or
/// ignored; and a retained status, delivered again at every SUBSCRIBE, is
/// acknowledged without a record.
#[tokio::test]
async fn status_topics_are_presence_and_a_device_speaks_only_for_itself() -> Result<()> {
    use schemas::PresenceEvent;
    use schemas::presence::STATUS_OFFLINE;

    let broker = Mosquitto::start_with_acl("")?;
    // Retained before the bridge subscribes: it comes with the SUBACK.
    let mut r = device(&broker, "dev-r", None).await?.context("dev-r")?;
    say(&mut r, "dt/f/dev-r/status", "online", true).await?;
    let mut cfg = config(&broker, "bridge-p")?;
    cfg.presence = true;
    cfg.username = Some("iotpipe-bridge".into());
    let bridge = start_bridge(cfg).await?;

    // dev-a tries to take dev-b offline, with its will and with a publish.
    if let Some(mut a) = device(&broker, "dev-a", Some("dt/f/dev-b/status")).await? {
        say(&mut a, "dt/f/dev-b/status", "offline", false).await?;
        drop(a); // No DISCONNECT: the broker would send the will now.
    }
    // dev-c leaves with its will on its own topic.
    let mut c = device(&broker, "dev-c", Some("dt/f/dev-c/status"))
        .await?
        .context("dev-c")?;
    say(&mut c, "dt/f/dev-c/status", "online", false).await?;
    drop(c);
    say(&mut r, "dt/f/dev-r/status", "offline", true).await?;
    // Last: by then the broker has dealt with dev-a's first connection.
    let mut a = device(&broker, "dev-a", None).await?.context("dev-a")?;
    say(&mut a, "dt/f/dev-a/status", "online", false).await?;

    bridge.producer.wait_stored(4, WAIT).await?;
    let offline = PresenceEvent::Disconnected {
        reason: STATUS_OFFLINE.into(),
    };
    let of = |device: &str| -> Result<Vec<(Option<String>, PresenceEvent)>> {
        Ok(presences(&bridge.producer)?
            .into_iter()
            .filter(|p| p.device_id == device)
            .map(|p| (p.fleet, p.event))
            .collect())
    };
    let f = || Some("f".to_string());
    assert_eq!(
        of("dev-c")?,
        [(f(), PresenceEvent::Connected), (f(), offline.clone())]
    );
    assert_eq!(
        of("dev-r")?,
        [(f(), offline)],
        "the retained copy is not taken"
    );
    assert_eq!(of("dev-a")?, [(f(), PresenceEvent::Connected)]);
    assert_eq!(of("dev-b")?, [], "dev-a spoke for dev-b");
    assert_eq!(presences(&bridge.producer)?.len(), 4);
    // Four records and the retained copy: five QoS 1 deliveries acked.
    eventually("5 acks", || bridge.snapshot().acks_sent == 5).await?;
    bridge.stop().await
}
