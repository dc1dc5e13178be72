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
    /// Per resolution (same order), how long a window is kept after its
    /// end; `None` keeps it forever.
    pub retention_ms: Vec<Option<i64>>,
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
    /// How many ms of finest windows one span item of a device holds;
    /// `None` picks the longest run of at most ten (see [`Self::span_ms`]).
    /// Shorter spans suit devices that publish every second on DynamoDB:
    /// a ten-minute span of such a device grows to several write units.
    /// A store keeps the span it was first written with (`StoreLayout`).
    pub span: Option<i64>,
}

impl Default for AggregateConfig {
    fn default() -> Self {
        AggregateConfig {
            resolutions: Resolution::DEFAULTS.to_vec(),
            allowed_lateness_ms: Resolution::HOUR,
            future_tolerance_ms: 10 * Resolution::MINUTE,
            retention_ms: Resolution::DEFAULTS
                .iter()
                .map(|r| Some(default_retention_ms(*r)))
                .collect(),
            stream_retention_ms: Resolution::DAY,
            dead_letter_retention_ms: 7 * Resolution::DAY,
            watermark_slack_ms: 10 * Resolution::SECOND,
            span: None,
        }
    }
}

/// The most finest windows one span item holds.
const MAX_SPAN_WINDOWS: i64 = 10;

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
        // A window must outlive the time it takes readings: one deleted
        // before its lateness ran out would be written again by a late
        // reading, counted from nothing.
        for (r, keep) in self.resolutions.iter().zip(&self.retention_ms) {
            if let Some(keep) = keep
                && *keep < self.allowed_lateness_ms
            {
                return Err(format!(
                    "retention of {r} ({}) is shorter than the allowed lateness ({}): \
                     a late reading would write a deleted window again",
                    format_duration_ms(*keep),
                    format_duration_ms(self.allowed_lateness_ms)
                ));
            }
        }
        if self.allowed_lateness_ms < 0
            || self.future_tolerance_ms < 0
            || self.watermark_slack_ms < 0
        {
            return Err(
                "lateness, future tolerance and watermark slack must not be negative".into(),
            );
        }
        self.check_span()
    }

    /// A span set must be a run of one to ten whole finest windows (no
    /// longer than the default's: a span is rewritten whole by each of its
    /// readings) that divides every coarser resolution, so that no span
    /// straddles a coarser window.
    pub fn check_span(&self) -> Result<(), String> {
        let Some(span) = self.span else {
            return Ok(());
        };
        let finest = self.finest();
        let text = format_duration_ms(span);
        if span <= 0 || span % finest.ms() != 0 || span / finest.ms() > MAX_SPAN_WINDOWS {
            return Err(format!(
                "span {text} is not one to {MAX_SPAN_WINDOWS} finest windows of {finest}"
            ));
        }
        let coarser = self.resolutions.get(1..).unwrap_or_default();
        if let Some(r) = coarser.iter().find(|r| r.ms() % span != 0) {
            return Err(format!(
                "span {text} does not divide resolution {r}: a span would straddle its windows"
            ));
        }
        Ok(())
    }

    /// A device's item covers this many ms: [`Self::span`] when set, else
    /// the longest run of at most ten finest windows that divides every
    /// coarser resolution, so a span never straddles a coarser window. Ten
    /// one-minute windows of a quiet device fit one DynamoDB write unit;
    /// several readings of a device in one batch (a long batching window)
    /// share one span write.
    pub fn span_ms(&self) -> i64 {
        if let Some(span) = self.span {
            return span;
        }
        let finest = self.finest().ms();
        (1..=MAX_SPAN_WINDOWS)
            .rev()
            .map(|k| k * finest)
            .find(|span| self.resolutions[1..].iter().all(|r| r.ms() % span == 0))
            .unwrap_or(finest)
    }

    /// What a store written with this config must keep being written with.
    pub fn layout(&self) -> schemas::state::StoreLayout {
        schemas::state::StoreLayout {
            span_ms: self.span_ms(),
            resolutions_ms: self.resolutions.iter().map(|r| r.ms()).collect(),
        }
    }

    pub fn span_start(&self, ts: i64) -> i64 {
        span_start_in(self.span_ms(), ts)
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
        self.pending_unit_ms().collect()
    }

    /// [`Self::pending_units`] without a vector: span retention asks for it
    /// for every span item a batch writes.
    fn pending_unit_ms(&self) -> impl Iterator<Item = i64> + '_ {
        let coarser = self.resolutions.get(1..).unwrap_or_default();
        let span_only = coarser.is_empty().then(|| self.span_ms());
        coarser.iter().map(|r| r.ms()).chain(span_only)
    }

    /// How long a span item is kept (`None`: forever): its finest windows'
    /// retention, and at least as long as a duplicate of one of its readings
    /// can still arrive (the window's lateness plus the stream's retention)
    /// after the longest window it feeds has ended: a coarser window is
    /// merged from spans until it is compacted, so spans that expired first
    /// would take its readings with them.
    pub fn span_retention_ms(&self) -> Option<i64> {
        let finest = self.retention_ms.first().copied().unwrap_or(Some(0))?;
        let longest = self.pending_unit_ms().max().unwrap_or(0);
        Some(
            finest.max(
                self.allowed_lateness_ms
                    .saturating_add(self.stream_retention_ms)
                    .saturating_add(longest),
            ),
        )
    }

    /// How long windows of the stored resolution `res` are kept; `None`:
    /// forever, or not a stored resolution.
    pub fn retention_of(&self, res: Resolution) -> Option<i64> {
        let i = self.resolutions.iter().position(|r| *r == res)?;
        self.retention_ms.get(i).copied().flatten()
    }

    /// The earliest start a window of stored resolution `res` may have and
    /// still be kept at `now`: older ones have expired, whether or not the
    /// store has deleted them yet (DynamoDB's TTL deletes within days, a
    /// purge runs every minute), so readers skip them.
    pub fn retained_from(&self, res: Resolution, now: i64) -> i64 {
        match self.retention_of(res) {
            Some(keep) => now.saturating_sub(keep).saturating_sub(res.ms()),
            None => i64::MIN,
        }
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

/// The start of the span of `span` ms that `ts` falls in: for a caller
/// that has [`AggregateConfig::span_ms`] at hand, such as a batch's plan.
pub fn span_start_in(span: i64, ts: i64) -> i64 {
    ts.div_euclid(span) * span
}

/// The retention [`AggregateConfig::default`] gives a resolution like `r`:
/// a week below an hour, 90 days below a day, three years from a day.
pub fn default_retention_ms(r: Resolution) -> i64 {
    if r.ms() < Resolution::HOUR {
        7 * Resolution::DAY
    } else if r.ms() < Resolution::DAY {
        90 * Resolution::DAY
    } else {
        3 * 366 * Resolution::DAY
    }
}

/// Reads a retention per resolution, in one of two forms:
/// - keyed, `1m=30d,1h=400d,1d=forever`: a resolution left out keeps its
///   default ([`default_retention_ms`]); one that is not stored is an error;
/// - positional, `30d,400d,forever`: one per resolution, finest first.
///
/// `forever` keeps windows for good. Durations are an integer and a unit
/// (`ms`, `s`, `m`, `h`, `d`).
pub fn parse_retention(text: &str, resolutions: &[Resolution]) -> Result<Vec<Option<i64>>, String> {
    let parts: Vec<&str> = text.split(',').map(str::trim).collect();
    if !parts.iter().any(|p| p.contains('=')) {
        if parts.len() != resolutions.len() {
            return Err(format!(
                "`{text}` gives {} retentions for {} resolutions; name them (`1m=30d,1h=forever`) \
                 or give one per resolution",
                parts.len(),
                resolutions.len()
            ));
        }
        return parts.iter().map(|p| parse_keep(p)).collect();
    }
    let mut out: Vec<Option<i64>> = resolutions
        .iter()
        .map(|r| Some(default_retention_ms(*r)))
        .collect();
    let mut named = vec![false; resolutions.len()];
    for part in parts {
        let Some((res, keep)) = part.split_once('=') else {
            return Err(format!(
                "`{part}` is not `RESOLUTION=DURATION`: name every retention or none"
            ));
        };
        let res: Resolution = res.trim().parse()?;
        let Some(i) = resolutions.iter().position(|r| *r == res) else {
            let stored: Vec<String> = resolutions.iter().map(|r| r.to_string()).collect();
            return Err(format!(
                "retention for {res}, which is not a stored resolution ({})",
                stored.join(", ")
            ));
        };
        if std::mem::replace(&mut named[i], true) {
            return Err(format!("retention for {res} is given twice"));
        }
        out[i] = parse_keep(keep.trim())?;
    }
    Ok(out)
}

/// `forever`, or a duration.
fn parse_keep(text: &str) -> Result<Option<i64>, String> {
    if text == "forever" {
        return Ok(None);
    }
    parse_duration_ms(text).map(Some)
}

/// An integer and a unit: `500ms`, `90s`, `15m`, `1h`, `7d`; `0` alone.
pub fn parse_duration_ms(text: &str) -> Result<i64, String> {
    let invalid = || format!("`{text}` is not a duration like 500ms, 90s, 15m, 1h or 7d");
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: i64 = digits.parse().map_err(|_| invalid())?;
    let unit_ms = match unit {
        "" if n == 0 => 0,
        "ms" => 1,
        "s" => Resolution::SECOND,
        "m" => Resolution::MINUTE,
        "h" => Resolution::HOUR,
        "d" => Resolution::DAY,
        _ => return Err(invalid()),
    };
    n.checked_mul(unit_ms).ok_or_else(invalid)
}

/// A duration in the largest of `d`, `h`, `m`, `s` that divides it.
pub fn format_duration_ms(ms: i64) -> String {
    for (unit, len) in [
        ("d", Resolution::DAY),
        ("h", Resolution::HOUR),
        ("m", Resolution::MINUTE),
        ("s", Resolution::SECOND),
    ] {
        if ms != 0 && ms % len == 0 {
            return format!("{}{unit}", ms / len);
        }
    }
    format!("{ms}ms")
}

/// A retention per resolution in the keyed form [`parse_retention`] reads.
pub fn format_retention(resolutions: &[Resolution], retention_ms: &[Option<i64>]) -> String {
    resolutions
        .iter()
        .zip(retention_ms)
        .map(|(r, keep)| match keep {
            Some(ms) => format!("{r}={}", format_duration_ms(*ms)),
            None => format!("{r}=forever"),
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = Resolution::DAY;

    fn defaults() -> Vec<Resolution> {
        Resolution::DEFAULTS.to_vec()
    }

    #[test]
    fn retention_is_read_keyed_or_positional_and_forever_keeps_for_good() {
        let cases: [(&str, Vec<Option<i64>>); 4] = [
            (
                "1m=30d,1h=400d,1d=forever",
                vec![Some(30 * DAY), Some(400 * DAY), None],
            ),
            // Left out: the default.
            ("1h=forever", vec![Some(7 * DAY), None, Some(3 * 366 * DAY)]),
            (
                "30d, 400d, forever",
                vec![Some(30 * DAY), Some(400 * DAY), None],
            ),
            (
                "1m = 90s ,1d=2d",
                vec![Some(90_000), Some(90 * DAY), Some(2 * DAY)],
            ),
        ];
        for (text, want) in cases {
            assert_eq!(parse_retention(text, &defaults()), Ok(want), "{text}");
        }
    }

    #[test]
    fn retention_that_cannot_be_meant_is_refused_with_the_reason() {
        let cases = [
            ("1m=30d,5m=1d", "not a stored resolution"),
            ("1m=30d,1m=1d", "given twice"),
            ("30d,400d", "2 retentions for 3 resolutions"),
            ("1m=30d,400d", "name every retention or none"),
            ("1m=30 days", "not a duration"),
            ("1m=-1d", "not a duration"),
            ("1m=never", "not a duration"),
        ];
        for (text, why) in cases {
            let err = parse_retention(text, &defaults()).unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn retention_reads_back_what_it_writes() {
        let keep = vec![Some(30 * DAY), Some(36 * Resolution::HOUR), None];
        let text = format_retention(&defaults(), &keep);
        assert_eq!(text, "1m=30d,1h=36h,1d=forever");
        assert_eq!(parse_retention(&text, &defaults()), Ok(keep));
    }

    #[test]
    fn a_window_is_retained_until_its_retention_after_its_end() {
        let config = AggregateConfig {
            retention_ms: vec![Some(DAY), None, None],
            ..AggregateConfig::default()
        };
        let m = Resolution::DEFAULTS[0];
        let now = 100 * DAY;
        let from = config.retained_from(m, now);
        // The window starting at `from` ends one retention before now.
        assert_eq!(from + m.ms() + DAY, now);
        assert_eq!(config.retained_from(Resolution::DEFAULTS[1], now), i64::MIN);
        // Lateness (1 h) and the stream's retention (1 d) after the end of
        // the longest window (1 d).
        assert_eq!(config.span_retention_ms(), Some(49 * Resolution::HOUR));
        let forever = AggregateConfig {
            retention_ms: vec![None, None, None],
            ..AggregateConfig::default()
        };
        assert_eq!(forever.span_retention_ms(), None);
    }

    #[test]
    fn a_span_set_is_the_span_and_one_that_cannot_work_is_refused() {
        let with = |span| AggregateConfig {
            span: Some(span),
            ..AggregateConfig::default()
        };
        let minute = Resolution::MINUTE;
        assert_eq!(AggregateConfig::default().span_ms(), 10 * minute);
        for ok in [minute, 5 * minute, 10 * minute] {
            assert_eq!(with(ok).validate(), Ok(()));
            assert_eq!(with(ok).span_ms(), ok);
            assert_eq!(with(ok).span_start(ok + 1), ok);
        }
        let cases = [
            (0, "not one to 10 finest windows of 1m"),
            (-minute, "not one to 10 finest windows"),
            (90 * Resolution::SECOND, "not one to 10 finest windows"),
            (20 * minute, "not one to 10 finest windows"),
            (7 * minute, "does not divide resolution 1h"),
        ];
        for (span, why) in cases {
            let err = with(span).validate().unwrap_err();
            assert!(err.contains(why), "{span}: {err}");
        }
    }

    #[test]
    fn retention_shorter_than_lateness_is_refused() {
        let config = AggregateConfig {
            retention_ms: vec![Some(30 * Resolution::MINUTE), None, None],
            ..AggregateConfig::default()
        };
        let err = config.validate().unwrap_err();
        assert!(err.contains("retention of 1m (30m)"), "{err}");
        assert!(err.contains("allowed lateness (1h)"), "{err}");
    }
}
