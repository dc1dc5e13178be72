//! A rule as written down: the fields of a `[[alerts.rules]]` table in the
//! config file, and of an entry of the AWS function's `ALERT_RULES` JSON,
//! read by one parser so that both say the same thing the same way.

use rollup::AggregateConfig;
use rollup::alerts::{AlertRule, Scope};
use serde::{Deserialize, Serialize};

/// One rule, before validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: String,
    /// A fleet's windows; or `device`, one device's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    pub metric: String,
    /// A stored resolution (`aggregate.resolutions`).
    pub resolution: String,
    /// count, sum, min, max, avg, stddev, p50, p90 or p99.
    pub aggregate: String,
    /// `>`, `>=`, `<` or `<=`.
    pub comparison: String,
    pub threshold: f64,
    /// Consecutive windows that must cross, the alerting one the last.
    #[serde(rename = "for", default = "one")]
    pub for_windows: u32,
}

fn one() -> u32 {
    1
}

impl RuleConfig {
    /// The rule, validated against the stored resolutions; what is wrong,
    /// in words, naming the rule.
    pub fn rule(&self, aggregate: &AggregateConfig) -> Result<AlertRule, String> {
        let in_rule = |e: String| format!("rule `{}`: {e}", self.name);
        let scope = match (&self.fleet, &self.device) {
            (Some(f), None) => Scope::Fleet(f.clone()),
            (None, Some(d)) => Scope::Device(d.clone()),
            _ => return Err(in_rule("name exactly one of `fleet` and `device`".into())),
        };
        let rule = AlertRule {
            name: self.name.clone(),
            scope,
            metric: self.metric.clone(),
            res: self.resolution.parse().map_err(in_rule)?,
            aggregate: self.aggregate.parse().map_err(in_rule)?,
            comparison: self.comparison.parse().map_err(in_rule)?,
            threshold: self.threshold,
            for_windows: self.for_windows,
        };
        rule.validate(aggregate)?;
        Ok(rule)
    }
}
