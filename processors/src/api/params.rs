//! Query parameters, parsed strictly: an unknown or malformed parameter is a
//! 400 that names it, not a silently ignored typo.

use schemas::Resolution;

use super::problem::Problem;

/// The parameters of a request, in order, with each one taken at most once.
#[derive(Debug, Default)]
pub struct Params {
    pairs: Vec<(String, String)>,
}

impl Params {
    /// Parses a raw query string and refuses parameters not in `allowed`.
    pub fn parse(raw: Option<&str>, allowed: &[&str]) -> Result<Self, Problem> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.unwrap_or(""))
            .map_err(|e| Problem::bad_request(format!("query string: {e}")))?;
        for (i, (k, _)) in pairs.iter().enumerate() {
            if !allowed.contains(&k.as_str()) {
                return Err(Problem::bad_request(format!(
                    "unknown parameter `{k}`; this endpoint takes {}",
                    allowed.join(", ")
                )));
            }
            if pairs[..i].iter().any(|(prev, _)| prev == k) {
                return Err(Problem::bad_request(format!("parameter `{k}` given twice")));
            }
        }
        Ok(Params { pairs })
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn time(&self, key: &str) -> Result<Option<i64>, Problem> {
        self.get(key).map(|v| parse_time(key, v)).transpose()
    }

    pub fn resolution(&self, key: &str) -> Result<Option<Resolution>, Problem> {
        self.get(key)
            .map(|v| {
                v.parse::<Resolution>()
                    .map_err(|e| Problem::bad_request(format!("`{key}`: {e}")))
            })
            .transpose()
    }

    pub fn limit(&self, default: usize, max: usize) -> Result<usize, Problem> {
        match self.get("limit") {
            None => Ok(default),
            Some(v) => match v.parse::<usize>() {
                Ok(n) if (1..=max).contains(&n) => Ok(n),
                _ => Err(Problem::bad_request(format!(
                    "`limit` must be an integer in 1..={max}, got `{v}`"
                ))),
            },
        }
    }
}

/// A time parameter: ms since the epoch, or RFC 3339.
pub fn parse_time(key: &str, v: &str) -> Result<i64, Problem> {
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        return v
            .parse::<i64>()
            .ok()
            .filter(|ms| *ms <= schemas::reading::MAX_TS)
            .ok_or_else(|| Problem::bad_request(format!("`{key}` is out of range: `{v}`")));
    }
    chrono::DateTime::parse_from_rfc3339(v)
        .map(|t| t.timestamp_millis())
        .ok()
        .filter(|ms| (0..=schemas::reading::MAX_TS).contains(ms))
        .ok_or_else(|| {
            Problem::bad_request(format!(
                "`{key}` must be ms since the epoch or RFC 3339 (2026-01-31T12:00:00Z), got `{v}`"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_both_ways() {
        assert_eq!(
            parse_time("from", "1764240000123").unwrap(),
            1_764_240_000_123
        );
        assert_eq!(parse_time("from", "1970-01-01T00:00:01Z").unwrap(), 1000);
        assert_eq!(
            parse_time("from", "2026-01-01T01:00:00+01:00").unwrap(),
            1_767_225_600_000
        );
        for bad in [
            "",
            "-1",
            "yesterday",
            "1e3",
            "99999999999999999999",
            "1969-12-31T23:59:59Z",
        ] {
            assert!(parse_time("from", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_and_repeated_parameters_are_refused() {
        assert!(Params::parse(Some("res=1m&form=1"), &["res", "from"]).is_err());
        assert!(Params::parse(Some("res=1m&res=1h"), &["res"]).is_err());
        let p = Params::parse(Some("res=5m&limit=10"), &["res", "limit"]).unwrap();
        assert_eq!(p.resolution("res").unwrap().unwrap().to_string(), "5m");
        assert_eq!(p.limit(100, 1000).unwrap(), 10);
        let p = Params::parse(Some("limit=0"), &["limit"]).unwrap();
        assert!(p.limit(100, 1000).is_err());
    }
}
