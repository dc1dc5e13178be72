//! The live tap seen by `mosquitto_sub`: accepted telemetry, once durable,
//! and never refusals.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::harness::*;
use testkit::mosquitto::require;

async fn watch(ep: &Endpoint, tls: bool, version: u8) -> Result<()> {
    require("mosquitto_sub", "apt-get install -y mosquitto-clients")?;
    let addr = if tls { ep.tls } else { ep.tcp };
    // Line-buffered: stdout is a pipe, and the SUBACK line must arrive
    // before anything is published.
    require("stdbuf", "apt-get install -y coreutils")?;
    let mut c = tokio::process::Command::new("stdbuf");
    c.args([
        "-oL",
        "mosquitto_sub",
        "-d",
        "-v",
        "-C",
        "3",
        "-h",
        "127.0.0.1",
        "-p",
    ])
    .arg(addr.port().to_string())
    .args(["-V", if version == 5 { "mqttv5" } else { "mqttv311" }])
    .args(["-t", "dt/+/+/telemetry", "-u", OPERATOR.0, "-P", OPERATOR.1])
    .args(["-i", &format!("watcher-{version}-{tls}")]);
    if tls {
        c.arg("--cafile").arg(&ep.pki.ca_cert);
    }
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
    // Subscribed once its SUBACK is in.
    tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await? {
            if line.contains("received SUBACK") {
                return Ok(());
            }
        }
        bail!("mosquitto_sub ended before subscribing")
    })
    .await
    .context("no SUBACK")??;

    // A refused message between accepted ones must not be shown.
    let base = if tls { 100 } else { 0 } + u64::from(version) * 10;
    let bodies = [
        payload(base),
        "{not json".to_string(),
        payload(base + 1),
        payload(base + 2),
    ];
    for (i, body) in bodies.iter().enumerate() {
        let run = Run {
            addr: ep.tcp,
            tls: false,
            client_cert: None,
            version: 4,
            qos: 1,
            login: Some(DEV1),
            client_id: format!("tap-pub-{base}-{i}"),
            publishes: vec![(topic("dev-1"), body.clone())],
        };
        run_rumqttc(&run).await?;
    }
    let mut shown = Vec::new();
    tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await? {
            if let Some(rest) = line.strip_prefix("dt/f/dev-1/telemetry ") {
                shown.push(rest.to_string());
            }
        }
        anyhow::Ok(())
    })
    .await
    .context("mosquitto_sub did not get three messages")??;
    let status = child.wait().await?;
    assert!(status.success(), "mosquitto_sub: {status:?}");
    assert_eq!(
        shown,
        vec![payload(base), payload(base + 1), payload(base + 2)]
    );
    Ok(())
}

/// Publishes with rumqttc at QoS 1 and waits for the PUBACK (or, for a
/// refused message, the PUBACK that records its refusal).
async fn run_rumqttc(run: &Run<'_>) -> Result<()> {
    let mut o = rumqttc::MqttOptions::new(&run.client_id, "127.0.0.1", run.addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    if let Some((user, password)) = run.login {
        o.set_credentials(user, password);
    }
    let (client, mut eventloop) = rumqttc::AsyncClient::new(o, 10);
    for (topic, body) in &run.publishes {
        client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, body.clone())
            .await?;
    }
    let mut acked = 0;
    tokio::time::timeout(WAIT, async {
        while acked < run.publishes.len() {
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = eventloop.poll().await? {
                acked += 1;
            }
        }
        anyhow::Ok(())
    })
    .await
    .context("PUBACKs")??;
    client.disconnect().await?;
    Ok(())
}

#[tokio::test]
async fn mosquitto_sub_sees_accepted_telemetry_over_tcp_and_tls() -> Result<()> {
    let ep = Endpoint::start().await?;
    watch(&ep, false, 4).await?;
    watch(&ep, true, 5).await?;
    ep.stop().await
}
