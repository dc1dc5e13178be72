//! Presence over real MQTT: what the endpoint appends when a device
//! connects, disconnects, or drops its socket after leaving a Last Will.

use anyhow::{Result, bail};
use rumqttc::{Event, LastWill, Packet, QoS};
use schemas::presence::{CLEAN_DISCONNECT, CONNECTION_LOST};
use schemas::{Presence, PresenceEvent, StreamRecord};

use crate::common::*;

fn presence_config() -> ingest::EndpointConfig {
    ingest::EndpointConfig {
        presence: true,
        ..config()
    }
}

fn presences(records: &[StreamRecord]) -> Vec<Presence> {
    records
        .iter()
        .filter_map(|r| match r {
            StreamRecord::Presence(p) => Some(p.clone()),
            _ => None,
        })
        .collect()
}

/// Connects with `options`, publishes one reading at QoS 1 and waits for
/// its PUBACK; returns the event loop, which holds the socket.
async fn connect_and_publish(
    options: rumqttc::MqttOptions,
    device: &str,
) -> Result<(rumqttc::AsyncClient, rumqttc::EventLoop)> {
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    client
        .publish(
            format!("dt/f/{device}/telemetry"),
            QoS::AtLeastOnce,
            false,
            payload(1),
        )
        .await?;
    within("a PUBACK", async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => bail!("connection ended: {e}"),
            }
        }
    })
    .await??;
    Ok((client, eventloop))
}

#[tokio::test]
async fn a_dropped_connection_with_a_will_is_reported_offline_in_order() -> Result<()> {
    let ep = start(presence_config()).await?;
    let mut options = v4_options(ep.addr, "dev-1");
    options.set_last_will(LastWill::new(
        "dt/f/dev-1/status",
        "offline",
        QoS::AtLeastOnce,
        false,
    ));
    let (client, eventloop) = connect_and_publish(options, "dev-1").await?;
    // The socket closes with no DISCONNECT: the will's case.
    drop(eventloop);
    drop(client);
    eventually("the will's presence record", || {
        ep.stored().is_ok_and(|r| presences(&r).len() == 2)
    })
    .await?;
    let records = ep.stored()?;
    assert!(
        matches!(records[0], StreamRecord::Presence(_)),
        "{records:?}"
    );
    assert!(
        matches!(records[1], StreamRecord::Readings(_)),
        "{records:?}"
    );
    let p = presences(&records);
    assert_eq!(p[0].event, PresenceEvent::Connected);
    assert_eq!(
        p[1].event,
        PresenceEvent::Disconnected {
            reason: CONNECTION_LOST.into()
        }
    );
    for p in &p {
        assert_eq!(
            (p.device_id.as_str(), p.fleet.as_deref()),
            ("dev-1", Some("f"))
        );
        assert_eq!(p.at, NOW);
    }
    assert!(
        ep.producer
            .records()
            .iter()
            .all(|r| r.partition_key == "dev-1"),
        "presence lands on the device's partition"
    );
    ep.stop().await
}

#[tokio::test]
async fn a_clean_disconnect_is_reported_and_a_drop_without_a_will_is_not() -> Result<()> {
    let ep = start(presence_config()).await?;
    let (client, mut eventloop) =
        connect_and_publish(v4_options(ep.addr, "dev-2"), "dev-2").await?;
    client.disconnect().await?;
    within("the DISCONNECT to go out", async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await?;
    eventually("the disconnect's presence record", || {
        ep.stored().is_ok_and(|r| presences(&r).len() == 2)
    })
    .await?;
    let p = presences(&ep.stored()?);
    assert_eq!(
        p[1].event,
        PresenceEvent::Disconnected {
            reason: CLEAN_DISCONNECT.into()
        }
    );
    // No will: the fleet was learnt from the connection's publish.
    assert_eq!(p[1].fleet.as_deref(), Some("f"));

    let (client, eventloop) = connect_and_publish(v4_options(ep.addr, "dev-3"), "dev-3").await?;
    drop(eventloop);
    drop(client);
    // Once the endpoint has closed the connection, anything it appended for
    // the drop has gone to the appender, which a later PUBACK waits behind.
    eventually("the drop to be seen", || {
        ep.snapshot().connections_current == 0
    })
    .await?;
    let (_client, _eventloop) = connect_and_publish(v4_options(ep.addr, "dev-4"), "dev-4").await?;
    let dev3: Vec<Presence> = presences(&ep.stored()?)
        .into_iter()
        .filter(|p| p.device_id == "dev-3")
        .collect();
    assert_eq!(dev3.len(), 1, "{dev3:?}");
    assert_eq!(dev3[0].event, PresenceEvent::Connected);
    ep.stop().await
}
