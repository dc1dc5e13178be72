//! Each external client over the matrix of protocol, QoS and transport, and
//! the refusals it must understand.

use anyhow::Result;
use schemas::RejectReason;

use crate::harness::*;

/// MQTT 5's "Not authorized" PUBACK reason.
const NOT_AUTHORIZED: i64 = 0x87;

fn run_spec<'a>(
    addr: std::net::SocketAddr,
    tls: bool,
    version: u8,
    qos: u8,
    login: Option<(&'a str, &'a str)>,
    client_id: String,
    publishes: Vec<(String, String)>,
) -> Run<'a> {
    Run {
        addr,
        tls,
        client_cert: None,
        version,
        qos,
        login,
        client_id,
        publishes,
    }
}

async fn conform(tool: Tool) -> Result<()> {
    available(tool)?;
    let ep = Endpoint::start().await?;
    let name = format!("{tool:?}").to_lowercase();

    // Every combination publishes five readings, acknowledged and stored.
    let mut next = 0u64;
    for tls in [false, true] {
        for version in [4, 5] {
            for qos in [0, 1] {
                let seqs: Vec<u64> = (next..next + 5).collect();
                next += 5;
                let addr = if tls { ep.tls } else { ep.tcp };
                let run = run_spec(
                    addr,
                    tls,
                    version,
                    qos,
                    Some(DEV1),
                    format!("{name}-{version}-{qos}-{tls}"),
                    seqs.iter().map(|s| (topic("dev-1"), payload(*s))).collect(),
                );
                let out = crate::harness::run(tool, &ep.pki, &run).await?;
                assert!(
                    out.all_acked(seqs.len()),
                    "{tool:?} MQTT {version} QoS {qos} TLS {tls}: {out:?}"
                );
                ep.wait_readings("dev-1", &seqs).await?;
            }
        }
    }

    // A wrong password is refused at CONNECT, under both protocols.
    for version in [4, 5] {
        let run = run_spec(
            ep.tcp,
            false,
            version,
            1,
            Some(("dev-1", "wrong")),
            format!("{name}-badpw-{version}"),
            vec![(topic("dev-1"), payload(900))],
        );
        let out = crate::harness::run(tool, &ep.pki, &run).await?;
        assert!(
            out.connack != Some(0) && out.acks.iter().all(Option::is_none),
            "{tool:?} MQTT {version}: {out:?}"
        );
    }

    // Publishing as another device: MQTT 5 gets PUBACK 0x87, 3.1.1 is cut
    // off; neither is acknowledged as a success.
    let run = run_spec(
        ep.tls,
        true,
        5,
        1,
        Some(DEV1),
        format!("{name}-other-5"),
        vec![(topic("dev-2"), payload(901))],
    );
    let out = crate::harness::run(tool, &ep.pki, &run).await?;
    assert_eq!(out.acks, vec![Some(NOT_AUTHORIZED)], "{tool:?}: {out:?}");
    let run = Run {
        version: 4,
        client_id: format!("{name}-other-4"),
        ..run
    };
    let out = crate::harness::run(tool, &ep.pki, &run).await?;
    assert_eq!(out.acks, vec![None], "{tool:?}: {out:?}");
    assert!(out.closed, "{tool:?}: {out:?}");

    // A client certificate names the device without a password.
    let dev2 = ep.pki.client("dev-2")?;
    let run = Run {
        client_cert: Some(&dev2),
        login: None,
        version: 5,
        client_id: format!("{name}-cert"),
        publishes: vec![(topic("dev-2"), payload(902))],
        ..run
    };
    let out = crate::harness::run(tool, &ep.pki, &run).await?;
    assert!(out.all_acked(1), "{tool:?} with a certificate: {out:?}");
    ep.wait_readings("dev-2", &[902]).await?;

    let stored = ep.stored().await?;
    let mut refused: Vec<&String> = stored
        .rejected
        .iter()
        .filter(|(r, _)| *r == RejectReason::Unauthorized)
        .map(|(_, client)| client)
        .collect();
    // Disconnected for its refused publish, an MQTT 3.1.1 client may
    // reconnect and send it again as a DUP, which is refused (and
    // dead-lettered) again: paho sometimes does.
    // Every refusal, a DUP's included, is counted and dead-lettered; the
    // count is taken at the refusal, its dead letter appended after.
    let counted = ep.snapshot().rejected(RejectReason::Unauthorized);
    assert!(
        counted >= refused.len() as u64 && refused.len() >= 2,
        "{counted} counted for {} dead letters",
        refused.len()
    );
    refused.dedup();
    assert_eq!(
        refused,
        vec![&format!("{name}-other-5"), &format!("{name}-other-4")],
        "dead letters name the clients"
    );
    assert!(!stored.readings.contains(&("dev-2".into(), 901)));
    ep.stop().await
}

#[tokio::test]
async fn paho_python() -> Result<()> {
    conform(Tool::Paho).await
}

#[tokio::test]
async fn mqtt_js() -> Result<()> {
    conform(Tool::MqttJs).await
}

#[tokio::test]
async fn mosquitto_pub() -> Result<()> {
    conform(Tool::MosquittoPub).await
}
