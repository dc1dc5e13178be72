//! Reading windows for the API: fleet parts merged, a device's finest
//! windows read from its spans, its coarser windows from compacted items or,
//! while they can still change, merged from spans by the same function the
//! compaction uses; stored windows merged into any multiple of a stored
//! resolution, paginated. `final` comes from the processed watermark.

use schemas::state::{DeviceState, Item, ItemState, SpanState};
use schemas::{Resolution, WindowAgg, WindowView};

use super::problem::Problem;
use crate::store::{Range, RollupQuery};
use rollup::AggregateConfig;
use rollup::keys::{self, WATERMARK_PK, start_of_sk, time_sk};

/// Stored rows are read in pages of this many while merging.
const PAGE: usize = 2000;
/// Span items per page: each holds up to ten finest windows.
const SPAN_PAGE: usize = 200;

/// Whose windows a query reads.
#[derive(Debug, Clone)]
pub enum Series {
    Fleet(String),
    /// A device, with its device item (its shard and pending windows).
    Device(String, DeviceState),
}

/// A window query after validation.
#[derive(Debug, Clone)]
pub struct WindowQuery {
    pub series: Series,
    pub metric: String,
    pub res: Resolution,
    pub from: i64,
    pub to: i64,
    pub limit: usize,
}

pub struct WindowPage {
    pub windows: Vec<WindowView>,
    /// The start of the next window, if there are more.
    pub next: Option<i64>,
    /// The series' processed watermark: what makes a window final.
    pub watermark: i64,
}

/// The coarsest stored resolution that `res` is a multiple of.
pub fn stored_for(res: Resolution, config: &AggregateConfig) -> Result<Resolution, Problem> {
    config
        .resolutions
        .iter()
        .rev()
        .find(|stored| res.is_multiple_of(**stored))
        .copied()
        .ok_or_else(|| {
            let stored: Vec<String> = config.resolutions.iter().map(|r| r.to_string()).collect();
            Problem::bad_request(format!(
                "`res` {res} is not a multiple of a stored resolution ({})",
                stored.join(", ")
            ))
        })
}

/// The first window start at or after `x`: a range's windows start in
/// `[ceil_to(from), ceil_to(to))`.
pub fn ceil_to(x: i64, res: Resolution) -> i64 {
    let start = res.window_start(x);
    if start == x { x } else { start + res.ms() }
}

/// Reads windows of `q.res` whose start lies in `[from, to)`, at most `limit`.
pub async fn query(
    store: &dyn RollupQuery,
    q: &WindowQuery,
    config: &AggregateConfig,
) -> Result<WindowPage, Problem> {
    let stored = stored_for(q.res, config)?;
    let from = ceil_to(q.from, q.res);
    let end = ceil_to(q.to, q.res);
    let watermark = watermark(store, &q.series).await?;
    let mut out = Merger {
        res: q.res,
        limit: q.limit,
        is_final: Box::new(move |end| config.is_final(end, watermark)),
        current: None,
        windows: Vec::new(),
        next: None,
    };
    match &q.series {
        Series::Fleet(fleet) => {
            let pk = keys::fleet_window_pk(fleet, &q.metric, stored);
            stored_rows(store, &pk, from, end, &mut out).await?;
        }
        Series::Device(device, _) if stored == config.finest() => {
            span_rows(store, device, &q.metric, from, end, config, &mut out).await?;
        }
        Series::Device(device, state) => {
            coarse_rows(
                store, device, state, &q.metric, stored, from, end, config, &mut out,
            )
            .await?;
        }
    }
    Ok(out.finish(watermark))
}

/// What makes a series' windows final: the minimum over every shard's
/// watermark for a fleet (its devices write through all of them), the
/// device's shard's for a device. Nothing is final before a watermark.
pub(crate) async fn watermark(store: &dyn RollupQuery, series: &Series) -> Result<i64, Problem> {
    let read = |item: &schemas::state::Item| match item.state {
        ItemState::Watermark(w) => Some(w),
        _ => None,
    };
    match series {
        Series::Device(_, state) => Ok(store
            .get(WATERMARK_PK, &state.shard)
            .await?
            .as_ref()
            .and_then(read)
            .unwrap_or(i64::MIN)),
        Series::Fleet(_) => Ok(crate::store::watermarks(store)
            .await?
            .into_values()
            .min()
            .unwrap_or(i64::MIN)),
    }
}

/// Stored windows of `[from, end)` merged into windows of `res`, in order.
struct Merger<'a> {
    res: Resolution,
    limit: usize,
    is_final: Box<dyn Fn(i64) -> bool + Send + 'a>,
    current: Option<(i64, WindowAgg)>,
    windows: Vec<WindowView>,
    next: Option<i64>,
}

impl Merger<'_> {
    /// Adds a stored window; returns false once the page is full.
    fn push(&mut self, stored_start: i64, agg: &WindowAgg) -> bool {
        let start = self.res.window_start(stored_start);
        match &mut self.current {
            Some((s, acc)) if *s == start => acc.merge(agg),
            _ => {
                if let Some(done) = self.current.take() {
                    self.close(done);
                    if self.windows.len() > self.limit {
                        self.next = self.windows.pop().map(|w| w.start);
                        return false;
                    }
                }
                self.current = Some((start, agg.clone()));
            }
        }
        true
    }

    fn close(&mut self, (start, agg): (i64, WindowAgg)) {
        let is_final = (self.is_final)(start + self.res.ms());
        self.windows.push(agg.view(start, self.res, is_final));
    }

    fn finish(mut self, watermark: i64) -> WindowPage {
        if self.next.is_none()
            && let Some(done) = self.current.take()
        {
            self.close(done);
            if self.windows.len() > self.limit {
                self.next = self.windows.pop().map(|w| w.start);
            }
        }
        WindowPage {
            windows: self.windows,
            next: self.next,
            watermark,
        }
    }
}

/// Rows of one partition of stored windows (fleet parts, or a device's
/// compacted windows).
async fn stored_rows(
    store: &dyn RollupQuery,
    pk: &str,
    from: i64,
    end: i64,
    out: &mut Merger<'_>,
) -> Result<(), Problem> {
    read_pages(store, pk, from, end, |rows| {
        for (sk, item) in rows {
            let (Some(start), ItemState::Window(agg)) = (start_of_sk(&sk), &item.state) else {
                continue;
            };
            if !out.push(start, agg) {
                return false;
            }
        }
        true
    })
    .await
}

/// Reads partition `pk` over `[from, end)` a page at a time, handing each
/// page to `visit` until the rows run out or `visit` returns false.
async fn read_pages(
    store: &dyn RollupQuery,
    pk: &str,
    from: i64,
    end: i64,
    mut visit: impl FnMut(Vec<(String, Item)>) -> bool,
) -> Result<(), Problem> {
    let mut cursor = time_sk(from);
    let end = time_sk(end);
    loop {
        let page = store
            .range(Range {
                pk: pk.to_string(),
                from: cursor.clone(),
                to: end.clone(),
                limit: PAGE,
                descending: false,
            })
            .await?;
        let full = page.len() == PAGE;
        if let Some((sk, _)) = page.last() {
            // Continue strictly after this row on the next page.
            cursor = format!("{sk}\u{0}");
        }
        if !visit(page) || !full {
            return Ok(());
        }
    }
}

/// A device's spans covering `[from, end)`, in order, at most `limit`.
pub(super) async fn spans(
    store: &dyn RollupQuery,
    device: &str,
    from: i64,
    end: i64,
    limit: usize,
    config: &AggregateConfig,
) -> Result<Vec<SpanState>, Problem> {
    let rows = store
        .range(Range {
            pk: keys::span_pk(device),
            from: time_sk(config.span_start(from)),
            to: time_sk(end),
            limit,
            descending: false,
        })
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(_, item)| match item.state {
            ItemState::Span(s) => Some(s),
            _ => None,
        })
        .collect())
}

/// A device's finest windows, read from its spans.
async fn span_rows(
    store: &dyn RollupQuery,
    device: &str,
    metric: &str,
    from: i64,
    end: i64,
    config: &AggregateConfig,
    out: &mut Merger<'_>,
) -> Result<(), Problem> {
    let mut cursor = from;
    loop {
        let page = spans(store, device, cursor, end, SPAN_PAGE, config).await?;
        let full = page.len() == SPAN_PAGE;
        for span in &page {
            for (start, agg) in rollup::span::finest_windows(span, metric) {
                if start < from || start >= end {
                    continue;
                }
                if !out.push(start, agg) {
                    return Ok(());
                }
            }
            if let Some(last) = span.windows.last() {
                cursor = config.span_start(last.start) + config.span_ms();
            }
        }
        if !full || page.is_empty() {
            return Ok(());
        }
    }
}

/// A device's coarser windows: compacted items, and the pending windows
/// merged from spans in their place.
#[allow(clippy::too_many_arguments)]
async fn coarse_rows(
    store: &dyn RollupQuery,
    device: &str,
    state: &DeviceState,
    metric: &str,
    stored: Resolution,
    from: i64,
    end: i64,
    config: &AggregateConfig,
    out: &mut Merger<'_>,
) -> Result<(), Problem> {
    let mut rows: Vec<(i64, WindowAgg)> = Vec::new();
    let mut pending = Vec::new();
    for &(res_ms, start) in &state.pending {
        if res_ms != stored.ms() || start < from || start >= end {
            continue;
        }
        let covering = spans(store, device, start, start + res_ms, SPAN_PAGE, config).await?;
        let windows = rollup::span::coarse_window(res_ms, start, &covering);
        if let Some((_, agg)) = windows.metrics.into_iter().find(|(m, _)| m == metric) {
            pending.push((start, agg));
        }
    }
    let pk = keys::device_window_pk(device, stored);
    // Enough for a page of answers: stop reading.
    let enough = (out.limit + 1) * (out.res.ms() / stored.ms()).max(1) as usize;
    read_pages(store, &pk, from, end, |page| {
        for (sk, item) in page {
            let (Some(start), ItemState::Windows(w)) = (start_of_sk(&sk), item.state) else {
                continue;
            };
            if let Some((_, agg)) = w.metrics.into_iter().find(|(m, _)| m == metric) {
                rows.push((start, agg));
            }
        }
        rows.len() <= enough
    })
    .await?;
    // A window compacted while it was read is the same either way.
    pending.retain(|(start, _)| rows.binary_search_by_key(start, |(s, _)| *s).is_err());
    rows.extend(pending);
    rows.sort_by_key(|(start, _)| *start);
    for (start, agg) in &rows {
        if !out.push(*start, agg) {
            return Ok(());
        }
    }
    Ok(())
}
