//! Alert notifications to a webhook: an HTTP POST of the alert as JSON,
//! signed with HMAC-SHA256 under a shared secret so that the receiver can
//! tell it came from this pipeline, with an id that is the same on every
//! attempt so that it can drop a repeat.

use std::time::Duration;

use async_trait::async_trait;
use aws::backoff::Backoff;
use hmac::{KeyInit, Mac};
use schemas::state::AlertState;
use serde_json::json;

use super::Notifier;

/// The header holding `sha256=<hex HMAC-SHA256 of the body>`.
pub const SIGNATURE_HEADER: &str = "X-Iotpipe-Signature";
/// The header holding the alert's id, `{rule}/{window start}/{revision}`.
pub const ALERT_ID_HEADER: &str = "X-Iotpipe-Alert-Id";

#[derive(Clone)]
pub struct WebhookConfig {
    /// `http://…` or `https://…`.
    pub url: String,
    /// The client every attempt uses, built once from the config so that a
    /// bad CA file is an error at start, not at the first alert: the public
    /// web's roots, plus a private CA's when one is configured.
    pub client: reqwest::Client,
    /// The HMAC key the receiver shares.
    pub secret: String,
    /// Delays between attempts of one notification.
    pub backoff: Backoff,
    /// How long one attempt may take.
    pub timeout: Duration,
}

impl std::fmt::Debug for WebhookConfig {
    // The secret stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &self.url)
            .field("backoff", &self.backoff)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// The webhook as a [`Notifier`]: one HTTP client for every attempt.
#[derive(Debug, Clone)]
pub struct Webhook {
    client: reqwest::Client,
    config: WebhookConfig,
}

impl Webhook {
    pub fn new(config: WebhookConfig) -> Self {
        Webhook {
            client: config.client.clone(),
            config,
        }
    }
}

/// The webhook's HTTP client: HTTPS trusts the public web's roots, and also
/// `ca_pem` (PEM certificates) for a receiver behind a private CA.
pub fn client(ca_pem: Option<&[u8]>) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder();
    if let Some(pem) = ca_pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| e.to_string())?;
        if certs.is_empty() {
            return Err("no PEM certificate in it".into());
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().map_err(|e| e.to_string())
}

#[async_trait]
impl Notifier for Webhook {
    async fn notify(&self, alert: &AlertState) -> Result<(), String> {
        post(&self.client, &self.config, alert).await
    }
}

/// The alert's id: the same on every attempt and after a restart.
pub fn alert_id(a: &AlertState) -> String {
    format!("{}/{}/{}", a.rule, a.window_start, a.revision)
}

/// The alert as JSON: the notification's body, and the API's view of it
/// without the delivery state.
pub fn payload(a: &AlertState) -> serde_json::Value {
    json!({
        "rule": a.rule,
        "fleet": a.fleet,
        "device": a.device,
        "metric": a.metric,
        "resolution": a.resolution,
        "aggregate": a.aggregate,
        "comparison": a.comparison,
        "threshold": a.threshold,
        "window_start": a.window_start,
        "window_end": a.window_end,
        "revision": a.revision,
        "value": a.value,
        "late_count": a.late_count,
    })
}

/// The notification's body.
pub fn body(a: &AlertState) -> Vec<u8> {
    payload(a).to_string().into_bytes()
}

/// `sha256=<hex>` of the HMAC-SHA256 of `body` under `secret`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// One attempt: Ok on a 2xx.
async fn post(
    client: &reqwest::Client,
    hook: &WebhookConfig,
    alert: &AlertState,
) -> Result<(), String> {
    let body = body(alert);
    let response = client
        .post(&hook.url)
        .timeout(hook.timeout)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(SIGNATURE_HEADER, sign(hook.secret.as_bytes(), &body))
        .header(ALERT_ID_HEADER, alert_id(alert))
        .body(body)
        .send()
        .await
        .map_err(|e| format!("POST {}: {e}", hook.url))?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("POST {} answered {status}", hook.url))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_rfc_4231s_hmac_sha256() {
        // RFC 4231, test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
