//! The query API, as verify reads it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::compare::ApiWindow;
use crate::plan::{DAY_MS, HOUR_MS, MINUTE_MS};

/// The most windows one page may hold (the API's maximum `limit`).
const PAGE_LIMIT: u32 = 10_000;

/// Whose series to read.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    Device(&'a str),
    Fleet(&'a str),
}

/// `/v1/stats`: the pipeline's exact counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub accepted_readings: u64,
    pub duplicate_readings: u64,
    #[serde(default)]
    pub rejected: BTreeMap<String, u64>,
}

impl Stats {
    pub fn rejected(&self, reason: &str) -> u64 {
        self.rejected.get(reason).copied().unwrap_or(0)
    }
}

#[derive(Deserialize)]
struct Page {
    windows: Vec<ApiWindow>,
    next_cursor: Option<String>,
}

/// A client for the query API with a cap on requests in flight.
#[derive(Debug, Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
    /// Keeps verify from flooding the API however many devices it checks.
    in_flight: Arc<Semaphore>,
    /// A bearer token for an API that requires one.
    token: Option<String>,
}

pub fn res_name(res_ms: i64) -> String {
    match res_ms {
        MINUTE_MS => "1m".into(),
        HOUR_MS => "1h".into(),
        DAY_MS => "1d".into(),
        ms => format!("{}s", ms / 1000),
    }
}

impl Api {
    pub fn new(base: &str, concurrency: usize) -> anyhow::Result<Api> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(concurrency)
            .build()?;
        Ok(Api {
            http,
            base: base.trim_end_matches('/').to_string(),
            in_flight: Arc::new(Semaphore::new(concurrency.max(1))),
            token: None,
        })
    }

    /// The same client, sending `token` as its bearer token.
    pub fn with_token(mut self, token: Option<String>) -> Api {
        self.token = token;
        self
    }

    fn get(&self, url: &str) -> reqwest::RequestBuilder {
        let req = self.http.get(url);
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// Every window of a series with start in `[from, to)`, following
    /// `next_cursor` to the end. An unknown device has no windows.
    pub async fn windows(
        &self,
        scope: Scope<'_>,
        metric: &str,
        res_ms: i64,
        from: i64,
        to: i64,
    ) -> anyhow::Result<Vec<ApiWindow>> {
        let url = match scope {
            Scope::Device(id) => format!("{}/v1/devices/{id}/metrics/{metric}", self.base),
            Scope::Fleet(f) => format!("{}/v1/fleets/{f}/metrics/{metric}", self.base),
        };
        let res = res_name(res_ms);
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut query: Vec<(&str, String)> = vec![
                ("res", res.clone()),
                ("from", from.to_string()),
                ("to", to.to_string()),
                ("limit", PAGE_LIMIT.to_string()),
            ];
            if let Some(c) = &cursor {
                query.push(("cursor", c.clone()));
            }
            let (status, body) = self.fetch(&url, &query).await?;
            if status == reqwest::StatusCode::NOT_FOUND && matches!(scope, Scope::Device(_)) {
                return Ok(out);
            }
            if !status.is_success() {
                bail!("GET {url}?res={res}: {status}: {}", problem_detail(&body));
            }
            let page: Page = serde_json::from_slice(&body)
                .with_context(|| format!("GET {url}?res={res}: unexpected body"))?;
            out.extend(page.windows);
            match advance(&url, &cursor, page.next_cursor)? {
                Some(c) => cursor = Some(c),
                None => return Ok(out),
            }
        }
    }

    /// One GET of `url` with `query`, within the cap on requests in
    /// flight: its status and body.
    async fn fetch(
        &self,
        url: &str,
        query: &[(&str, String)],
    ) -> anyhow::Result<(reqwest::StatusCode, bytes::Bytes)> {
        let _permit = self.in_flight.acquire().await?;
        let resp = self
            .get(url)
            .query(query)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        let status = resp.status();
        let body = resp.bytes().await.with_context(|| format!("GET {url}"))?;
        Ok((status, body))
    }

    pub async fn stats(&self) -> anyhow::Result<Stats> {
        let url = format!("{}/v1/stats", self.base);
        let (status, body) = self.fetch(&url, &[]).await?;
        if !status.is_success() {
            bail!("GET {url}: {status}: {}", problem_detail(&body));
        }
        serde_json::from_slice(&body).with_context(|| format!("GET {url}: unexpected body"))
    }
}

/// `/v1/devices`: one page of a fleet's devices.
#[derive(Deserialize)]
struct DevicePage {
    devices: Vec<ListedDevice>,
    next_cursor: Option<String>,
}

#[derive(Deserialize)]
struct ListedDevice {
    device_id: String,
    status: String,
}

impl Api {
    /// Every device of `fleet` with its status (only those of `status`,
    /// if given), following `next_cursor` to the end.
    pub async fn devices(
        &self,
        fleet: &str,
        status: Option<&str>,
    ) -> anyhow::Result<Vec<(String, String)>> {
        let url = format!("{}/v1/devices", self.base);
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut query = vec![("fleet", fleet.to_string())];
            query.extend(status.map(|s| ("status", s.to_string())));
            query.extend(cursor.clone().map(|c| ("cursor", c)));
            let (code, body) = self.fetch(&url, &query).await?;
            if !code.is_success() {
                bail!("GET {url}?fleet={fleet}: {code}: {}", problem_detail(&body));
            }
            let page: DevicePage = serde_json::from_slice(&body)
                .with_context(|| format!("GET {url}?fleet={fleet}: unexpected body"))?;
            out.extend(page.devices.into_iter().map(|d| (d.device_id, d.status)));
            match advance(&url, &cursor, page.next_cursor)? {
                Some(c) => cursor = Some(c),
                None => return Ok(out),
            }
        }
    }
}

/// The cursor of the next page, if any; the same cursor twice would loop
/// forever.
fn advance(
    url: &str,
    cursor: &Option<String>,
    next: Option<String>,
) -> anyhow::Result<Option<String>> {
    match next {
        Some(c) if Some(&c) == cursor.as_ref() => {
            bail!("GET {url}: the API returned the same cursor `{c}` twice")
        }
        next => Ok(next),
    }
}

/// The `detail` of an `application/problem+json` body, or the body itself.
fn problem_detail(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Problem {
        detail: String,
    }
    match serde_json::from_slice::<Problem>(body) {
        Ok(p) => p.detail,
        Err(_) => String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned(),
    }
}
