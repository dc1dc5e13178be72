//! Reading windows for the API: fleet parts merged, stored windows merged into
//! any multiple of a stored resolution, paginated.

use schemas::state::ItemState;
use schemas::{Resolution, WindowAgg, WindowView};

use super::problem::Problem;
use crate::store::{Range, RollupQuery};
use rollup::AggregateConfig;
use rollup::keys::{start_of_sk, time_sk};

/// Stored rows are read in pages of this many while merging.
const PAGE: usize = 2000;

/// A window query after validation.
#[derive(Debug, Clone)]
pub struct WindowQuery {
    /// The partition of the stored resolution being read.
    pub pk_for: fn(&str, &str, Resolution) -> String,
    pub series: String,
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
}

/// The coarsest stored resolution that `res` is a multiple of.
pub fn stored_for(res: Resolution, cfg: &AggregateConfig) -> Result<Resolution, Problem> {
    cfg.resolutions
        .iter()
        .rev()
        .find(|stored| res.is_multiple_of(**stored))
        .copied()
        .ok_or_else(|| {
            let stored: Vec<String> = cfg.resolutions.iter().map(|r| r.to_string()).collect();
            Problem::bad_request(format!(
                "`res` {res} is not a multiple of a stored resolution ({})",
                stored.join(", ")
            ))
        })
}

fn ceil_to(x: i64, res: Resolution) -> i64 {
    let start = res.window_start(x);
    if start == x { x } else { start + res.ms() }
}

/// Reads windows of `q.res` whose start lies in `[from, to)`, at most `limit`.
pub async fn query(
    store: &dyn RollupQuery,
    q: &WindowQuery,
    cfg: &AggregateConfig,
    now: i64,
) -> Result<WindowPage, Problem> {
    let stored = stored_for(q.res, cfg)?;
    let pk = (q.pk_for)(&q.series, &q.metric, stored);
    // Every stored window inside a requested window: from the first requested
    // start to the end of the last requested window.
    let mut cursor = time_sk(ceil_to(q.from, q.res));
    let end = time_sk(ceil_to(q.to, q.res));
    let mut out: Vec<WindowView> = Vec::new();
    let mut current: Option<(i64, WindowAgg)> = None;
    let view = |(start, agg): (i64, WindowAgg)| {
        agg.view(start, q.res, cfg.is_final(start + q.res.ms(), now))
    };
    loop {
        let rows = store
            .range(Range {
                pk: pk.clone(),
                from: cursor.clone(),
                to: end.clone(),
                limit: PAGE,
                descending: false,
            })
            .await?;
        let full = rows.len() == PAGE;
        for (sk, item) in rows {
            let Some(stored_start) = start_of_sk(&sk) else {
                continue;
            };
            let ItemState::Window(agg) = item.state else {
                continue;
            };
            let start = q.res.window_start(stored_start);
            match &mut current {
                Some((s, acc)) if *s == start => acc.merge(&agg),
                _ => {
                    if let Some(done) = current.take() {
                        out.push(view(done));
                        if out.len() > q.limit {
                            let next = out.pop().map(|w| w.start);
                            return Ok(WindowPage { windows: out, next });
                        }
                    }
                    current = Some((start, agg));
                }
            }
            // Continue strictly after this row on the next page.
            cursor = format!("{sk}\u{0}");
        }
        if !full {
            break;
        }
    }
    if let Some(done) = current.take() {
        out.push(view(done));
    }
    if out.len() > q.limit {
        let next = out.pop().map(|w| w.start);
        return Ok(WindowPage { windows: out, next });
    }
    Ok(WindowPage {
        windows: out,
        next: None,
    })
}
