//! `[alerts]`: rules on windows and where their notifications go.

use std::time::Duration;

use anyhow::Context;
pub use processors::alerts::RuleConfig;
use processors::alerts::{AlertsSetup, WebhookConfig};
use rollup::alerts::AlertRule;
use serde::{Deserialize, Serialize};

use super::{duration_text, to_ms};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// How often every rule is evaluated against the stored windows.
    #[serde(with = "duration_text")]
    pub evaluate_every: Duration,
    /// How long a fired alert is kept (listed by `GET /v1/alerts`).
    #[serde(with = "duration_text")]
    pub keep: Duration,
    pub rules: Vec<RuleConfig>,
    pub webhook: Option<WebhookSettings>,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            evaluate_every: Duration::from_secs(1),
            keep: Duration::from_secs(7 * 86_400),
            rules: Vec::new(),
            webhook: None,
        }
    }
}

/// `[alerts.webhook]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    /// `https://HOST/PATH` or `http://HOST:PORT/PATH`.
    pub url: String,
    /// A PEM file of CA certificates to trust beside the public web's, for
    /// a receiver whose certificate a private CA signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<std::path::PathBuf>,
    /// The key of each notification's HMAC-SHA256 signature.
    pub secret: String,
    /// The longest wait before a failed notification's first retry; each
    /// further failure doubles it, up to `retry_max`.
    #[serde(with = "duration_text", default = "default_retry_initial")]
    pub retry_initial: Duration,
    #[serde(with = "duration_text", default = "default_retry_max")]
    pub retry_max: Duration,
    /// How long one attempt may take.
    #[serde(with = "duration_text", default = "default_timeout")]
    pub timeout: Duration,
}

fn default_retry_initial() -> Duration {
    Duration::from_secs(1)
}

fn default_retry_max() -> Duration {
    Duration::from_secs(300)
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

impl AlertsConfig {
    /// The alert loop's settings, every rule validated against the stored
    /// resolutions; `None` when no rule is configured.
    pub fn setup(
        &self,
        aggregate: &rollup::AggregateConfig,
    ) -> anyhow::Result<Option<AlertsSetup>> {
        let mut rules: Vec<AlertRule> = Vec::new();
        for (i, r) in self.rules.iter().enumerate() {
            let rule = r
                .rule(aggregate)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("alerts.rules[{i}]"))?;
            if rules.iter().any(|other| other.name == rule.name) {
                anyhow::bail!("alerts.rules[{i}]: a second rule is named `{}`", rule.name);
            }
            rules.push(rule);
        }
        if self.evaluate_every.is_zero() {
            anyhow::bail!("alerts.evaluate_every must be more than 0s");
        }
        let webhook = match &self.webhook {
            None => None,
            Some(w) => Some(w.webhook().context("alerts.webhook")?),
        };
        if rules.is_empty() {
            return Ok(None);
        }
        Ok(Some(AlertsSetup {
            rules,
            webhook,
            evaluate_every: self.evaluate_every,
            keep_ms: to_ms(self.keep),
        }))
    }
}

impl WebhookSettings {
    fn webhook(&self) -> anyhow::Result<WebhookConfig> {
        if !(self.url.starts_with("https://") || self.url.starts_with("http://")) {
            anyhow::bail!("url `{}` must be https:// or http://", self.url);
        }
        if self.secret.is_empty() {
            anyhow::bail!("secret is empty: every notification is signed with it");
        }
        let ca_pem = match &self.ca_file {
            None => None,
            Some(path) => {
                Some(std::fs::read(path).with_context(|| format!("ca_file {}", path.display()))?)
            }
        };
        let client = processors::alerts::webhook::client(ca_pem.as_deref()).map_err(|e| {
            let file = self.ca_file.as_ref().map(|p| p.display().to_string());
            anyhow::anyhow!("the HTTP client (ca_file {file:?}): {e}")
        })?;
        Ok(WebhookConfig {
            url: self.url.clone(),
            client,
            secret: self.secret.clone(),
            backoff: processors::alerts::Backoff::new(self.retry_initial, self.retry_max),
            timeout: self.timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rollup::alerts::Scope;

    fn config(text: &str) -> AlertsConfig {
        toml::from_str(text).unwrap()
    }

    const RULE: &str = r#"
        [[rules]]
        name = "hot"
        fleet = "meters"
        metric = "temp"
        resolution = "1m"
        aggregate = "avg"
        comparison = ">"
        threshold = 30.0
        for = 2
        [webhook]
        url = "http://127.0.0.1:9000/alerts"
        secret = "s3cret"
    "#;

    #[test]
    fn a_rule_and_a_webhook_read_back() {
        let setup = config(RULE)
            .setup(&rollup::AggregateConfig::default())
            .unwrap()
            .unwrap();
        assert_eq!(setup.rules[0].for_windows, 2);
        assert_eq!(setup.rules[0].scope, Scope::Fleet("meters".into()));
        assert_eq!(setup.webhook.unwrap().secret, "s3cret");
        assert_eq!(setup.evaluate_every, Duration::from_secs(1));
    }

    #[test]
    fn what_cannot_be_evaluated_is_refused_in_words() {
        let agg = rollup::AggregateConfig::default();
        for (from, to, expected) in [
            ("\"1m\"", "\"5m\"", "5m is not stored"),
            ("\"avg\"", "\"mean\"", "unknown aggregate `mean`"),
            ("\">\"", "\"=>\"", "unknown comparison `=>`"),
            ("\"temp\"", "\"te mp\"", "metric name"),
            ("http://", "ftp://", "must be https:// or http://"),
        ] {
            let text = RULE.replacen(from, to, 1);
            let e = format!("{:#}", config(&text).setup(&agg).unwrap_err());
            assert!(e.contains(expected), "{to}: {e}");
        }
        let both = RULE.replacen("fleet = \"meters\"", "fleet = \"m\"\ndevice = \"d\"", 1);
        let e = format!("{:#}", config(&both).setup(&agg).unwrap_err());
        assert!(e.contains("exactly one of `fleet` and `device`"), "{e}");
        let url = "url = \"http://127.0.0.1:9000/alerts\"";
        let not_pem = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        for (ca_file, expected) in [
            ("/nonexistent/ca.pem", "ca_file /nonexistent/ca.pem"),
            (not_pem, "no PEM certificate"),
        ] {
            let text = RULE.replacen(url, &format!("{url}\nca_file = \"{ca_file}\""), 1);
            let e = format!("{:#}", config(&text).setup(&agg).unwrap_err());
            assert!(e.contains(expected), "{ca_file}: {e}");
        }
        let unknown = RULE.replacen("threshold", "treshold", 1);
        assert!(toml::from_str::<AlertsConfig>(&unknown).is_err());
    }
}
