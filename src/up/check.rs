//! What `iotpipe up` checks before it starts anything.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use processors::api::guard::Tokens;

use crate::config::{Config, StoreKind};

/// What `start_with` reads from the configuration and the files it names,
/// checked before anything starts: a bad file is reported before a listener
/// binds or a task runs, not on the way out of a half-started pipeline.
pub(super) struct CheckedConfig {
    pub(super) aggregate: Arc<rollup::AggregateConfig>,
    pub(super) tls: Option<(SocketAddr, ingest::tls::TlsAcceptor)>,
    pub(super) authorizer: Arc<dyn ingest::Authorizer>,
    pub(super) bridge: Option<ingest::bridge::BridgeConfig>,
    pub(super) tokens: Option<Tokens>,
    pub(super) alerts: Option<processors::alerts::AlertsSetup>,
}

pub(super) fn check(config: &Config) -> anyhow::Result<CheckedConfig> {
    let aggregate = Arc::new(config.aggregate()?);
    if config.backend.lease_duration < Duration::from_secs(1) {
        // Renewed three times per duration: shorter would renew in a loop.
        anyhow::bail!("backend.lease_duration must be at least 1s");
    }
    if config.backend.store == StoreKind::Postgres {
        let url = config.backend.postgres_url.as_deref().context(
            "the postgres store needs a database: --postgres-url or backend.postgres_url",
        )?;
        processors::store::postgres::parse_url(url)
            .map_err(anyhow::Error::msg)
            .context("backend.postgres_url")?;
    }
    if !config.mqtt.plain && config.mqtt.tls_listen.is_none() {
        anyhow::bail!("no MQTT listener: mqtt.plain is off and mqtt.tls_listen is not set");
    }
    let mut tls = None;
    if let Some(addr) = config.mqtt.tls_listen {
        let (Some(cert), Some(key)) = (&config.mqtt.tls_cert, &config.mqtt.tls_key) else {
            anyhow::bail!("mqtt.tls_listen needs mqtt.tls_cert and mqtt.tls_key");
        };
        let acceptor = ingest::tls::acceptor(&ingest::tls::TlsConfig {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: config.mqtt.tls_client_ca.clone(),
            require_client_cert: config.mqtt.tls_require_client_cert,
        })
        .context("MQTT TLS listener")?;
        tls = Some((addr, acceptor));
    }
    let authorizer: Arc<dyn ingest::Authorizer> = match &config.mqtt.users_file {
        Some(path) => Arc::new(
            ingest::UsersFile::load(path)
                .with_context(|| format!("MQTT users file {}", path.display()))?,
        ),
        None if config.mqtt.tls_require_client_cert => Arc::new(ingest::ClientCertificates),
        None => Arc::new(ingest::AllowAll),
    };
    let bridge = match &config.broker.url {
        None => None,
        Some(url) => {
            let mut bc = ingest::bridge::BridgeConfig::new(url)
                .with_context(|| format!("broker URL {url}"))?;
            bc.client_id.clone_from(&config.broker.client_id);
            bc.username.clone_from(&config.broker.username);
            // Presence through the broker: devices' status topics.
            bc.presence = config.mqtt.presence;
            if let Some(path) = &config.broker.password_file {
                let password = std::fs::read_to_string(path).with_context(|| {
                    format!("cannot read broker password file {}", path.display())
                })?;
                bc.password = Some(password.trim_end().to_string());
            }
            Some(bc)
        }
    };
    let tokens = match &config.http.token_file {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read API token file {}", path.display()))?;
            Some(
                Tokens::parse(&text)
                    .map_err(anyhow::Error::msg)
                    .with_context(|| format!("API token file {}", path.display()))?,
            )
        }
    };
    let alerts = config.alerts.setup(&aggregate)?;
    Ok(CheckedConfig {
        aggregate,
        tls,
        authorizer,
        bridge,
        tokens,
        alerts,
    })
}
