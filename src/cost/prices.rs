//! The dated price table: list prices of the services the deployment
//! uses, in the units each meters.

use serde::Deserialize;

/// The price table compiled into the binary.
pub const DEFAULT_PRICES: &str = include_str!("prices.toml");

/// A dated price table; see `src/cost/prices.toml` for units.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prices {
    pub as_of: String,
    pub region: String,
    pub sources: Vec<String>,
    pub iot_core: IotCorePrices,
    pub kinesis: KinesisPrices,
    pub lambda: LambdaPrices,
    pub dynamodb: DynamoPrices,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IotCorePrices {
    pub connectivity_per_million_minutes: f64,
    pub messaging_tiers: Vec<Tier>,
    pub rules_triggered_per_million: f64,
    pub actions_executed_per_million: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    pub up_to_millions: f64,
    pub usd_per_million: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KinesisPrices {
    pub on_demand_stream_hour: f64,
    pub on_demand_ingest_per_gb: f64,
    pub on_demand_retrieval_per_gb: f64,
    pub shard_hour: f64,
    pub put_payload_units_per_million: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LambdaPrices {
    pub per_gb_second: f64,
    pub per_million_requests: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DynamoPrices {
    pub per_million_write_units: f64,
    pub per_million_read_units: f64,
    pub storage_per_gb_month: f64,
}

impl Prices {
    pub fn parse(text: &str) -> anyhow::Result<Prices> {
        let prices: Prices = toml::from_str(text)?;
        let tiers = &prices.iot_core.messaging_tiers;
        anyhow::ensure!(!tiers.is_empty(), "messaging_tiers is empty");
        anyhow::ensure!(
            tiers
                .windows(2)
                .all(|w| w[0].up_to_millions < w[1].up_to_millions),
            "messaging_tiers must rise"
        );
        anyhow::ensure!(
            tiers.last().is_some_and(|t| t.up_to_millions.is_infinite()),
            "the last messaging tier must be `up_to_millions = inf`"
        );
        Ok(prices)
    }

    pub fn default_table() -> anyhow::Result<Prices> {
        Prices::parse(DEFAULT_PRICES)
    }
}

/// The price of `millions` units on a tiered schedule: each tier's price
/// for the units that fall in it.
pub(super) fn tiered(millions: f64, tiers: &[Tier]) -> f64 {
    let mut usd = 0.0;
    let mut floor = 0.0;
    for t in tiers {
        let n = (millions.min(t.up_to_millions) - floor).max(0.0);
        usd += n * t.usd_per_million;
        floor = t.up_to_millions;
        if millions <= floor {
            break;
        }
    }
    usd
}
