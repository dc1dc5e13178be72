//! `aggregate.retention` as a config file writes it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `aggregate.retention`: named per resolution (`"1m=30d,1h=400d,1d=forever"`,
/// a resolution left out keeps its default), or a list with one per
/// resolution, finest first (`["7days", "90days", "forever"]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RetentionSetting {
    Named(String),
    List(Vec<Keep>),
}

impl RetentionSetting {
    /// Milliseconds per resolution (`None`: forever).
    pub(super) fn resolve(
        &self,
        resolutions: &[schemas::Resolution],
    ) -> Result<Vec<Option<i64>>, String> {
        match self {
            RetentionSetting::Named(text) => rollup::config::parse_retention(text, resolutions),
            RetentionSetting::List(list) => {
                Ok(list.iter().map(|k| k.0.map(super::to_ms)).collect())
            }
        }
    }
}

/// One retention in a list: `forever` or a duration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Keep(pub Option<Duration>);

impl Serialize for Keep {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Some(d) => s.serialize_str(&super::duration_text::format(d)),
            None => s.serialize_str("forever"),
        }
    }
}

impl<'de> Deserialize<'de> for Keep {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text == "forever" {
            return Ok(Keep(None));
        }
        humantime::parse_duration(&text)
            .map(|d| Keep(Some(d)))
            .map_err(|e| serde::de::Error::custom(format!("`{text}`: {e} (or `forever`)")))
    }
}
