//! One evaluation pass: each rule's windows that can still change, read as
//! the API reads them, judged by the core, and each firing written once.

use std::sync::atomic::Ordering::Relaxed;

use rollup::alerts::{AlertRule, Firing, Scope};
use rollup::keys::{self, DEVICE_SK, ItemKey};
use rollup::{Commit, Condition, Write};
use schemas::state::{AlertState, Item, ItemState};

use super::AlertContext;
use crate::api::windows::{self, Series, WindowQuery};
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The windows of a rule could not be read.
    #[error("rule `{rule}`: {detail}")]
    Read { rule: String, detail: String },
}

/// What one pass over the rules found.
#[derive(Debug, Default)]
pub struct Pass {
    /// The alerts this pass fired (wrote), once each.
    pub fired: Vec<AlertState>,
    /// The alerts in the evaluated range not yet delivered: those just
    /// fired, and those an earlier pass or process fired but did not
    /// deliver, for the notifier.
    pub undelivered: Vec<(ItemKey, AlertState)>,
}

/// Evaluates every rule once and writes what fired.
pub async fn evaluate_rules(ctx: &AlertContext) -> Result<Pass, AlertError> {
    let mut pass = Pass::default();
    for rule in &ctx.setup.rules {
        let Some((series, fleet)) = series_of(ctx, rule).await? else {
            continue;
        };
        let firings = firings(ctx, rule, series).await?;
        record(ctx, rule, &fleet, firings, &mut pass).await?;
    }
    Ok(pass)
}

/// The series a rule watches and its fleet; `None` for a device that has
/// sent nothing yet.
async fn series_of(
    ctx: &AlertContext,
    rule: &AlertRule,
) -> Result<Option<(Series, String)>, AlertError> {
    match &rule.scope {
        Scope::Fleet(fleet) => Ok(Some((Series::Fleet(fleet.clone()), fleet.clone()))),
        Scope::Device(device) => match ctx.query.get(&keys::device_pk(device), DEVICE_SK).await? {
            Some(Item {
                state: ItemState::Device(d),
                ..
            }) => {
                let fleet = d.fleet.clone();
                Ok(Some((Series::Device(device.clone(), d), fleet)))
            }
            _ => Ok(None),
        },
    }
}

/// The rule's firings among the windows that can still change (ended within
/// the allowed lateness before the watermark), with the `for` chain's
/// windows before them.
async fn firings(
    ctx: &AlertContext,
    rule: &AlertRule,
    series: Series,
) -> Result<Vec<Firing>, AlertError> {
    let read_err = |detail: String| AlertError::Read {
        rule: rule.name.clone(),
        detail,
    };
    let watermark = windows::watermark(ctx.query.as_ref(), &series)
        .await
        .map_err(|p| read_err(p.detail))?;
    if watermark == i64::MIN {
        return Ok(Vec::new());
    }
    let (from, to) = rule.read_range(watermark, ctx.aggregate.allowed_lateness_ms);
    let limit = usize::try_from((to - from) / rule.res.ms() + 2).unwrap_or(usize::MAX);
    let q = WindowQuery {
        series,
        metric: rule.metric.clone(),
        res: rule.res,
        from,
        to,
        limit,
    };
    let page = windows::query(ctx.query.as_ref(), &q, &ctx.aggregate)
        .await
        .map_err(|p| read_err(p.detail))?;
    Ok(rollup::alerts::evaluate(
        rule,
        &page.windows,
        page.watermark,
    ))
}

/// Writes each firing not yet stored, once; adds it and those not
/// delivered to `pass`.
async fn record(
    ctx: &AlertContext,
    rule: &AlertRule,
    fleet: &str,
    firings: Vec<Firing>,
    pass: &mut Pass,
) -> Result<(), AlertError> {
    // Each alert, then its delivery mark.
    let keys: Vec<ItemKey> = firings
        .iter()
        .flat_map(|f| {
            let (rule, start, revision) = (f.rule.clone(), f.window_start, f.revision);
            [
                ItemKey::Alert {
                    rule: rule.clone(),
                    start,
                    revision,
                },
                ItemKey::AlertDelivered {
                    rule,
                    start,
                    revision,
                },
            ]
        })
        .collect();
    let loaded = ctx.store.load(&keys).await?;
    let now = (ctx.clock)();
    let mut writes = Vec::new();
    let mut undelivered = Vec::new();
    let mut fired = Vec::new();
    let found = keys.chunks(2).zip(loaded.chunks(2));
    for ((keys, stored), firing) in found.zip(firings) {
        let key = keys[0].clone();
        let state = |i: usize| stored[i].as_ref().map(|l| &l.item.state);
        match (state(0), state(1)) {
            (_, Some(ItemState::AlertDelivered(_))) => {}
            (Some(ItemState::Alert(a)), _) => undelivered.push((key, a.clone())),
            _ => {
                let alert = alert_state(rule, fleet, &firing, now);
                tracing::info!(
                    rule = %rule.name,
                    window_start = firing.window_start,
                    revision = firing.revision,
                    value = firing.value,
                    "An alert fired."
                );
                writes.push(Write {
                    key: key.clone(),
                    // Another process or an earlier pass may have written it
                    // meanwhile: the first one stays.
                    condition: Condition::InsertOnce,
                    item: Item {
                        applied: Default::default(),
                        state: ItemState::Alert(alert.clone()),
                    },
                    expires_at: Some(now.saturating_add(ctx.setup.keep_ms)),
                });
                fired.push(alert.clone());
                undelivered.push((key, alert));
            }
        }
    }
    let n = writes.len() as u64;
    if !writes.is_empty() {
        ctx.store
            .commit(Commit {
                writes,
                then: Vec::new(),
            })
            .await?;
    }
    ctx.metrics.fired.fetch_add(n, Relaxed);
    pass.fired.extend(fired);
    pass.undelivered.extend(undelivered);
    Ok(())
}

fn alert_state(rule: &AlertRule, fleet: &str, f: &Firing, now: i64) -> AlertState {
    AlertState {
        rule: rule.name.clone(),
        fleet: fleet.to_string(),
        device: match &rule.scope {
            Scope::Device(d) => Some(d.clone()),
            Scope::Fleet(_) => None,
        },
        metric: rule.metric.clone(),
        resolution: rule.res.to_string(),
        aggregate: rule.aggregate.as_str().to_string(),
        comparison: rule.comparison.as_str().to_string(),
        threshold: rule.threshold,
        window_start: f.window_start,
        window_end: f.window_end,
        revision: f.revision,
        value: f.value,
        late_count: f.late_count,
        fired_at: now,
    }
}
