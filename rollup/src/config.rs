//! How the processors aggregate: resolutions, lateness and retention.

use schemas::Resolution;

/// Everything the aggregation core decides with. Time never comes from a
/// clock here: lateness is judged against each reading's `received_at`.
#[derive(Debug, Clone, PartialEq)]
pub struct AggregateConfig {
    /// Stored resolutions, ascending; each a multiple of the first (the finest).
    pub resolutions: Vec<Resolution>,
    /// How long after its end a window still accepts readings (default 1 h).
    pub allowed_lateness_ms: i64,
    /// How far past `received_at` a reading's time may lie (10 min).
    pub future_tolerance_ms: i64,
    /// Per resolution (same order), how long a window is kept after its end.
    pub retention_ms: Vec<i64>,
    /// The stream's retention: a record can be processed at most this long
    /// after it arrived, so dedup sets must outlive a window's lateness by it.
    pub stream_retention_ms: i64,
    /// How long dead letters are kept.
    pub dead_letter_retention_ms: i64,
}

impl Default for AggregateConfig {
    fn default() -> Self {
        AggregateConfig {
            resolutions: Resolution::DEFAULTS.to_vec(),
            allowed_lateness_ms: Resolution::HOUR,
            future_tolerance_ms: 10 * Resolution::MINUTE,
            retention_ms: vec![
                7 * Resolution::DAY,
                90 * Resolution::DAY,
                3 * 366 * Resolution::DAY,
            ],
            stream_retention_ms: Resolution::DAY,
            dead_letter_retention_ms: 7 * Resolution::DAY,
        }
    }
}

impl AggregateConfig {
    /// Checks the invariants the core relies on.
    pub fn validate(&self) -> Result<(), String> {
        let Some(finest) = self.resolutions.first() else {
            return Err("at least one resolution is needed".into());
        };
        if !self.resolutions.windows(2).all(|w| w[0] < w[1]) {
            return Err("resolutions must be strictly ascending".into());
        }
        if let Some(r) = self.resolutions.iter().find(|r| !r.is_multiple_of(*finest)) {
            return Err(format!(
                "resolution {r} is not a multiple of the finest, {finest}"
            ));
        }
        if self.retention_ms.len() != self.resolutions.len() {
            return Err("one retention per resolution is needed".into());
        }
        if self.allowed_lateness_ms < 0 || self.future_tolerance_ms < 0 {
            return Err("lateness and future tolerance must not be negative".into());
        }
        Ok(())
    }

    pub fn finest(&self) -> Resolution {
        self.resolutions
            .first()
            .copied()
            .unwrap_or(Resolution::DEFAULTS[0])
    }

    /// Whether a window ending at `end` is final at `now`.
    pub fn is_final(&self, end: i64, now: i64) -> bool {
        end.saturating_add(self.allowed_lateness_ms) <= now
    }
}
