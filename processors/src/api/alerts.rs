//! `GET /v1/alerts`: the alerts fired, newest window first, each with its
//! delivery state.

use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use rollup::keys::{self, time_sk};
use schemas::state::{AlertState, ItemState};
use serde_json::{Value, json};

use super::params::Params;
use super::{ApiState, Problem, check_id};
use crate::store::Range;

/// Lists alerts of one rule (`rule=`) or of every configured rule, whose
/// window starts in `[from, to)`, newest first, at most `limit`.
pub(super) async fn list(
    State(s): State<ApiState>,
    RawQuery(raw): RawQuery,
) -> Result<Response, Problem> {
    let p = Params::parse(raw.as_deref(), &["rule", "from", "to", "limit"])?;
    let limit = p.limit(100, 1000)?;
    let rules: Vec<String> = match p.get("rule") {
        Some(rule) => {
            check_id("rule", rule)?;
            vec![rule.to_string()]
        }
        None => s.alert_rules.to_vec(),
    };
    let from = p.time("from")?.map_or_else(String::new, time_sk);
    // Above every sort key of the partition: digits and `|`.
    let to = p.time("to")?.map_or_else(|| "~".to_string(), time_sk);
    let mut alerts: Vec<(AlertState, Option<i64>)> = Vec::new();
    for rule in rules {
        let rows = s
            .query
            .range(Range {
                pk: keys::alert_pk(&rule),
                from: from.clone(),
                to: to.clone(),
                // Each alert and its delivery mark.
                limit: 2 * limit,
                descending: true,
            })
            .await?;
        // Descending, a mark comes right before its alert.
        let mut mark = None;
        for (_, item) in rows {
            match item.state {
                ItemState::AlertDelivered(at) => mark = Some(at),
                ItemState::Alert(a) => alerts.push((a, mark.take())),
                _ => {}
            }
        }
    }
    alerts.sort_by(|(a, _), (b, _)| {
        (b.window_start, b.revision)
            .cmp(&(a.window_start, a.revision))
            .then_with(|| a.rule.cmp(&b.rule))
    });
    alerts.truncate(limit);
    let alerts: Vec<Value> = alerts.iter().map(|(a, at)| view(a, *at)).collect();
    Ok(axum::Json(json!({ "alerts": alerts })).into_response())
}

fn view(a: &AlertState, delivered_at: Option<i64>) -> Value {
    let mut v = crate::alerts::webhook::payload(a);
    if let Value::Object(fields) = &mut v {
        fields.insert("fired_at".into(), json!(a.fired_at));
        fields.insert("delivered".into(), json!(delivered_at.is_some()));
        fields.insert("delivered_at".into(), json!(delivered_at));
    }
    v
}
