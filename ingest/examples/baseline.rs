//! The broker-only baseline of `scripts/bench`: a subscriber that only
//! counts what a broker delivers on `dt/+/+/telemetry`, so that pipeline
//! throughput can be stated as a share of the raw MQTT path on the same
//! machine in the same run.
//!
//! ```text
//! # count what an external broker (Mosquitto) delivers, subscribed at QoS 1
//! cargo run --release -p ingest --example baseline -- count mqtt://127.0.0.1:1883 1
//! # run an embedded rumqttd on ADDR and count on its in-process link
//! cargo run --release -p ingest --example baseline -- rumqttd 127.0.0.1:1884
//! ```
//!
//! It prints `ready` once subscribed, then, when no message has come for two
//! seconds after the first, one JSON line: messages received and the rate
//! between the first and the last.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const TOPIC: &str = "dt/+/+/telemetry";
const IDLE: Duration = Duration::from_secs(2);

struct Count {
    received: u64,
    first: Option<Instant>,
    last: Instant,
}

impl Count {
    fn new() -> Count {
        Count {
            received: 0,
            first: None,
            last: Instant::now(),
        }
    }

    fn one(&mut self) {
        let now = Instant::now();
        self.first.get_or_insert(now);
        self.last = now;
        self.received += 1;
    }

    fn idle(&self) -> bool {
        self.first.is_some() && self.last.elapsed() >= IDLE
    }

    fn report(&self) {
        let secs = self
            .first
            .map(|f| (self.last - f).as_secs_f64())
            .unwrap_or(0.0);
        let rate = if secs > 0.0 {
            self.received as f64 / secs
        } else {
            0.0
        };
        println!(
            "{}",
            serde_json::json!({
                "received": self.received,
                "seconds": secs,
                "msgs_per_s": rate,
            })
        );
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("count") => {
            let url = args.get(1).context("count needs a broker URL")?;
            let qos = match args.get(2).map(String::as_str) {
                Some("0") => QoS::AtMostOnce,
                _ => QoS::AtLeastOnce,
            };
            count(url, qos).await
        }
        Some("rumqttd") => rumqttd(args.get(1).context("rumqttd needs a listen address")?).await,
        _ => bail!("usage: baseline count URL [QOS] | baseline rumqttd ADDR"),
    }
}

async fn count(url: &str, qos: QoS) -> Result<()> {
    let addr = url.strip_prefix("mqtt://").context("mqtt://HOST:PORT")?;
    let (host, port) = addr.rsplit_once(':').context("mqtt://HOST:PORT")?;
    let mut opts = MqttOptions::new("iotpipe-baseline", host, port.parse::<u16>()?);
    opts.set_keep_alive(Duration::from_secs(60));
    opts.set_max_packet_size(256 * 1024, 256 * 1024);
    opts.set_inflight(u16::MAX);
    let (client, mut events) = AsyncClient::new(opts, 100_000);
    client.subscribe(TOPIC, qos).await?;
    let mut c = Count::new();
    loop {
        match tokio::time::timeout(Duration::from_millis(200), events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => println!("ready"),
            Ok(Ok(Event::Incoming(Packet::Publish(_)))) => c.one(),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("subscriber: {e}"),
            Err(_) => {}
        }
        if c.idle() {
            c.report();
            return Ok(());
        }
    }
}

async fn rumqttd(listen: &str) -> Result<()> {
    let (_link_tx, mut link_rx) =
        testkit::rumqttd::start(listen, 20010, 500, "iotpipe-baseline", TOPIC)?;
    println!("ready");
    let mut c = Count::new();
    loop {
        match tokio::time::timeout(Duration::from_millis(200), link_rx.next()).await {
            Ok(Ok(Some(n))) => {
                if matches!(n, rumqttd::Notification::Forward(_)) {
                    c.one();
                }
                while let Ok(Some(n)) = link_rx.recv_deadline(Instant::now()) {
                    if matches!(n, rumqttd::Notification::Forward(_)) {
                        c.one();
                    }
                }
                // Without this the router stops forwarding after a few
                // hundred messages.
                let _ = link_rx.ready();
            }
            Ok(Ok(None)) => {
                let _ = link_rx.ready();
            }
            Ok(Err(e)) => bail!("the link failed: {e}"),
            Err(_) => {}
        }
        if c.idle() {
            c.report();
            return Ok(());
        }
    }
}
