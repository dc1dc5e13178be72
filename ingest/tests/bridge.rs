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
