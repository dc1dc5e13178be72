//! How the processors aggregate: resolutions, lateness and retention.

use schemas::Resolution;

use crate::lateness::LatenessConfig;

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
    /// How far out of arrival order a shard's records may reach the
    /// processors: the time between a record's `received_at` and the moment
    /// it is readable in the stream (group commit locally; the IoT rule and
    /// Kinesis on AWS). The processed watermark stays this far behind what
    /// was applied, so a record still on its way is never overtaken.
    pub watermark_slack_ms: i64,
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
            watermark_slack_ms: 10 * Resolution::SECOND,
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
        if self.allowed_lateness_ms < 0
            || self.future_tolerance_ms < 0
            || self.watermark_slack_ms < 0
        {
            return Err(
                "lateness, future tolerance and watermark slack must not be negative".into(),
            );
        }
        Ok(())
    }

    /// A device's item covers this many ms: the longest run of at most ten
    /// finest windows that divides every coarser resolution, so a span never
    /// straddles a coarser window. Ten one-minute windows of a quiet device
    /// fit one DynamoDB write unit; several readings of a device in one batch
    /// (a long batching window) share one span write.
    pub fn span_ms(&self) -> i64 {
        let finest = self.finest().ms();
        (1..=10)
            .rev()
            .map(|k| k * finest)
            .find(|span| self.resolutions[1..].iter().all(|r| r.ms() % span == 0))
            .unwrap_or(finest)
    }

    pub fn span_start(&self, ts: i64) -> i64 {
        let span = self.span_ms();
        ts.div_euclid(span) * span
    }

    /// The starts of the spans that make up the window `[start, start +
    /// res_ms)`: what compacting it reads.
    pub fn spans_of(&self, res_ms: i64, start: i64) -> impl Iterator<Item = i64> + use<> {
        let span = self.span_ms();
        (0..res_ms / span).map(move |i| start + i * span)
    }

    /// The windows a device's item keeps track of until they are compacted:
    /// every coarser resolution, or the span itself when there is none.
    pub fn pending_units(&self) -> Vec<i64> {
        if self.resolutions.len() > 1 {
            self.resolutions[1..].iter().map(|r| r.ms()).collect()
        } else {
            vec![self.span_ms()]
        }
    }

    /// How long a span item is kept: its finest windows' retention, and at
    /// least as long as a duplicate of one of its readings can still arrive
    /// (the window's lateness plus the stream's retention).
    pub fn span_retention_ms(&self) -> i64 {
        let finest = self.retention_ms.first().copied().unwrap_or(0);
        finest.max(
            self.allowed_lateness_ms
                .saturating_add(self.stream_retention_ms),
        )
    }

    pub fn finest(&self) -> Resolution {
        self.resolutions
            .first()
            .copied()
            .unwrap_or(Resolution::DEFAULTS[0])
    }

    /// The bounds on a reading's time, which decide lateness.
    pub fn lateness(&self) -> LatenessConfig {
        LatenessConfig {
            allowed_lateness_ms: self.allowed_lateness_ms,
            future_tolerance_ms: self.future_tolerance_ms,
        }
    }

    /// Whether a window ending at `end` is final once everything that
    /// arrived up to `watermark` has been applied.
    pub fn is_final(&self, end: i64, watermark: i64) -> bool {
        self.lateness().is_final(end, watermark)
    }
}
