//! The per-device policy from a users file: who connects, where they publish.

use std::sync::Arc;

use anyhow::Result;
use ingest::UsersFile;
use rumqttc::QoS;
use rumqttc::v5::mqttbytes::v5::PubAckReason;
use schemas::{RejectReason, StreamRecord};

use crate::common::*;

async fn start_with_users() -> Result<Endpoint> {
    let users = UsersFile::parse(&format!(
        "{}\n{}\n",
        UsersFile::entry("dev-1", "token-1", b"salt-1"),
        UsersFile::entry("dev-2", "token-2", b"salt-2"),
    ))?;
    let mut cfg = config();
    cfg.authorizer = Arc::new(users);
    start(cfg).await
}

#[tokio::test]
async fn a_v4_device_publishes_as_itself_and_is_cut_off_otherwise() -> Result<()> {
    let ep = start_with_users().await?;
    let mut options = v4_options(ep.addr, "c1");
    options.set_credentials("dev-1", "token-1");
    let mut c = V4::connect_with(options).await?;
    c.client
        .publish("dt/f/dev-1/telemetry", QoS::AtLeastOnce, false, payload(1))
        .await?;
    assert_eq!(c.pubacks(1).await?, vec![1]);
    c.client
        .publish("dt/f/dev-2/telemetry", QoS::AtLeastOnce, false, payload(2))
        .await?;
    c.ended().await?;

    ep.producer.wait_stored(2, WAIT).await?;
    let records = ep.producer.records();
    assert_eq!(records[1].partition_key, "dev-2");
    let StreamRecord::Rejected(m) = schemas::decode_record(&records[1].data)? else {
        panic!("not a dead letter")
    };
    assert_eq!(m.reason, RejectReason::Unauthorized);
    assert_eq!(m.client_id, "c1");
    assert_eq!(ep.snapshot().rejected(RejectReason::Unauthorized), 1);
    ep.stop().await
}

#[tokio::test]
async fn a_v5_device_is_told_not_authorized_per_publish() -> Result<()> {
    let ep = start_with_users().await?;
    let mut options = v5_options(ep.addr, "c2");
    options.set_credentials("dev-2", "token-2");
    let mut c = V5::connect_with(options).await?;
    for device in ["dev-1", "dev-2"] {
        c.client
            .publish(
                format!("dt/f/{device}/telemetry"),
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                payload(1),
            )
            .await?;
    }
    assert_eq!(
        c.pubacks(2).await?,
        vec![(1, PubAckReason::NotAuthorized), (2, PubAckReason::Success)]
    );
    ep.stop().await
}

#[tokio::test]
async fn wrong_or_missing_credentials_are_refused_at_connect() -> Result<()> {
    let ep = start_with_users().await?;
    let mut options = v4_options(ep.addr, "c3");
    options.set_credentials("dev-1", "token-2");
    let refused = V4::connect_with(options)
        .await
        .err()
        .map(|e| format!("{e:#}"));
    assert!(
        refused
            .as_deref()
            .is_some_and(|e| e.contains("BadUserNamePassword")),
        "{refused:?}"
    );
    assert!(V4::connect(ep.addr, "anonymous").await.is_err());
    assert_eq!(ep.snapshot().connects_refused, 2);
    ep.stop().await
}
