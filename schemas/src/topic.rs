//! The telemetry topic `dt/{fleet}/{device_id}/telemetry`.

use crate::reject::{RejectReason, Rejection};

/// The longest fleet or device id.
pub const MAX_ID_LEN: usize = 64;

/// The fleet and device a telemetry topic names, borrowed from the topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topic<'a> {
    pub fleet: &'a str,
    pub device_id: &'a str,
}

impl<'a> Topic<'a> {
    /// Parses a PUBLISH topic. Wildcards are refused here because a PUBLISH to
    /// `dt/+/x/telemetry` would otherwise be taken as fleet `+`.
    pub fn parse(topic: &'a str) -> Result<Self, Rejection> {
        let mut parts = topic.split('/');
        let (Some("dt"), Some(fleet), Some(device_id), Some("telemetry"), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(Rejection::new(
                RejectReason::BadTopic,
                format!(
                    "topic `{}` is not dt/{{fleet}}/{{device_id}}/telemetry",
                    clip(topic)
                ),
            ));
        };
        check_id("fleet", fleet).map_err(|d| Rejection::new(RejectReason::BadTopic, d))?;
        check_id("device_id", device_id).map_err(|d| Rejection::new(RejectReason::BadTopic, d))?;
        Ok(Topic { fleet, device_id })
    }

    pub fn format(fleet: &str, device_id: &str) -> String {
        format!("dt/{fleet}/{device_id}/telemetry")
    }
}

/// Checks a fleet or device id: 1..=64 chars of `[A-Za-z0-9_.:-]`.
pub fn check_id(what: &str, id: &str) -> Result<(), String> {
    check_name(
        what,
        id,
        MAX_ID_LEN,
        |b| matches!(b, b'_' | b'.' | b':' | b'-'),
        "_ . : -",
    )
}

/// Checks that `s` is 1..=`max_len` characters, each an ASCII letter or
/// digit or a byte `is_punct` allows (`allowed` lists those for the error);
/// `what` names `s` in the error. Ids and metric names share it.
pub(crate) fn check_name(
    what: &str,
    s: &str,
    max_len: usize,
    is_punct: impl Fn(u8) -> bool,
    allowed: &str,
) -> Result<(), String> {
    if s.is_empty() || s.len() > max_len {
        return Err(format!(
            "{what} must be 1..={max_len} characters, got {}",
            s.len()
        ));
    }
    let ok = |b: u8| b.is_ascii_alphanumeric() || is_punct(b);
    // Every allowed character is ASCII, so checking bytes is exact and much
    // faster; the slow path only runs to name the offending character.
    if s.bytes().all(ok) {
        return Ok(());
    }
    if let Some(c) = s.chars().find(|c| !(c.is_ascii() && ok(*c as u8))) {
        return Err(format!(
            "{what} `{}` contains `{}`; allowed are A-Z a-z 0-9 {allowed}",
            clip(s),
            c.escape_default()
        ));
    }
    Ok(())
}

/// Keeps details readable when the input is huge or hostile.
pub(crate) fn clip(s: &str) -> String {
    clip_to(s, 80).escape_debug().to_string()
}

/// The longest prefix of `s` within `max` bytes, marked when cut.
pub(crate) fn clip_to(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_telemetry_topic() {
        let t = Topic::parse("dt/fleet-1/dev:42.a_b/telemetry").unwrap();
        assert_eq!(t.fleet, "fleet-1");
        assert_eq!(t.device_id, "dev:42.a_b");
        assert_eq!(
            Topic::format(t.fleet, t.device_id),
            "dt/fleet-1/dev:42.a_b/telemetry"
        );
    }

    #[test]
    fn refuses_everything_else() {
        let long = "x".repeat(65);
        let too_long = format!("dt/f/{long}/telemetry");
        for bad in [
            "",
            "dt",
            "dt/f/d",
            "dt/f/d/telemetry/extra",
            "dt//d/telemetry",
            "dt/f//telemetry",
            "dt/+/d/telemetry",
            "dt/f/#/telemetry",
            "dt/f/d/status",
            "cmd/f/d/telemetry",
            "dt/f/dé/telemetry",
            "dt/f/d d/telemetry",
            too_long.as_str(),
        ] {
            let err = Topic::parse(bad).unwrap_err();
            assert_eq!(err.reason, RejectReason::BadTopic, "{bad}");
        }
    }

    #[test]
    fn accepts_the_longest_id() {
        let id = "a".repeat(64);
        let topic = Topic::format("f", &id);
        assert!(Topic::parse(&topic).is_ok());
    }
}
