//! A webhook receiver on port 0 for alert notifications: it checks each
//! signature with its own code, written from the documented contract
//! rather than with the pipeline's, and keeps what it saw.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use hmac::{KeyInit, Mac};
use iotpipe::{Config, Pipeline};
use serde_json::Value;

pub const SECRET: &str = "a shared secret";
/// What the receiver saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub id: String,
    pub signed: bool,
    pub status: u16,
    pub body: Value,
}

#[derive(Clone)]
pub struct Receiver {
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Requests still to answer with a 500.
    fail_next: Arc<AtomicUsize>,
}

impl Receiver {
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// The receiver's own check, written from the documented contract rather
/// than with the pipeline's code: `sha256=<hex HMAC-SHA256 of the body>`.
pub fn signature_is_valid(secret: &[u8], body: &[u8], header: Option<&str>) -> bool {
    let Some(hex) = header.and_then(|h| h.strip_prefix("sha256=")) else {
        return false;
    };
    let Some(tag) = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()
    else {
        return false;
    };
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(secret).unwrap();
    mac.update(body);
    mac.verify_slice(&tag).is_ok()
}

async fn receive(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let signed = signature_is_valid(SECRET.as_bytes(), &body, header("x-iotpipe-signature"));
    let fail = r
        .fail_next
        .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let status = if fail {
        StatusCode::INTERNAL_SERVER_ERROR
    } else if !signed {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::OK
    };
    r.seen.lock().unwrap().push(Seen {
        id: header("x-iotpipe-alert-id").unwrap_or("").to_string(),
        signed,
        status: status.as_u16(),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    });
    status
}

/// The receiver's state and its one route, `POST /alerts`.
fn app(fail_first: usize) -> (axum::Router, Receiver) {
    let r = Receiver {
        seen: Arc::default(),
        fail_next: Arc::new(AtomicUsize::new(fail_first)),
    };
    let app = axum::Router::new()
        .route("/alerts", axum::routing::post(receive))
        .with_state(r.clone());
    (app, r)
}

/// A webhook receiver on port 0 that first answers `fail_first` requests
/// with a 500; returns its URL.
pub async fn receiver(fail_first: usize) -> (String, Receiver) {
    let (app, r) = app(fail_first);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/alerts", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, r)
}

/// The same receiver over HTTPS, with a certificate `pki`'s CA signed.
pub async fn https_receiver(pki: &testkit::Pki) -> (String, Receiver) {
    let (app, r) = app(0);
    let listener = pki.https_listener().await.unwrap();
    let port = axum::serve::Listener::local_addr(&listener).unwrap().port();
    let url = format!("https://127.0.0.1:{port}/alerts");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, r)
}

/// How the test's webhook receiver listens.
pub enum Hook<'a> {
    /// Plain HTTP, answering the first `fail_first` requests with a 500.
    Http { fail_first: usize },
    /// HTTPS, with a certificate the CA of this `Pki` signed.
    Https(&'a testkit::Pki),
}

/// A webhook receiver as `hook` says, and `iotpipe up` in a fresh temp dir
/// with the config `config` makes for that dir and the receiver's URL.
/// Returns the dir (the pipeline's data lives as long as it), the running
/// pipeline and the receiver.
pub async fn start_with_hook(
    hook: Hook<'_>,
    config: impl FnOnce(&Path, &str) -> Config,
) -> (tempfile::TempDir, Pipeline, Receiver) {
    let dir = tempfile::tempdir().unwrap();
    let (url, receiver) = match hook {
        Hook::Http { fail_first } => receiver(fail_first).await,
        Hook::Https(pki) => https_receiver(pki).await,
    };
    let pipeline = iotpipe::start(&config(dir.path(), &url)).await.unwrap();
    (dir, pipeline, receiver)
}
