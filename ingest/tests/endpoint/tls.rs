//! TLS listeners and the per-device policy: a device may publish only as
//! itself, whether it proves who it is with a password or a client
//! certificate, over MQTT 3.1.1 and 5, over TCP and TLS.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Result, bail};
use ingest::{Authorizer, ClientCertificates, UsersFile};
use rumqttc::v5::mqttbytes::v5::{self, PubAckReason};
use schemas::{RejectReason, StreamRecord};

use crate::common::*;
use testkit::{ClientCert, Pki};

/// How a test client reaches the endpoint and who it says it is.
#[derive(Clone)]
struct Login {
    addr: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
    credentials: Option<(&'static str, &'static str)>,
}

impl Login {
    fn v4(&self, id: &str) -> rumqttc::MqttOptions {
        let mut o = v4_options(self.addr, id);
        if let Some(tls) = &self.tls {
            o.set_transport(testkit::transport(tls.clone()));
        }
        if let Some((user, password)) = self.credentials {
            o.set_credentials(user, password);
        }
        o
    }

    fn v5(&self, id: &str) -> rumqttc::v5::MqttOptions {
        let mut o = v5_options(self.addr, id);
        if let Some(tls) = &self.tls {
            o.set_transport(testkit::transport(tls.clone()));
        }
        if let Some((user, password)) = self.credentials {
            o.set_credentials(user, password);
        }
        o
    }
}

fn users() -> Result<UsersFile> {
    Ok(UsersFile::parse(&format!(
        "{}\n{}\n",
        UsersFile::entry("dev-1", "token-1", b"salt-1"),
        UsersFile::entry("dev-2", "token-2", b"salt-2"),
    ))?)
}

async fn start_tls(
    pki: &Pki,
    authorizer: impl Authorizer,
    client_ca: bool,
    require: bool,
) -> Result<Endpoint> {
    let mut cfg = config();
    cfg.authorizer = Arc::new(authorizer);
    start_on(cfg, Some(pki.server(client_ca, require))).await
}

/// `dev-1` publishes as itself, then as `dev-2`: under 3.1.1 the first is
/// acknowledged and the second cuts the connection off; both are stored, the
/// second as an `unauthorized` dead letter naming the client.
async fn v4_only_as_itself(ep: &Endpoint, login: &Login, id: &str) -> Result<()> {
    let before = ep.producer.records().len();
    let mut c = V4::connect_with(login.v4(id)).await?;
    c.publish_as_dev1_then_dev2().await?;
    ep.producer.wait_stored(before + 2, WAIT).await?;
    let records = ep.producer.records();
    assert_eq!(records[before].data.as_ref(), record_bytes("dev-1", 1));
    let StreamRecord::Rejected(m) = schemas::decode_record(&records[before + 1].data)? else {
        bail!("not a dead letter");
    };
    assert_eq!(
        (m.reason, m.client_id.as_str()),
        (RejectReason::Unauthorized, id)
    );
    Ok(())
}

/// The same under MQTT 5: the refusal is a PUBACK with reason 0x87 and the
/// connection stays up.
async fn v5_only_as_itself(ep: &Endpoint, login: &Login, id: &str) -> Result<()> {
    let refused = ep.snapshot().rejected(RejectReason::Unauthorized);
    let mut c = V5::connect_with(login.v5(id)).await?;
    assert_eq!(
        c.publish_as(&["dev-2", "dev-1"]).await?,
        vec![(1, PubAckReason::NotAuthorized), (2, PubAckReason::Success)]
    );
    assert_eq!(
        ep.snapshot().rejected(RejectReason::Unauthorized),
        refused + 1
    );
    Ok(())
}

#[tokio::test]
async fn with_passwords_a_device_publishes_only_as_itself_over_tcp_and_tls() -> Result<()> {
    let pki = Pki::new()?;
    let ep = start_tls(&pki, users()?, false, false).await?;
    let tls_addr = ep.tls_addr.unwrap_or(ep.addr);
    let tls = Some(pki.client_config(None)?);
    for (addr, tls) in [(ep.addr, None), (tls_addr, tls)] {
        let login = Login {
            addr,
            tls,
            credentials: Some(("dev-1", "token-1")),
        };
        v4_only_as_itself(&ep, &login, "c-v4").await?;
        v5_only_as_itself(&ep, &login, "c-v5").await?;
    }
    assert_eq!(ep.snapshot().rejected(RejectReason::Unauthorized), 4);
    assert_eq!(ep.snapshot().tls_handshake_failures, 0);
    ep.stop().await
}

#[tokio::test]
async fn with_client_certificates_the_cn_is_the_device() -> Result<()> {
    let pki = Pki::new()?;
    let ep = start_tls(&pki, ClientCertificates, true, true).await?;
    let dev1: ClientCert = pki.client("dev-1")?;
    let login = Login {
        addr: ep.tls_addr.unwrap_or(ep.addr),
        tls: Some(pki.client_config(Some(&dev1))?),
        credentials: None,
    };
    v4_only_as_itself(&ep, &login, "cert-v4").await?;
    v5_only_as_itself(&ep, &login, "cert-v5").await?;
    assert_eq!(ep.snapshot().rejected(RejectReason::Unauthorized), 2);

    // A username may repeat the certificate's name, never contradict it.
    let same = Login {
        credentials: Some(("dev-1", "")),
        ..login.clone()
    };
    V4::connect_with(same.v4("same")).await?;
    let other = Login {
        credentials: Some(("dev-2", "token-2")),
        ..login.clone()
    };
    assert!(V4::connect_with(other.v4("other")).await.is_err());

    // Plain TCP carries no certificate, so nobody is anyone there.
    let plain = Login {
        addr: ep.addr,
        tls: None,
        credentials: Some(("dev-1", "token-1")),
    };
    assert!(V4::connect_with(plain.v4("plain")).await.is_err());
    assert_eq!(ep.snapshot().connects_refused, 2);
    ep.stop().await
}

#[tokio::test]
async fn with_client_certificates_only_an_operator_unit_may_watch_the_fleet() -> Result<()> {
    let pki = Pki::new()?;
    let ep = start_tls(&pki, ClientCertificates, true, true).await?;
    let addr = ep.tls_addr.unwrap_or(ep.addr);
    let granted = v5::SubscribeReasonCode::Success(rumqttc::v5::mqttbytes::QoS::AtMostOnce);
    for (cert, codes) in [
        (
            pki.client("dev-2")?,
            [v5::SubscribeReasonCode::NotAuthorized, granted],
        ),
        (pki.operator_client("ops")?, [granted, granted]),
    ] {
        let login = Login {
            addr,
            tls: Some(pki.client_config(Some(&cert))?),
            credentials: None,
        };
        let mut c = V5::connect_with(login.v5("watcher")).await?;
        assert_eq!(
            c.suback(&["dt/#", "dt/+/dev-2/telemetry"]).await?,
            codes,
            "{}",
            cert.cert.display()
        );
    }
    ep.stop().await
}

#[tokio::test]
async fn a_required_certificate_must_be_present_and_trusted() -> Result<()> {
    let pki = Pki::new()?;
    let ep = start_tls(&pki, ClientCertificates, true, true).await?;
    let addr = ep.tls_addr.unwrap_or(ep.addr);
    let rogue = pki.rogue_client("dev-1")?;
    for tls in [pki.client_config(None)?, pki.client_config(Some(&rogue))?] {
        let login = Login {
            addr,
            tls: Some(tls),
            credentials: None,
        };
        assert!(V4::connect_with(login.v4("x")).await.is_err());
    }
    // A client speaking plain MQTT to the TLS port fails the handshake too.
    let mut raw = Raw::open(addr).await?;
    raw.send_v4(rumqttc::mqttbytes::v4::Packet::Connect(
        rumqttc::mqttbytes::v4::Connect::new("plain"),
    ))
    .await?;
    assert!(!matches!(raw.recv_v4().await, Ok(Some(_))));
    eventually("three failed handshakes", || {
        ep.snapshot().tls_handshake_failures == 3
    })
    .await?;
    assert!(ep.producer.records().is_empty());
    ep.stop().await
}

#[tokio::test]
async fn an_optional_certificate_or_a_password_identifies_a_device() -> Result<()> {
    let pki = Pki::new()?;
    let ep = start_tls(&pki, users()?, true, false).await?;
    let addr = ep.tls_addr.unwrap_or(ep.addr);
    let dev2 = pki.client("dev-2")?;
    let by_cert = Login {
        addr,
        tls: Some(pki.client_config(Some(&dev2))?),
        credentials: None,
    };
    let by_password = Login {
        addr,
        tls: Some(pki.client_config(None)?),
        credentials: Some(("dev-1", "token-1")),
    };
    let no_one = Login {
        credentials: None,
        ..by_password.clone()
    };
    assert!(V4::connect_with(no_one.v4("nobody")).await.is_err());
    v4_only_as_itself(&ep, &by_password, "pw").await?;
    let mut c = V5::connect_with(by_cert.v5("cert")).await?;
    assert_eq!(
        c.publish_as(&["dev-2", "dev-1"]).await?,
        vec![(1, PubAckReason::Success), (2, PubAckReason::NotAuthorized)]
    );
    ep.stop().await
}
