//! The functions' configuration, from environment variables.
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `TABLE_NAME` | the rollup table | required |
//! | `RESOLUTIONS` | stored resolutions, ascending | `1m,1h,1d` |
//! | `RETENTION` | per resolution, how long a window is kept after its end (`1m=30d,1h=400d,1d=forever`, or one per resolution in order) | `1m=7d,1h=90d,1d=1098d` |
//! | `ALLOWED_LATENESS` | how long after its end a window accepts readings | `1h` |
//! | `STREAM_RETENTION` | the Kinesis stream's retention | `24h` |
//! | `DEAD_LETTER_RETENTION` | how long dead letters are kept | `7d` |
//! | `WATERMARK_SLACK` | how far out of arrival order records reach the function (the IoT rule and Kinesis); windows become final this much later | `10s` |
//! | `SPAN` | how much of a device's finest windows one span item holds: `auto`, or a duration (`1m`); a table keeps the one it was first written with | `auto` |
//! | `STALE_AFTER` | the query function's: a device that sent no reading for this long is `stale` (parsed as `iotpipe up --stale-after` is) | `5m` |
//! | `METRICS_NAMESPACE` | the CloudWatch namespace of the EMF metrics | `iotpipe` |
//! | `AWS_LAMBDA_FUNCTION_NAME` | set by Lambda; the metrics' `Function` dimension | `aggregate` |
//!
//! Durations are an integer and a unit: `ms`, `s`, `m`, `h` or `d`.
//! `AWS_ENDPOINT_URL` (read by the SDK itself) points the clients at a
//! stand-in.

use schemas::Resolution;

use super::emf::EmfConfig;
use rollup::AggregateConfig;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EnvError {
    #[error("environment variable {0} is required")]
    Missing(&'static str),
    #[error("environment variable {name}: {detail}")]
    Invalid { name: &'static str, detail: String },
}

/// What both functions are configured with.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionConfig {
    pub table_name: String,
    pub aggregate: AggregateConfig,
    pub metrics: EmfConfig,
}

/// A function's configuration, read from environment variables once in its
/// `main`.
pub trait FromEnv: Sized {
    /// Reads variables through `var`, so tests need not touch the process
    /// environment.
    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, EnvError>;

    /// Reads the process environment.
    fn from_env() -> Result<Self, EnvError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }
}

/// `name`'s value, which must be set and not empty.
pub(super) fn required(
    var: impl Fn(&str) -> Option<String>,
    name: &'static str,
) -> Result<String, EnvError> {
    var(name)
        .filter(|v| !v.is_empty())
        .ok_or(EnvError::Missing(name))
}

/// `metrics` with the namespace (`METRICS_NAMESPACE`) and function name
/// (`AWS_LAMBDA_FUNCTION_NAME`) the environment sets, where it does.
pub(super) fn metrics_from_vars(
    var: impl Fn(&str) -> Option<String>,
    mut metrics: EmfConfig,
) -> EmfConfig {
    if let Some(namespace) = var("METRICS_NAMESPACE").filter(|n| !n.is_empty()) {
        metrics.namespace = namespace;
    }
    if let Some(function) = var("AWS_LAMBDA_FUNCTION_NAME").filter(|f| !f.is_empty()) {
        metrics.function = function;
    }
    metrics
}

impl FromEnv for FunctionConfig {
    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, EnvError> {
        let table_name = required(&var, "TABLE_NAME")?;
        let mut config = AggregateConfig::default();
        if let Some(list) = var("RESOLUTIONS") {
            config.resolutions = list
                .split(',')
                .map(|r| r.trim().parse::<Resolution>())
                .collect::<Result<_, _>>()
                .map_err(|detail| EnvError::Invalid {
                    name: "RESOLUTIONS",
                    detail,
                })?;
            // Keep the default retentions aligned with the new list.
            config.retention_ms = config
                .resolutions
                .iter()
                .map(|r| Some(rollup::config::default_retention_ms(*r)))
                .collect();
        }
        if let Some(text) = var("RETENTION") {
            config.retention_ms = rollup::config::parse_retention(&text, &config.resolutions)
                .map_err(|detail| EnvError::Invalid {
                    name: "RETENTION",
                    detail,
                })?;
        }
        let durations: [(&'static str, &mut i64); 4] = [
            ("ALLOWED_LATENESS", &mut config.allowed_lateness_ms),
            ("STREAM_RETENTION", &mut config.stream_retention_ms),
            (
                "DEAD_LETTER_RETENTION",
                &mut config.dead_letter_retention_ms,
            ),
            ("WATERMARK_SLACK", &mut config.watermark_slack_ms),
        ];
        for (name, slot) in durations {
            if let Some(value) = var(name) {
                *slot = duration_ms(name, value.trim())?;
            }
        }
        if let Some(text) = var("SPAN").filter(|t| t.trim() != "auto") {
            config.span = Some(duration_ms("SPAN", text.trim())?);
            config.check_span().map_err(|detail| EnvError::Invalid {
                name: "SPAN",
                detail,
            })?;
        }
        config.validate().map_err(|detail| EnvError::Invalid {
            name: "RESOLUTIONS",
            detail,
        })?;
        let metrics = metrics_from_vars(&var, EmfConfig::default());
        Ok(FunctionConfig {
            table_name,
            aggregate: config,
            metrics,
        })
    }
}

/// The query function's `stale` threshold: `STALE_AFTER`, read with the
/// parser of `iotpipe up --stale-after`, or the API's default.
pub fn stale_after_from_vars(
    var: impl Fn(&str) -> Option<String>,
) -> Result<crate::api::StaleAfter, EnvError> {
    let mut stale_after = crate::api::StaleAfter::default();
    if let Some(text) = var("STALE_AFTER").filter(|t| !t.trim().is_empty()) {
        let d = crate::api::StaleAfter::parse(&text).map_err(|detail| EnvError::Invalid {
            name: "STALE_AFTER",
            detail,
        })?;
        stale_after.default_ms = i64::try_from(d.as_millis()).map_err(|_| EnvError::Invalid {
            name: "STALE_AFTER",
            detail: format!("`{text}` is too long"),
        })?;
    }
    Ok(stale_after)
}

/// `90s`, `1h`, `500ms`, `0` as milliseconds.
pub(super) fn duration_ms(name: &'static str, text: &str) -> Result<i64, EnvError> {
    rollup::config::parse_duration_ms(text).map_err(|detail| EnvError::Invalid { name, detail })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn defaults_need_only_the_table() {
        let config = FunctionConfig::from_vars(vars(&[("TABLE_NAME", "rollups")])).unwrap();
        assert_eq!(config.table_name, "rollups");
        assert_eq!(config.aggregate, AggregateConfig::default());
        assert_eq!(config.metrics, EmfConfig::default());
        assert_eq!(
            FunctionConfig::from_vars(vars(&[])),
            Err(EnvError::Missing("TABLE_NAME"))
        );
    }

    #[test]
    fn reads_every_setting() {
        let config = FunctionConfig::from_vars(vars(&[
            ("TABLE_NAME", "t"),
            ("RESOLUTIONS", "1m, 15m"),
            ("SPAN", "5m"),
            ("ALLOWED_LATENESS", "90s"),
            ("STREAM_RETENTION", "7d"),
            ("DEAD_LETTER_RETENTION", "0"),
            ("METRICS_NAMESPACE", "iotpipe-prod"),
            ("AWS_LAMBDA_FUNCTION_NAME", "iotpipe-prod-aggregate"),
        ]))
        .unwrap();
        assert_eq!(config.metrics.namespace, "iotpipe-prod");
        assert_eq!(config.metrics.function, "iotpipe-prod-aggregate");
        let a = config.aggregate;
        assert_eq!(a.resolutions.len(), 2);
        assert_eq!(
            a.retention_ms,
            vec![Some(7 * Resolution::DAY), Some(7 * Resolution::DAY)]
        );
        assert_eq!(a.allowed_lateness_ms, 90_000);
        assert_eq!(a.stream_retention_ms, 7 * Resolution::DAY);
        assert_eq!(a.dead_letter_retention_ms, 0);
        assert_eq!(a.span_ms(), 5 * Resolution::MINUTE);
        let auto = FunctionConfig::from_vars(vars(&[("TABLE_NAME", "t"), ("SPAN", "auto")]));
        assert_eq!(auto.unwrap().aggregate.span, None);
    }

    #[test]
    fn retention_is_named_per_resolution_and_may_be_forever() {
        let config = FunctionConfig::from_vars(vars(&[
            ("TABLE_NAME", "t"),
            ("RESOLUTIONS", "1m,15m"),
            ("RETENTION", "15m=forever"),
        ]))
        .unwrap();
        assert_eq!(
            config.aggregate.retention_ms,
            vec![Some(7 * Resolution::DAY), None]
        );
    }

    #[test]
    fn the_query_function_reads_its_stale_after() {
        let default = stale_after_from_vars(vars(&[])).unwrap();
        assert_eq!(default, crate::api::StaleAfter::default());
        assert_eq!(default.default_ms, 5 * 60_000);
        for (text, ms) in [("90s", 90_000), ("10m", 600_000), ("1h 30m", 5_400_000)] {
            let s = stale_after_from_vars(vars(&[("STALE_AFTER", text)])).unwrap();
            assert_eq!(s.default_ms, ms, "{text}");
            assert_eq!(s.of("any-fleet"), ms);
        }
        for bad in ["5", "soon", "-1m"] {
            assert!(
                matches!(
                    stale_after_from_vars(vars(&[("STALE_AFTER", bad)])),
                    Err(EnvError::Invalid {
                        name: "STALE_AFTER",
                        ..
                    })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn refuses_bad_values_by_name() {
        for (name, value) in [
            ("ALLOWED_LATENESS", "1 hour"),
            ("ALLOWED_LATENESS", "5"),
            ("RESOLUTIONS", "1h,1m"),
            ("RETENTION", "7d"),
            ("RETENTION", "1h=5m"),
            ("SPAN", "7m"),
            ("SPAN", "1 minute"),
        ] {
            let err =
                FunctionConfig::from_vars(vars(&[("TABLE_NAME", "t"), (name, value)])).unwrap_err();
            assert!(
                matches!(err, EnvError::Invalid { .. }),
                "{name}={value}: {err:?}"
            );
        }
    }
}
