//! What stands in front of every handler: bearer-token authentication and
//! request limits, each refusal counted and answered as a problem.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;

use super::ApiState;
use super::problem::Problem;
use crate::metrics::{Histogram, LATENCY_BUCKETS};

/// What a token may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Rollups, devices, stats and metrics.
    Read,
    /// Also dead letters, which hold raw device payloads.
    Admin,
}

/// The accepted bearer tokens, from a file of `TOKEN [read|admin]` lines.
#[derive(Clone, Default)]
pub struct Tokens {
    entries: Vec<(Vec<u8>, Scope)>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a secret.
        write!(f, "Tokens({} configured)", self.entries.len())
    }
}

impl Tokens {
    /// Parses a token file: one token per line with an optional scope
    /// (`read`, the default, or `admin`); `#` starts a comment.
    pub fn parse(text: &str) -> Result<Tokens, String> {
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let token = parts.next().unwrap_or_default();
            let scope = match parts.next() {
                None | Some("read") => Scope::Read,
                Some("admin") => Scope::Admin,
                Some(other) => {
                    return Err(format!(
                        "line {}: scope `{other}` is not read or admin",
                        n + 1
                    ));
                }
            };
            if parts.next().is_some() {
                return Err(format!("line {}: expected `TOKEN [read|admin]`", n + 1));
            }
            if token.len() < 16 {
                return Err(format!(
                    "line {}: a token must be at least 16 characters",
                    n + 1
                ));
            }
            entries.push((token.as_bytes().to_vec(), scope));
        }
        if entries.is_empty() {
            return Err("the token file holds no token".into());
        }
        Ok(Tokens { entries })
    }

    /// The scope of `presented`, comparing in constant time so that response
    /// timing does not leak how much of a token was right.
    fn scope_of(&self, presented: &[u8]) -> Option<Scope> {
        let mut found = None;
        for (token, scope) in &self.entries {
            if bool::from(token.as_slice().ct_eq(presented)) {
                found = found.max(Some(*scope));
            }
        }
        found
    }
}

/// Request limits, so that one greedy client cannot starve the rest.
#[derive(Debug, Clone)]
pub struct ApiLimits {
    /// Requests served at once; more get 503 at once rather than queueing.
    pub max_concurrent: usize,
    /// The longest a request may take before it is answered 503.
    pub timeout: Duration,
}

impl Default for ApiLimits {
    fn default() -> Self {
        ApiLimits {
            max_concurrent: 256,
            timeout: Duration::from_secs(10),
        }
    }
}

/// The API's own figures for `/metrics`.
#[derive(Debug)]
pub struct ApiMetrics {
    pub requests: [AtomicU64; 5],
    pub unauthorized: AtomicU64,
    pub forbidden: AtomicU64,
    pub shed: AtomicU64,
    pub timeouts: AtomicU64,
    pub seconds: Histogram,
}

impl Default for ApiMetrics {
    fn default() -> Self {
        ApiMetrics {
            requests: Default::default(),
            unauthorized: AtomicU64::new(0),
            forbidden: AtomicU64::new(0),
            shed: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            seconds: Histogram::new(LATENCY_BUCKETS),
        }
    }
}

impl ApiMetrics {
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let name = "iotpipe_api_requests_total";
        let _ = writeln!(
            out,
            "# HELP {name} API requests by status class.\n# TYPE {name} counter"
        );
        for (i, n) in self.requests.iter().enumerate() {
            let _ = writeln!(out, "{name}{{code=\"{}xx\"}} {}", i + 1, n.load(Relaxed));
        }
        for (name, help, v) in [
            (
                "iotpipe_api_unauthorized_total",
                "Requests refused for a missing or wrong token.",
                &self.unauthorized,
            ),
            (
                "iotpipe_api_forbidden_total",
                "Requests refused because the token's scope is too narrow.",
                &self.forbidden,
            ),
            (
                "iotpipe_api_shed_total",
                "Requests refused because max_concurrent were in flight.",
                &self.shed,
            ),
            (
                "iotpipe_api_timeouts_total",
                "Requests that exceeded the API timeout.",
                &self.timeouts,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Relaxed)
            );
        }
        self.seconds.render(
            "iotpipe_api_request_seconds",
            "Time to answer an API request.",
            "",
            out,
        );
    }
}

/// Shared by every request.
#[derive(Debug)]
pub struct Guard {
    pub tokens: Option<Tokens>,
    pub limits: ApiLimits,
    pub metrics: ApiMetrics,
    permits: Semaphore,
}

impl Guard {
    pub fn new(tokens: Option<Tokens>, limits: ApiLimits) -> Self {
        Guard {
            permits: Semaphore::new(limits.max_concurrent.max(1)),
            tokens,
            limits,
            metrics: ApiMetrics::default(),
        }
    }
}

/// The scope a path needs, or `None` for what is public: liveness, the API
/// description and the dashboard's static files.
fn needed_scope(path: &str) -> Option<Scope> {
    if path.starts_with("/v1/dead-letters") {
        Some(Scope::Admin)
    } else if path.starts_with("/v1/") || path == "/metrics" {
        Some(Scope::Read)
    } else {
        None
    }
}

fn unauthorized(detail: &str) -> Response {
    let mut resp = Problem::new(StatusCode::UNAUTHORIZED, detail).into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"iotpipe\""),
    );
    resp
}

/// The middleware: limits first, then authentication, then the handler.
pub async fn guard(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let g: Arc<Guard> = state.guard.clone();
    let started = Instant::now();
    let response = match g.permits.try_acquire() {
        Err(_) => {
            g.metrics.shed.fetch_add(1, Relaxed);
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many requests in flight; retry shortly",
            )
            .into_response()
        }
        Ok(_permit) => match authorize(&g, &request) {
            Err(resp) => *resp,
            Ok(()) => match tokio::time::timeout(g.limits.timeout, next.run(request)).await {
                Ok(resp) => resp,
                Err(_) => {
                    g.metrics.timeouts.fetch_add(1, Relaxed);
                    Problem::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("the request took longer than {:?}", g.limits.timeout),
                    )
                    .into_response()
                }
            },
        },
    };
    let class = (response.status().as_u16() / 100).clamp(1, 5) as usize - 1;
    g.metrics.requests[class].fetch_add(1, Relaxed);
    g.metrics.seconds.observe(started.elapsed());
    response
}

fn authorize(g: &Guard, request: &Request) -> Result<(), Box<Response>> {
    let (Some(tokens), Some(needed)) = (&g.tokens, needed_scope(request.uri().path())) else {
        return Ok(());
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(presented) = presented else {
        g.metrics.unauthorized.fetch_add(1, Relaxed);
        return Err(Box::new(unauthorized(
            "this API needs `Authorization: Bearer <token>`",
        )));
    };
    match tokens.scope_of(presented.trim().as_bytes()) {
        None => {
            g.metrics.unauthorized.fetch_add(1, Relaxed);
            Err(Box::new(unauthorized("the bearer token is not valid")))
        }
        Some(scope) if scope < needed => {
            g.metrics.forbidden.fetch_add(1, Relaxed);
            Err(Box::new(
                Problem::new(
                    StatusCode::FORBIDDEN,
                    "this token may read rollups but not dead letters; use an admin token",
                )
                .into_response(),
            ))
        }
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_files_parse_strictly() {
        let t = Tokens::parse("# readers\nabcdefghijklmnop\nqrstuvwxyz0123456789 admin\n").unwrap();
        assert_eq!(t.scope_of(b"abcdefghijklmnop"), Some(Scope::Read));
        assert_eq!(t.scope_of(b"qrstuvwxyz0123456789"), Some(Scope::Admin));
        assert_eq!(t.scope_of(b"abcdefghijklmno"), None);
        assert_eq!(t.scope_of(b""), None);
        assert!(Tokens::parse("").is_err());
        assert!(Tokens::parse("short").is_err());
        assert!(Tokens::parse("abcdefghijklmnop root").is_err());
        assert!(format!("{t:?}").contains("2 configured"));
    }
}
