//! Freshness: how long after a device publishes a reading the query API
//! shows it.
//!
//! Devices offer every n-th publish ([`Sample`]: device, the reading's ts,
//! when it was written). The probe asks `GET /v1/devices/{id}` until the
//! device's latest ts for some metric reaches the sample's ts, a bounded
//! number of samples at a time; samples offered while all probes are busy
//! are dropped and counted, so probing never slows the fleet down.

use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Samples waiting for a free probe; more are dropped.
pub const QUEUE: usize = 1024;
/// How often a probe asks again.
const POLL: Duration = Duration::from_millis(20);

/// One sampled publish.
#[derive(Debug, Clone)]
pub struct Sample {
    pub device_id: String,
    /// The newest reading's ts in the message.
    pub ts: i64,
    /// When the PUBLISH was written.
    pub written: Instant,
}

/// Freshness figures, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Freshness {
    /// One publish in this many was sampled.
    pub sample_every: u64,
    pub samples: u64,
    /// Samples seen in the API before the timeout.
    pub visible: u64,
    /// Samples not visible within the timeout.
    pub timed_out: u64,
    /// Samples dropped because every probe was busy.
    pub dropped: u64,
    /// Probe requests that failed (connection errors, 5xx).
    pub errors: u64,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    /// How often probes polled: a bound on the figures' resolution.
    pub poll_ms: u64,
}

#[derive(Deserialize)]
struct DeviceView {
    #[serde(default)]
    metrics: std::collections::BTreeMap<String, Point>,
}

#[derive(Deserialize)]
struct Point {
    ts: i64,
}

/// Probes samples from `rx` until it closes and every probe has finished.
pub async fn probe(
    base_url: String,
    mut rx: mpsc::Receiver<Sample>,
    concurrency: usize,
    timeout: Duration,
    sample_every: u64,
) -> Freshness {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(concurrency)
        .build()
        .ok();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).ok();
    let mut f = Freshness {
        sample_every,
        samples: 0,
        visible: 0,
        timed_out: 0,
        dropped: 0,
        errors: 0,
        p50_ms: None,
        p90_ms: None,
        p99_ms: None,
        max_ms: None,
        poll_ms: POLL.as_millis() as u64,
    };
    let Some(http) = http else {
        return f;
    };
    let base = Arc::new(base_url.trim_end_matches('/').to_string());
    let slots = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut probes: JoinSet<(Option<Duration>, u64)> = JoinSet::new();
    let mut record = |f: &mut Freshness, r: (Option<Duration>, u64)| {
        f.errors += r.1;
        match r.0 {
            Some(d) => {
                f.visible += 1;
                if let Some(h) = hist.as_mut() {
                    let _ = h.record((d.as_micros() as u64).clamp(1, 3_600_000_000));
                }
            }
            None => f.timed_out += 1,
        }
    };
    loop {
        tokio::select! {
            sample = rx.recv() => {
                let Some(sample) = sample else { break };
                f.samples += 1;
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    f.dropped += 1;
                    continue;
                };
                let (http, base) = (http.clone(), base.clone());
                probes.spawn(async move {
                    let r = until_visible(&http, &base, &sample, timeout).await;
                    drop(permit);
                    r
                });
            }
            Some(Ok(r)) = probes.join_next(), if !probes.is_empty() => record(&mut f, r),
        }
    }
    while let Some(r) = probes.join_next().await {
        if let Ok(r) = r {
            record(&mut f, r);
        }
    }
    if let Some(h) = hist.filter(|h| !h.is_empty()) {
        let ms = |us: u64| us as f64 / 1000.0;
        f.p50_ms = Some(ms(h.value_at_quantile(0.5)));
        f.p90_ms = Some(ms(h.value_at_quantile(0.9)));
        f.p99_ms = Some(ms(h.value_at_quantile(0.99)));
        f.max_ms = Some(ms(h.max()));
    }
    f
}

/// Polls until the device's latest reading reaches the sample's ts; the
/// time from the write, or `None` on timeout; and the failed requests.
async fn until_visible(
    http: &reqwest::Client,
    base: &str,
    s: &Sample,
    timeout: Duration,
) -> (Option<Duration>, u64) {
    let url = format!("{base}/v1/devices/{}", s.device_id);
    let deadline = s.written + timeout;
    let mut errors = 0;
    loop {
        match http.get(&url).send().await {
            Ok(resp) if resp.status().is_success() => {
                if let Ok(view) = resp.json::<DeviceView>().await
                    && view.metrics.values().any(|p| p.ts >= s.ts)
                {
                    return (Some(s.written.elapsed()), errors);
                }
            }
            // Unknown until its first reading lands.
            Ok(resp) if resp.status() == reqwest::StatusCode::NOT_FOUND => {}
            Ok(_) | Err(_) => errors += 1,
        }
        if Instant::now() + POLL >= deadline {
            return (None, errors);
        }
        tokio::time::sleep(POLL).await;
    }
}
