//! The query API: one axum router, served locally by `iotpipe up` and on AWS
//! through `lambda_http`.
//!
//! - `guard`: bearer-token authentication and request limits.
//! - `dashboard`: the web page at `/`, compiled into the binary.
//! - `device_counts`: every fleet's devices by status, for `/metrics`.
//! - `problem`: errors as `application/problem+json`.
//! - `params`: strict query parameters and time parsing.
//! - `series`: the window series endpoints: `agg=` field selection, JSON and
//!   CSV answers.
//! - `windows`: fleet-part merging, query-time downsampling, pagination;
//!   the alert evaluator reads windows through it too.
//! - `alerts`: `GET /v1/alerts`.
//!
//! **Architecture Invariant:** handlers read the store only through
//! [`RollupQuery`] and the clock only through [`ApiState::clock`], so the same
//! router runs on SQLite, DynamoDB or memory, and tests fix the time.

mod alerts;
mod dashboard;
mod device_counts;
mod fill;
pub mod guard;
mod params;
mod problem;
mod series;
pub(crate) mod windows;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use rollup::liveness::{self, Status};
use schemas::state::{DeviceState, FleetMember, Item, ItemState, PresenceMark};
use serde_json::{Value, json};

pub use params::parse_time;
pub use problem::Problem;

use self::params::Params;
use crate::store::{Range, RollupQuery};
use rollup::AggregateConfig;
use rollup::keys::{self, COUNTER_PK, DEVICE_SK, counters};

/// The OpenAPI description of this router.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Windows per page unless `limit` says otherwise: a day of minutes.
const DEFAULT_LIMIT: usize = 1440;
const MAX_LIMIT: usize = 10_000;

/// Renders process metrics in Prometheus text format.
pub type MetricsRenderer = Arc<dyn Fn(&mut String) + Send + Sync>;

#[derive(Clone)]
pub struct ApiState {
    pub query: Arc<dyn RollupQuery>,
    pub config: Arc<AggregateConfig>,
    /// Now, in ms since the epoch: decides default ranges. `final` comes
    /// from the processed watermark in the store, never from the clock.
    pub clock: Arc<dyn Fn() -> i64 + Send + Sync>,
    /// Appends the process's metrics to `/metrics`.
    pub metrics: MetricsRenderer,
    /// Authentication, limits and the API's own counters.
    pub guard: Arc<guard::Guard>,
    /// When a device without readings counts as `stale`.
    pub stale_after: Arc<StaleAfter>,
    /// The configured alert rules' names: what `GET /v1/alerts` lists
    /// without `rule=`.
    pub alert_rules: Arc<[String]>,
    /// Whether `/metrics` counts every fleet's devices by status: a scan of
    /// the member partitions, cheap on a local store, a whole-table Scan on
    /// DynamoDB (see `device_counts`).
    pub device_counts: bool,
}

/// How long a device may send no reading before it is `stale`: one time for
/// every fleet, and a fleet's own where it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleAfter {
    pub default_ms: i64,
    pub fleets: BTreeMap<String, i64>,
}

impl Default for StaleAfter {
    fn default() -> Self {
        StaleAfter {
            default_ms: 5 * 60_000,
            fleets: BTreeMap::new(),
        }
    }
}

impl StaleAfter {
    pub fn of(&self, fleet: &str) -> i64 {
        self.fleets.get(fleet).copied().unwrap_or(self.default_ms)
    }

    /// The one parser of a stale-after time (`5m`, `90s`, `1h 30m`): for
    /// `iotpipe up --stale-after` and the query function's `STALE_AFTER`.
    pub fn parse(text: &str) -> Result<std::time::Duration, String> {
        humantime::parse_duration(text.trim()).map_err(|e| format!("`{text}`: {e}"))
    }
}

impl ApiState {
    pub fn new(query: Arc<dyn RollupQuery>, config: Arc<AggregateConfig>) -> Self {
        ApiState {
            query,
            config,
            clock: Arc::new(|| chrono::Utc::now().timestamp_millis()),
            metrics: Arc::new(|_| {}),
            guard: Arc::new(guard::Guard::new(None, guard::ApiLimits::default())),
            stale_after: Arc::new(StaleAfter::default()),
            alert_rules: Arc::from([]),
            device_counts: false,
        }
    }
}

/// The whole API.
pub fn app(state: ApiState) -> Router {
    Router::new()
        .route("/", get(dashboard::index))
        .route("/dashboard/app.js", get(dashboard::script))
        .route("/dashboard/style.css", get(dashboard::style))
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .route("/v1/devices", get(list_devices))
        .route("/v1/devices/{device_id}", get(device))
        .route(
            "/v1/devices/{device_id}/metrics/{metric}",
            get(series::device_windows),
        )
        .route(
            "/v1/fleets/{fleet}/metrics/{metric}",
            get(series::fleet_windows),
        )
        .route("/v1/stats", get(stats))
        .route("/v1/dead-letters", get(dead_letters))
        .route("/v1/alerts", get(alerts::list))
        .fallback(|| async { Problem::not_found("no such endpoint; see /openapi.json") })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "this endpoint only answers GET",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard::guard,
        ))
        .with_state(state)
}

async fn healthz() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn metrics(State(s): State<ApiState>) -> Response {
    let mut out = String::new();
    (s.metrics)(&mut out);
    s.guard.metrics.render(&mut out);
    if s.device_counts {
        // A store that cannot answer costs the counts, not the scrape.
        match device_counts::count(&s).await {
            Ok(counts) => device_counts::render(&counts, &mut out),
            Err(e) => {
                tracing::warn!(error = %e.detail, "Counting devices by status failed; /metrics leaves the counts out.")
            }
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

fn check_id(what: &str, id: &str) -> Result<(), Problem> {
    schemas::topic::check_id(what, id).map_err(Problem::bad_request)
}

fn check_metric(metric: &str) -> Result<(), Problem> {
    schemas::reading::check_metric_name(metric).map_err(Problem::bad_request)
}

/// Devices of one fleet, by a range read of its member partition (a Query
/// on DynamoDB). `fleet` is required: listing every fleet would read every
/// partition, which on DynamoDB is a Scan of the whole table.
///
/// A member row holds the device's presence and its `last_seen` as of its
/// latest span start (it is written then, not per reading). A row that reads
/// `online` is sure; for the others the device's latest span is read (one
/// single-item Query each) for its latest reading. So a page costs one Query
/// plus one per device that is stale or offline, or whose span started more
/// than `stale_after` ago.
async fn list_devices(
    State(s): State<ApiState>,
    RawQuery(raw): RawQuery,
) -> Result<Response, Problem> {
    let p = Params::parse(raw.as_deref(), &["fleet", "limit", "cursor", "status"])?;
    let limit = p.limit(1000, MAX_LIMIT)?;
    let Some(fleet) = p.get("fleet") else {
        return Err(Problem::bad_request(
            "`fleet` is required: devices are listed one fleet at a time (`/v1/devices?fleet=F`)",
        ));
    };
    check_id("fleet", fleet)?;
    let wanted: Option<Status> = p
        .get("status")
        .map(|st| st.parse().map_err(Problem::bad_request))
        .transpose()?;
    // The cursor is the last (fleet, device) returned; the next page starts
    // just after that device.
    let from = match p.get("cursor") {
        None => String::new(),
        Some(c) => match c.split_once('/') {
            Some((f, d)) if f == fleet => format!("{d}\u{0}"),
            _ => {
                return Err(Problem::bad_request(
                    "`cursor` is not one this API returned for this fleet",
                ));
            }
        },
    };
    let rows = s
        .query
        .range(Range {
            pk: keys::member_pk(fleet),
            from,
            // Above every id character (`[A-Za-z0-9_.:-]`).
            to: "~".into(),
            limit: limit + 1,
            descending: false,
        })
        .await?;
    let mut members: Vec<(String, FleetMember)> = rows
        .into_iter()
        .filter_map(|(device, item)| member_of(item.state).map(|m| (device, m)))
        .collect();
    // The cursor follows the rows read, not the rows a status filter keeps.
    let next_cursor = if members.len() > limit {
        members.truncate(limit);
        members.last().map(|(d, _)| format!("{fleet}/{d}"))
    } else {
        None
    };
    let now = (s.clock)();
    let stale_after = s.stale_after.of(fleet);
    let statuses = futures::future::try_join_all(
        members
            .iter()
            .map(|(device, m)| device_status(&s, device, m, now, stale_after)),
    )
    .await?;
    let devices: Vec<Value> = members
        .iter()
        .zip(statuses)
        .filter(|(_, (status, _))| wanted.is_none_or(|w| w == *status))
        .map(|((device_id, _), (status, last_seen))| {
            json!({
                "device_id": device_id,
                "fleet": fleet,
                "last_seen": (last_seen > 0).then_some(last_seen),
                "status": status.as_str(),
            })
        })
        .collect();
    Ok(axum::Json(json!({"devices": devices, "next_cursor": next_cursor})).into_response())
}

/// A member row in its current shape, from either shape stored.
fn member_of(state: ItemState) -> Option<FleetMember> {
    match state {
        ItemState::Member(m) => Some(m.into()),
        ItemState::FleetMember(m) => Some(m),
        _ => None,
    }
}

/// A listed device's status and latest reading: from its member row when
/// that is sure, else with its latest span read too.
async fn device_status(
    s: &ApiState,
    device: &str,
    m: &FleetMember,
    now: i64,
    stale_after: i64,
) -> Result<(Status, i64), Problem> {
    let status = liveness::status(m.last_seen, m.presence.as_ref(), now, stale_after);
    if !liveness::needs_latest_reading(status) {
        return Ok((status, m.last_seen));
    }
    let last_seen = latest_reading(s, device).await?.max(m.last_seen);
    Ok((
        liveness::status(last_seen, m.presence.as_ref(), now, stale_after),
        last_seen,
    ))
}

/// The arrival of the device's latest reading, from its latest span.
async fn latest_reading(s: &ApiState, device: &str) -> Result<i64, Problem> {
    let rows = s
        .query
        .range(Range {
            pk: keys::span_pk(device),
            from: String::new(),
            to: "~".into(),
            limit: 1,
            descending: true,
        })
        .await?;
    Ok(rows
        .into_iter()
        .find_map(|(_, item)| match item.state {
            ItemState::Span(span) => Some(span.last_seen),
            _ => None,
        })
        .unwrap_or(0))
}

async fn device(
    State(s): State<ApiState>,
    Path(device_id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, Problem> {
    Params::parse(raw.as_deref(), &[])?;
    check_id("device_id", &device_id)?;
    let mut d = device_state(&s, &device_id).await?;
    // The device item holds what compacted windows held; readings since
    // live in the spans of its pending windows.
    let finest_unit = s.config.pending_units().first().copied();
    for &(res_ms, start) in &d.pending.clone() {
        if Some(res_ms) != finest_unit {
            continue;
        }
        let count = s.config.spans_of(res_ms, start).count();
        for span in windows::spans(
            s.query.as_ref(),
            &device_id,
            start,
            start + res_ms,
            count,
            &s.config,
        )
        .await?
        {
            rollup::span::observe_span(&mut d, &span);
        }
    }
    let metrics: BTreeMap<String, Value> = d
        .latest
        .iter()
        .map(|(name, p)| (name.clone(), json!({"ts": p.ts, "value": p.value})))
        .collect();
    let presence: Option<PresenceMark> = s
        .query
        .get(&keys::member_pk(&d.fleet), &device_id)
        .await?
        .and_then(|item| member_of(item.state))
        .and_then(|m| m.presence);
    let status = liveness::status(
        d.last_seen,
        presence.as_ref(),
        (s.clock)(),
        s.stale_after.of(&d.fleet),
    );
    Ok(axum::Json(json!({
        "device_id": device_id,
        "fleet": d.fleet,
        "last_seen": d.last_seen,
        "status": status.as_str(),
        "metrics": metrics,
    }))
    .into_response())
}

async fn device_state(s: &ApiState, device_id: &str) -> Result<DeviceState, Problem> {
    match s.query.get(&keys::device_pk(device_id), DEVICE_SK).await? {
        Some(Item {
            state: ItemState::Device(d),
            ..
        }) => Ok(d),
        _ => Err(unknown_device(device_id)),
    }
}

fn unknown_device(device_id: &str) -> Problem {
    Problem::not_found(format!(
        "no device `{device_id}` has sent accepted readings"
    ))
}

async fn stats(State(s): State<ApiState>, RawQuery(raw): RawQuery) -> Result<Response, Problem> {
    Params::parse(raw.as_deref(), &[])?;
    let mut accepted = 0u64;
    let mut duplicates = 0u64;
    let mut rejected: BTreeMap<String, u64> = schemas::RejectReason::ALL
        .iter()
        .map(|r| (r.to_string(), 0))
        .collect();
    let mut from = String::new();
    loop {
        let rows = s
            .query
            .range(Range {
                pk: COUNTER_PK.into(),
                from: from.clone(),
                to: "~".into(),
                limit: 1000,
                descending: false,
            })
            .await?;
        let Some((last, _)) = rows.last() else { break };
        from = format!("{last}\u{0}");
        for (sk, item) in rows {
            let ItemState::Counter(n) = item.state else {
                continue;
            };
            let name = sk.split_once('|').map_or(sk.as_str(), |(_, name)| name);
            match name {
                counters::ACCEPTED => accepted += n,
                counters::DUPLICATE => duplicates += n,
                other => {
                    if let Some(reason) = other.strip_prefix("rejected:") {
                        *rejected.entry(reason.to_string()).or_default() += n;
                    }
                }
            }
        }
    }
    Ok(axum::Json(json!({
        "accepted_readings": accepted,
        "duplicate_readings": duplicates,
        "rejected": rejected,
    }))
    .into_response())
}

async fn dead_letters(
    State(s): State<ApiState>,
    RawQuery(raw): RawQuery,
) -> Result<Response, Problem> {
    let p = Params::parse(raw.as_deref(), &["reason", "limit"])?;
    let limit = p.limit(100, 1000)?;
    let reasons: Vec<schemas::RejectReason> = match p.get("reason") {
        Some(r) => vec![r.parse().map_err(Problem::bad_request)?],
        None => schemas::RejectReason::ALL.to_vec(),
    };
    let mut letters = Vec::new();
    for reason in reasons {
        let rows = s
            .query
            .range(Range {
                pk: keys::dead_letter_pk(reason),
                from: String::new(),
                to: "~".into(),
                limit,
                descending: true,
            })
            .await?;
        for (_, item) in rows {
            if let ItemState::DeadLetter(l) = item.state {
                letters.push(l);
            }
        }
    }
    letters.sort_by(|a, b| b.received_at.cmp(&a.received_at).then(b.seq.cmp(&a.seq)));
    letters.truncate(limit);
    let letters: Vec<Value> = letters
        .into_iter()
        .map(|l| {
            json!({
                "received_at": l.received_at,
                "reason": l.reason,
                "detail": l.detail,
                "topic": l.topic,
                "client_id": l.client_id,
                "device_id": l.device_id,
                "fleet": l.fleet,
                "payload": String::from_utf8_lossy(&l.payload_head),
                "payload_bytes": l.payload_len,
                "shard": l.shard,
                "seq": l.seq.to_string(),
            })
        })
        .collect();
    Ok(axum::Json(json!({ "dead_letters": letters })).into_response())
}
