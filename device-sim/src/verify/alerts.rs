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
//! A rule with `for = N` fires a window that crosses when the N − 1 windows
//! right before it cross too, as the pipeline's evaluator
//! (`rollup::alerts::evaluate`) defines it: a window with no readings breaks
//! the chain, and the chain is judged on the windows as they are when the
//! last window is judged. So a window whose chain holds now must have fired
//! at its revision; one whose chain is broken now may still have fired at
//! its revision if every window that breaks it was revised since (it may
//! have crossed before its late readings): those are counted, not failed.
//!
//! Checked rules compare count, sum, min, max or avg, which verify knows
//! exactly; other rules are refused when they are read.

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
/// The most consecutive windows a rule may ask for, as the pipeline allows
/// (`rollup::alerts::MAX_FOR_WINDOWS`).
const MAX_FOR_WINDOWS: u32 = 1000;

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
        ensure!(
            (1..=MAX_FOR_WINDOWS).contains(&self.for_windows),
            "`for` must be 1 to {MAX_FOR_WINDOWS} windows, not {}",
            self.for_windows
        );
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

    /// Whether window `w` crosses the threshold; as the pipeline's rule, a
    /// window without readings never does.
    fn holds(&self, w: &ApiWindow) -> anyhow::Result<bool> {
        Ok(w.count > 0 && self.crosses(self.value(w)?)?)
    }

    /// Whether the `for` chain that `w` ends holds in `by_start` (the
    /// series' windows as they are now), and if not, whether every window
    /// that breaks it before `w` was revised, so that it may have held when
    /// the pipeline judged `w`.
    fn chain(&self, by_start: &BTreeMap<i64, &ApiWindow>, w: &ApiWindow) -> anyhow::Result<Chain> {
        if !self.holds(w)? {
            return Ok(Chain::Broken);
        }
        let mut chain = Chain::Holds;
        for k in 1..i64::from(self.for_windows) {
            match by_start.get(&(w.start - k * MINUTE_MS)) {
                Some(before) if self.holds(before)? => {}
                Some(before) if before.revision > 0 => chain = Chain::BrokenSinceRevised,
                _ => return Ok(Chain::Broken),
            }
        }
        Ok(chain)
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

/// A `for` chain judged on the windows as they are now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chain {
    /// The window and the `for - 1` windows right before it cross.
    Holds,
    /// It does not, and did not when the window was judged.
    Broken,
    /// The window crosses; each earlier window that does not was revised
    /// since, and may have crossed before.
    BrokenSinceRevised,
}

/// What the alerts check found, over every rule.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AlertCheck {
    pub rules: usize,
    /// Windows judged: ended early enough that the rule must have seen them.
    pub windows_judged: u64,
    /// Judged windows that cross the threshold, with the `for` chain right
    /// before them: each must have fired at its revision.
    pub crossing: u64,
    /// Judged windows revised by late readings.
    pub revised: u64,
    /// Alerts listed, over every rule.
    pub fired: u64,
    /// Alerts of an earlier revision of a revised window.
    pub earlier_revisions: u64,
    /// Alerts of a `for` rule whose chain is broken now by windows revised
    /// since: the chain may have held when the rule judged the window.
    pub chains_revised: u64,
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
            "alerts: {} — {} rules, {} windows judged ({} crossing, {} revised), {} fired ({} at earlier revisions, {} with a chain revised since)",
            if self.ok { "exact" } else { "MISMATCH" },
            self.rules,
            self.windows_judged,
            self.crossing,
            self.revised,
            self.fired,
            self.earlier_revisions,
            self.chains_revised,
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
            // The `for` chains of the first windows reach back before them.
            let chain_ms = i64::from(rule.for_windows - 1) * MINUTE_MS;
            let windows = api
                .windows(
                    rule.scope(),
                    &rule.metric,
                    MINUTE_MS,
                    from_ms - chain_ms,
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
                match rule.chain(&by_start, w)? {
                    Chain::Holds => {}
                    Chain::BrokenSinceRevised => out.chains_revised += 1,
                    Chain::Broken => out.unexpected.push(id(a.window_start, a.revision)),
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
        if rule.chain(&by_start, w)? == Chain::Holds {
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
        rule_for(threshold, 1)
    }

    fn rule_for(threshold: f64, n: u32) -> RuleSpec {
        parse_rules(&format!(
            "[mqtt]\nlisten = 'x'\n[[alerts.rules]]\nname = 'busy'\nfleet = 'f'\nmetric = 'm'\n\
             resolution = '1m'\naggregate = 'count'\ncomparison = '>='\nthreshold = {threshold}\n\
             for = {n}\n"
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
        let out = judged(&r, &ws, &exact, 3 * m);
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
            let out = judged(&r, &ws, &alerts, 3 * m);
            let found = if what == "missing" {
                &out.missing
            } else {
                &out.unexpected
            };
            assert_eq!(found.len(), 1, "{alerts:?}: {out:?}");
        }
    }

    fn judged(r: &RuleSpec, ws: &[ApiWindow], alerts: &[Fired], until: i64) -> AlertCheck {
        let mut out = AlertCheck::default();
        judge(r, ws, alerts, until, &mut out).unwrap();
        out
    }

    /// `for = 2`, count >= 5: the windows at 1m, 2m and 9m end chains that
    /// hold; 0m crosses with nothing before it; 4m crosses after 3m, which
    /// does not; 6m crosses after 5m, which has no readings; 8m crosses after
    /// 7m, which does not now but was revised since; 10m does not cross
    /// after 9m, which does.
    #[test]
    fn for_n_fires_exactly_the_windows_that_end_a_chain() {
        let r = rule_for(5.0, 2);
        let m = MINUTE_MS;
        let ws = [
            window(0, 6, 0),
            window(m, 5, 1),
            window(2 * m, 9, 0),
            window(3 * m, 4, 0),
            window(4 * m, 7, 0),
            window(6 * m, 8, 0),
            window(7 * m, 4, 1),
            window(8 * m, 6, 0),
            window(9 * m, 6, 0),
            window(10 * m, 1, 0),
        ];
        let until = 11 * m;
        // 1m also fired at its revision 0, before its late reading.
        let exact = [fired(m, 0), fired(m, 1), fired(2 * m, 0), fired(9 * m, 0)];
        let out = judged(&r, &ws, &exact, until);
        assert!(
            out.missing.is_empty() && out.unexpected.is_empty(),
            "{out:?}"
        );
        assert_eq!(
            (out.windows_judged, out.crossing, out.earlier_revisions),
            (10, 3, 1)
        );

        // 8m fired while 7m still crossed, before its late reading took it
        // below: counted, not failed.
        let out = judged(&r, &ws, &[&exact[..], &[fired(8 * m, 0)]].concat(), until);
        assert!(out.unexpected.is_empty(), "{out:?}");
        assert_eq!(out.chains_revised, 1);

        let wrong = [
            // 2m's chain holds and it never fired.
            (
                vec![fired(m, 0), fired(m, 1), fired(9 * m, 0)],
                "missing",
                "busy/120000/0",
            ),
            // 0m crosses, but nothing comes before it.
            (vec![fired(0, 0)], "unexpected", "busy/0/0"),
            // 4m crosses, 3m before it does not and was never revised.
            (vec![fired(4 * m, 0)], "unexpected", "busy/240000/0"),
            // 6m crosses, but 5m has no readings.
            (vec![fired(6 * m, 0)], "unexpected", "busy/360000/0"),
            // 10m does not cross itself, whatever came before.
            (vec![fired(10 * m, 0)], "unexpected", "busy/600000/0"),
        ];
        for (extra, what, named) in wrong {
            let alerts = if what == "missing" {
                extra
            } else {
                [&exact[..], &extra].concat()
            };
            let out = judged(&r, &ws, &alerts, until);
            let found = if what == "missing" {
                &out.missing
            } else {
                &out.unexpected
            };
            assert_eq!(found, &[named.to_string()], "{alerts:?}: {out:?}");
            assert_eq!(out.missing.len() + out.unexpected.len(), 1, "{out:?}");
        }
    }

    /// A `for = 3` chain needs both windows before the one it fires: read
    /// without the first, the third fires nothing.
    #[test]
    fn for_n_reads_the_whole_chain() {
        let m = MINUTE_MS;
        let ws = [window(0, 6, 0), window(m, 6, 0), window(2 * m, 6, 0)];
        let out = judged(&rule_for(5.0, 3), &ws, &[fired(2 * m, 0)], 3 * m);
        assert!(
            out.missing.is_empty() && out.unexpected.is_empty(),
            "{out:?}"
        );
        assert_eq!(out.crossing, 1);
        let out = judged(&rule_for(5.0, 3), &ws, &[], 3 * m);
        assert_eq!(out.missing, ["busy/120000/0".to_string()]);
        let out = judged(&rule_for(5.0, 3), &ws[1..], &[fired(2 * m, 0)], 3 * m);
        assert_eq!(out.unexpected, ["busy/120000/0".to_string()]);
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
                "fleet = 'f'\nresolution = '1m'\naggregate = 'avg'\nfor = 0\n",
                "`for` must be 1 to 1000",
            ),
            ("resolution = '1m'\naggregate = 'avg'\n", "fleet or device"),
        ] {
            let err = format!("{:#}", parse_rules(&format!("{base}{extra}")).unwrap_err());
            assert!(err.contains(says), "{extra}: {err}");
        }
        assert!(parse_rules("[mqtt]\n").is_err(), "no rules is an error");
    }
}
