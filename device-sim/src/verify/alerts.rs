//! The pipeline's alerts against the windows verify found exact.
//!
//! A rule (`[[alerts.rules]]` of iotpipe's config file, read here with the
//! simulator's own code) watches one fleet's or one device's 1-minute
//! windows. Once verify has found every window exact, the windows the API
//! serves are the ones the simulator expects, so each can be judged here:
//!
//! - a window that ended before the run's last acknowledgement (less a
//!   margin for the slowest shard's watermark) is judged: it must have fired
//!   at the revision the API shows if its value crosses the threshold, and
//!   not fired at that revision if it does not;
//! - a revised window may also have fired at earlier revisions (the rule
//!   judges each revision it sees, and which it sees depends on when the
//!   late readings came): those are counted, not failed; a firing at a
//!   revision the window never reached, or for a window with no readings,
//!   fails;
//! - a window that ended later may or may not have been judged yet; what
//!   fired for it must still be right.
//!
//! Checked rules compare count, sum, min, max or avg with `for = 1`, which
//! verify knows exactly; other rules are refused when they are read.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::api::{Api, Scope};
use super::compare::ApiWindow;
use crate::plan::MINUTE_MS;

/// How long before the last acknowledgement a window must end to be judged:
/// the processed watermark is the slowest shard's.
const JUDGE_MARGIN_MS: i64 = 5_000;

/// One rule as the simulator reads it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub name: String,
    #[serde(default)]
    pub fleet: Option<String>,
    #[serde(default)]
    pub device: Option<String>,
    pub metric: String,
    pub resolution: String,
    pub aggregate: String,
    pub comparison: String,
    pub threshold: f64,
    #[serde(rename = "for", default = "one")]
    pub for_windows: u32,
}

fn one() -> u32 {
    1
}

/// The rules of an iotpipe config file (its other sections are not read),
/// each checked to be one verify can judge.
pub fn load_rules(path: &Path) -> anyhow::Result<Vec<RuleSpec>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_rules(&text).with_context(|| format!("{}", path.display()))
}

pub fn parse_rules(text: &str) -> anyhow::Result<Vec<RuleSpec>> {
    // Only the rules are the simulator's business: read them, skip the rest.
    let value: toml::Value = toml::from_str(text)?;
    let rules: Vec<RuleSpec> = match value.get("alerts").and_then(|a| a.get("rules")) {
        Some(rules) => rules.clone().try_into()?,
        None => Vec::new(),
    };
    ensure!(!rules.is_empty(), "no [[alerts.rules]] to check");
    for r in &rules {
        r.check()
            .with_context(|| format!("alert rule `{}`", r.name))?;
    }
    Ok(rules)
}

impl RuleSpec {
    fn check(&self) -> anyhow::Result<()> {
        ensure!(
            self.fleet.is_some() != self.device.is_some(),
            "give fleet or device, one of them"
        );
        ensure!(
            matches!(self.resolution.as_str(), "1m" | "60s"),
            "verify checks 1-minute windows, not `{}`",
            self.resolution
        );
        ensure!(self.for_windows == 1, "verify checks rules without `for`");
        self.value(&ApiWindow::default())?;
        self.crosses(0.0)?;
        Ok(())
    }

    fn scope(&self) -> Scope<'_> {
        match (&self.fleet, &self.device) {
            (Some(f), _) => Scope::Fleet(f),
            (None, Some(d)) => Scope::Device(d),
            (None, None) => Scope::Fleet(""),
        }
    }

    fn value(&self, w: &ApiWindow) -> anyhow::Result<f64> {
        Ok(match self.aggregate.as_str() {
            "count" => w.count as f64,
            "sum" => w.sum,
            "min" => w.min,
            "max" => w.max,
            "avg" => w.avg,
            other => bail!("verify checks count, sum, min, max and avg, not `{other}`"),
        })
    }

    fn crosses(&self, value: f64) -> anyhow::Result<bool> {
        let t = self.threshold;
        Ok(match self.comparison.as_str() {
            ">" => value > t,
            ">=" => value >= t,
            "<" => value < t,
            "<=" => value <= t,
            other => bail!("`{other}` is no comparison (>, >=, <, <=)"),
        })
    }
}

/// What the alerts check found, over every rule.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AlertCheck {
    pub rules: usize,
    /// Windows judged: ended early enough that the rule must have seen them.
    pub windows_judged: u64,
    /// Judged windows whose value crosses the threshold: each must have
    /// fired at its revision.
    pub crossing: u64,
    /// Judged windows revised by late readings.
    pub revised: u64,
    /// Alerts listed, over every rule.
    pub fired: u64,
    /// Alerts of an earlier revision of a revised window.
    pub earlier_revisions: u64,
    /// `rule/window start/revision` of each alert that should have fired
    /// and did not, and of each that fired and should not have.
    pub missing: Vec<String>,
    pub unexpected: Vec<String>,
    pub ok: bool,
}

impl std::fmt::Display for AlertCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "alerts: {} — {} rules, {} windows judged ({} crossing, {} revised), {} fired ({} at earlier revisions)",
            if self.ok { "exact" } else { "MISMATCH" },
            self.rules,
            self.windows_judged,
            self.crossing,
            self.revised,
            self.fired,
            self.earlier_revisions,
        )?;
        for (what, ids) in [("missing", &self.missing), ("unexpected", &self.unexpected)] {
            if !ids.is_empty() {
                let shown: Vec<&str> = ids.iter().take(10).map(String::as_str).collect();
                write!(f, "; {} {what}: {}", ids.len(), shown.join(", "))?;
            }
        }
        writeln!(f)
    }
}

/// One listed alert, as `GET /v1/alerts` shows it.
#[derive(Debug, Clone, Deserialize)]
struct Fired {
    window_start: i64,
    revision: u64,
}

#[derive(Deserialize)]
struct Listing {
    alerts: Vec<Fired>,
}

/// Checks every rule until its alerts are exact or `timeout` passes.
/// Windows that ended by `acked_until_ms` (the run's last acknowledgement)
/// less a margin are judged; `from_ms` bounds the windows read.
pub async fn check(
    url: &str,
    rules: &[RuleSpec],
    from_ms: i64,
    acked_until_ms: i64,
    timeout: Duration,
) -> anyhow::Result<AlertCheck> {
    let api = Api::new(url, 4)?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let base = url.trim_end_matches('/');
    let deadline = Instant::now() + timeout;
    loop {
        let mut all = AlertCheck {
            rules: rules.len(),
            ..AlertCheck::default()
        };
        for rule in rules {
            let windows = api
                .windows(
                    rule.scope(),
                    &rule.metric,
                    MINUTE_MS,
                    from_ms,
                    acked_until_ms + MINUTE_MS,
                )
                .await?;
            let listed: Listing = http
                .get(format!("{base}/v1/alerts"))
                .query(&[("rule", rule.name.as_str()), ("limit", "1000")])
                .send()
                .await?
                .error_for_status()?
                .json()
                .await
                .context("GET /v1/alerts: unexpected body")?;
            judge(
                rule,
                &windows,
                &listed.alerts,
                acked_until_ms - JUDGE_MARGIN_MS,
                &mut all,
            )?;
        }
        all.ok = all.missing.is_empty() && all.unexpected.is_empty();
        if all.ok || Instant::now() >= deadline {
            return Ok(all);
        }
        // Polling another process's evaluator: nothing to await instead.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One rule's alerts against its windows. Pure.
fn judge(
    rule: &RuleSpec,
    windows: &[ApiWindow],
    fired: &[Fired],
    judged_until_ms: i64,
    out: &mut AlertCheck,
) -> anyhow::Result<()> {
    let by_start: BTreeMap<i64, &ApiWindow> = windows.iter().map(|w| (w.start, w)).collect();
    let id = |start: i64, revision: u64| format!("{}/{start}/{revision}", rule.name);
    let mut at_revision: BTreeMap<i64, bool> = BTreeMap::new();
    out.fired += fired.len() as u64;
    for a in fired {
        match by_start.get(&a.window_start) {
            Some(w) if a.revision == w.revision => {
                if !rule.crosses(rule.value(w)?)? {
                    out.unexpected.push(id(a.window_start, a.revision));
                }
                at_revision.insert(w.start, true);
            }
            Some(w) if a.revision < w.revision => out.earlier_revisions += 1,
            _ => out.unexpected.push(id(a.window_start, a.revision)),
        }
    }
    for w in windows.iter().filter(|w| w.end <= judged_until_ms) {
        out.windows_judged += 1;
        out.revised += u64::from(w.revision > 0);
        if rule.crosses(rule.value(w)?)? {
            out.crossing += 1;
            if !at_revision.contains_key(&w.start) {
                out.missing.push(id(w.start, w.revision));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(start: i64, count: u64, revision: u64) -> ApiWindow {
        ApiWindow {
            start,
            end: start + MINUTE_MS,
            count,
            revision,
            ..ApiWindow::default()
        }
    }

    fn rule(threshold: f64) -> RuleSpec {
        parse_rules(&format!(
            "[mqtt]\nlisten = 'x'\n[[alerts.rules]]\nname = 'busy'\nfleet = 'f'\nmetric = 'm'\n\
             resolution = '1m'\naggregate = 'count'\ncomparison = '>='\nthreshold = {threshold}\n"
        ))
        .unwrap()
        .remove(0)
    }

    fn fired(start: i64, revision: u64) -> Fired {
        Fired {
            window_start: start,
            revision,
        }
    }

    #[test]
    fn exact_alerts_pass_and_every_kind_of_wrong_one_fails() {
        let r = rule(5.0);
        let m = MINUTE_MS;
        // Crossing at 0 (revision 2, fired at 1 and 2), not crossing at m,
        // crossing at 2m (revision 0), and 3m too recent to be judged.
        let ws = [
            window(0, 6, 2),
            window(m, 4, 0),
            window(2 * m, 5, 0),
            window(3 * m, 9, 0),
        ];
        let exact = [fired(0, 1), fired(0, 2), fired(2 * m, 0)];
        let mut out = AlertCheck::default();
        judge(&r, &ws, &exact, 3 * m, &mut out).unwrap();
        assert_eq!(
            (
                out.windows_judged,
                out.crossing,
                out.revised,
                out.earlier_revisions
            ),
            (3, 2, 1, 1)
        );
        assert!(
            out.missing.is_empty() && out.unexpected.is_empty(),
            "{out:?}"
        );

        let wrong = [
            (vec![fired(0, 2)], "missing"), // 2m never fired
            (
                vec![fired(0, 2), fired(2 * m, 0), fired(m, 0)],
                "unexpected",
            ), // m does not cross
            (
                vec![fired(0, 2), fired(2 * m, 0), fired(0, 3)],
                "unexpected",
            ), // a revision never reached
            (
                vec![fired(0, 2), fired(2 * m, 0), fired(9 * m, 0)],
                "unexpected",
            ), // no such window
        ];
        for (alerts, what) in wrong {
            let mut out = AlertCheck::default();
            judge(&r, &ws, &alerts, 3 * m, &mut out).unwrap();
            let found = if what == "missing" {
                &out.missing
            } else {
                &out.unexpected
            };
            assert_eq!(found.len(), 1, "{alerts:?}: {out:?}");
        }
    }

    #[test]
    fn rules_verify_cannot_judge_are_refused_in_words() {
        let base = "[[alerts.rules]]\nname = 'r'\nmetric = 'm'\ncomparison = '>'\nthreshold = 1\n";
        for (extra, says) in [
            (
                "fleet = 'f'\nresolution = '1h'\naggregate = 'avg'\n",
                "1-minute",
            ),
            (
                "fleet = 'f'\nresolution = '1m'\naggregate = 'p99'\n",
                "not `p99`",
            ),
            (
                "fleet = 'f'\nresolution = '1m'\naggregate = 'avg'\nfor = 3\n",
                "without `for`",
            ),
            ("resolution = '1m'\naggregate = 'avg'\n", "fleet or device"),
        ] {
            let err = format!("{:#}", parse_rules(&format!("{base}{extra}")).unwrap_err());
            assert!(err.contains(says), "{extra}: {err}");
        }
        assert!(parse_rules("[mqtt]\n").is_err(), "no rules is an error");
    }
}
