//! The window series endpoints, a device's or a fleet's windows of one
//! metric: parameters, `agg=` field selection, and the JSON or CSV answer.

use axum::extract::{Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use schemas::WindowView;
use serde_json::Value;

use super::fill::{self, Fill, FillSpec, Slots};
use super::params::Params;
use super::windows::{self, Series, WindowQuery};
use super::{
    ApiState, DEFAULT_LIMIT, MAX_LIMIT, Problem, check_id, check_metric, device_state, parse_time,
};

pub(super) async fn device_windows(
    State(s): State<ApiState>,
    Path((device_id, metric)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Response, Problem> {
    check_id("device_id", &device_id)?;
    check_metric(&metric)?;
    let p = window_params(raw.as_deref())?;
    let state = device_state(&s, &device_id).await?;
    windows_response(&s, &p, Series::Device(device_id, state), metric).await
}

pub(super) async fn fleet_windows(
    State(s): State<ApiState>,
    Path((fleet, metric)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Response, Problem> {
    check_id("fleet", &fleet)?;
    check_metric(&metric)?;
    let p = window_params(raw.as_deref())?;
    windows_response(&s, &p, Series::Fleet(fleet), metric).await
}

fn window_params(raw: Option<&str>) -> Result<Params, Problem> {
    Params::parse(
        raw,
        &[
            "res", "from", "to", "limit", "cursor", "agg", "format", "fill", "max_gap",
        ],
    )
}

/// The fields `agg=` may select; `start` and `end` always come along.
const AGG_FIELDS: [&str; 14] = [
    "count",
    "sum",
    "min",
    "max",
    "avg",
    "stddev",
    "first",
    "last",
    "p50",
    "p90",
    "p99",
    "late_count",
    "revision",
    "final",
];

fn agg_fields(p: &Params) -> Result<Vec<&'static str>, Problem> {
    let Some(list) = p.get("agg") else {
        return Ok(AGG_FIELDS.to_vec());
    };
    list.split(',')
        .map(|name| {
            AGG_FIELDS
                .iter()
                .find(|f| **f == name.trim())
                .copied()
                .ok_or_else(|| {
                    Problem::bad_request(format!(
                        "`agg` field `{name}` is not one of {}",
                        AGG_FIELDS.join(", ")
                    ))
                })
        })
        .collect()
}

/// One field of a window, by its `agg=` name: the one place that maps names
/// to fields, for the JSON and the CSV answers alike.
enum Field<'a> {
    Count(u64),
    Number(f64),
    Flag(bool),
    Point(&'a schemas::Point),
}

fn field<'a>(w: &'a WindowView, name: &str) -> Option<Field<'a>> {
    Some(match name {
        "count" => Field::Count(w.count),
        "sum" => Field::Number(w.sum),
        "min" => Field::Number(w.min),
        "max" => Field::Number(w.max),
        "avg" => Field::Number(w.avg),
        "stddev" => Field::Number(w.stddev),
        "first" => Field::Point(&w.first),
        "last" => Field::Point(&w.last),
        "p50" => Field::Number(w.p50),
        "p90" => Field::Number(w.p90),
        "p99" => Field::Number(w.p99),
        "late_count" => Field::Count(w.late_count),
        "revision" => Field::Count(w.revision),
        "final" => Field::Flag(w.is_final),
        _ => return None,
    })
}

impl serde::Serialize for Field<'_> {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        match self {
            Field::Count(n) => n.serialize(ser),
            Field::Number(x) => x.serialize(ser),
            Field::Flag(b) => b.serialize(ser),
            Field::Point(p) => p.serialize(ser),
        }
    }
}

/// One window with only the fields `agg=` picked, serialized straight from
/// the view: a day of 1-minute windows is 1,440 of these per answer, and a
/// detour through `serde_json::Value` cost most of a query's time.
struct Picked<'a> {
    w: &'a WindowView,
    fields: &'a [&'static str],
    /// How the window was filled, if it holds no readings (`fill=`).
    filled: Option<Fill>,
}

impl serde::Serialize for Picked<'_> {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let w = self.w;
        let mut m = ser.serialize_map(Some(3 + self.fields.len()))?;
        m.serialize_entry("start", &w.start)?;
        m.serialize_entry("end", &w.end)?;
        for f in self.fields {
            match field(w, f) {
                // A filled window holds no reading to be first or last.
                Some(Field::Point(_)) if self.filled.is_some() => m.serialize_entry(f, &())?,
                Some(v) => m.serialize_entry(f, &v)?,
                None => {}
            }
        }
        if let Some(how) = self.filled {
            m.serialize_entry("filled", how.name())?;
        }
        m.end()
    }
}

/// A window answer, serialized in one pass (see [`Picked`]).
#[derive(serde::Serialize)]
struct WindowsBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    device_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fleet: Option<&'a str>,
    metric: &'a str,
    res: String,
    from: i64,
    to: i64,
    windows: Vec<Picked<'a>>,
    next_cursor: Option<String>,
}

/// A number as JSON writes it, so that CSV and JSON cells agree (`null` for
/// what JSON cannot hold).
fn cell(out: &mut String, v: f64) {
    use std::fmt::Write;
    if v.is_finite() {
        let _ = write!(
            out,
            "{}",
            serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
        );
    } else {
        out.push_str("null");
    }
}

/// Windows as CSV: one row per window, `first` and `last` split into time
/// and value columns; with `fill=`, a last column says how a row was filled.
fn windows_csv(rows: &[Picked], fields: &[&str], filling: bool) -> String {
    use std::fmt::Write;
    let mut header = vec!["start".to_string(), "end".to_string()];
    for f in fields {
        match *f {
            "first" | "last" => {
                header.push(format!("{f}_ts"));
                header.push(format!("{f}_value"));
            }
            other => header.push(other.to_string()),
        }
    }
    if filling {
        header.push("filled".into());
    }
    let mut out = header.join(",");
    out.push('\n');
    for row in rows {
        let w = row.w;
        let _ = write!(out, "{},{}", w.start, w.end);
        for f in fields {
            out.push(',');
            match field(w, f) {
                Some(Field::Count(n)) => {
                    let _ = write!(out, "{n}");
                }
                Some(Field::Number(x)) => cell(&mut out, x),
                Some(Field::Flag(b)) => {
                    let _ = write!(out, "{b}");
                }
                Some(Field::Point(_)) if row.filled.is_some() => out.push_str("null,null"),
                Some(Field::Point(p)) => {
                    let _ = write!(out, "{},", p.ts);
                    cell(&mut out, p.value);
                }
                None => {}
            }
        }
        if filling {
            out.push(',');
            out.push_str(row.filled.map_or("", Fill::name));
        }
        out.push('\n');
    }
    out
}

/// `[from, to)` of a series request: a day up to now unless the request
/// says otherwise, resumed from `cursor` when paging.
fn time_range(p: &Params, now: i64) -> Result<(i64, i64), Problem> {
    let to = p.time("to")?.unwrap_or(now);
    let mut from = p
        .time("from")?
        .unwrap_or_else(|| to.saturating_sub(schemas::Resolution::DAY));
    if let Some(cursor) = p.get("cursor") {
        let c = parse_time("cursor", cursor)?;
        if c < from {
            return Err(Problem::bad_request("`cursor` lies before `from`"));
        }
        from = c;
    }
    if from >= to {
        return Err(Problem::bad_request(format!(
            "`from` ({from}) must be before `to` ({to})"
        )));
    }
    Ok((from, to))
}

/// Whether `format=` asks for CSV rather than JSON.
fn is_csv(p: &Params) -> Result<bool, Problem> {
    match p.get("format") {
        None | Some("json") => Ok(false),
        Some("csv") => Ok(true),
        Some(other) => Err(Problem::bad_request(format!(
            "`format` must be json or csv, got `{other}`"
        ))),
    }
}

async fn windows_response(
    s: &ApiState,
    p: &Params,
    series: Series,
    metric: String,
) -> Result<Response, Problem> {
    let res = p.resolution("res")?.unwrap_or(s.config.finest());
    let now = (s.clock)();
    let (from, to) = time_range(p, now)?;
    // Expired windows are not served, whether or not the store has deleted
    // them yet: the answer is the same on every store.
    let stored = windows::stored_for(res, &s.config)?;
    let from = from.max(s.config.retained_from(stored, now)).min(to);
    let mut limit = p.limit(DEFAULT_LIMIT, MAX_LIMIT)?;
    let fields = agg_fields(p)?;
    let csv = is_csv(p)?;
    let spec = FillSpec::parse(p.get("fill"), p.get("max_gap"))?;
    let slots = Slots {
        first_start: windows::ceil_to(from, res),
        end: windows::ceil_to(to, res),
        res_ms: res.ms(),
    };
    if spec.fill != Fill::None {
        // A filled answer holds every window of the range, in one page:
        // filling across pages would need the neighbours of each page.
        let n = slots.count();
        if n > limit {
            return Err(Problem::bad_request(format!(
                "fill={} answers every window of the range in one page: {n} windows of {res} \
                 exceed the limit of {limit}; narrow `from`..`to` or raise `limit` (at most {MAX_LIMIT})",
                spec.fill.name()
            )));
        }
        limit = n.max(1);
    }
    let q = WindowQuery {
        series,
        metric: metric.clone(),
        res,
        from,
        to,
        limit,
    };
    let page = windows::query(s.query.as_ref(), &q, &s.config).await?;
    let filled = (spec.fill != Fill::None).then(|| {
        let is_final = |end| s.config.is_final(end, page.watermark);
        fill::fill(&page.windows, slots, spec, &is_final)
    });
    let windows: Vec<Picked> = match &filled {
        Some(rows) => rows
            .iter()
            .map(|r| Picked {
                w: &r.view,
                fields: &fields,
                filled: r.filled,
            })
            .collect(),
        None => page
            .windows
            .iter()
            .map(|w| Picked {
                w,
                fields: &fields,
                filled: None,
            })
            .collect(),
    };
    let next_cursor = page.next.map(|n| n.to_string());
    if csv {
        let mut resp = (
            [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            windows_csv(&windows, &fields, filled.is_some()),
        )
            .into_response();
        if let Some(c) = next_cursor.and_then(|c| c.parse().ok()) {
            // CSV has no envelope; the cursor travels in a header instead.
            resp.headers_mut().insert("x-next-cursor", c);
        }
        return Ok(resp);
    }
    let (device_id, fleet) = match &q.series {
        Series::Fleet(f) => (None, Some(f.as_str())),
        Series::Device(d, _) => (Some(d.as_str()), None),
    };
    let body = WindowsBody {
        device_id,
        fleet,
        metric: &metric,
        res: res.to_string(),
        from,
        to,
        windows,
        next_cursor,
    };
    // Sized up front: growing a half-megabyte answer from axum's default
    // 128 bytes copied it about a dozen times.
    let mut buf = Vec::with_capacity(256 + body.windows.len() * (64 + 24 * fields.len()));
    serde_json::to_writer(&mut buf, &body).map_err(|e| {
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the answer: {e}"),
        )
    })?;
    Ok(([(header::CONTENT_TYPE, "application/json")], buf).into_response())
}
