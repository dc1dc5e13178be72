//! A stand-in pipeline for the simulator's own tests and its `capacity`
//! example: an MQTT listener that aggregates what it receives the way
//! iotpipe's contract says, and a query API over the result, with knobs to
//! inject faults. It is written independently of the simulator's expectation
//! code (this crate does not depend on `device-sim`), so that the two check
//! each other; the real pipeline's end-to-end test lives in the workspace's
//! `tests/`.

// Scaffolding, not product code: a broken invariant here should panic loudly.
#![allow(clippy::unwrap_used, clippy::type_complexity)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{ConnAck, ConnectReturnCode, Packet, PubAck};
use rumqttc::v5::mqttbytes as mqttbytes5;
use rumqttc::{QoS, mqttbytes};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::{Pki, now_ms};

const RESOLUTIONS: [(i64, &str); 3] = [(60_000, "1m"), (3_600_000, "1h"), (86_400_000, "1d")];
pub const ALLOWED_LATENESS_MS: i64 = 3_600_000;
/// Windows per API page: small, so that every test follows cursors.
const PAGE: usize = 7;

#[derive(Debug, Clone, Default)]
struct Window {
    values: Vec<(i64, f64)>,
    late_count: u64,
    revision: u64,
}

#[derive(Debug, Default)]
pub struct Stats {
    pub accepted_readings: u64,
    pub duplicate_readings: u64,
    pub rejected: BTreeMap<String, u64>,
}

/// Faults the stand-in injects.
#[derive(Debug, Default)]
pub struct Faults {
    /// Device id -> publishes to accept before dropping the connection
    /// without acknowledging the next one (which is still stored).
    pub drop_after: HashMap<String, u32>,
    /// Device whose first 1m window of its first metric reports one reading
    /// too many, and which gets an extra window.
    pub corrupt_device: Option<String>,
}

#[derive(Debug, Default)]
pub struct Pipeline {
    /// ("device"|"fleet", id, metric, res ms) -> start -> window.
    series: Mutex<HashMap<(String, String, String, i64), BTreeMap<i64, Window>>>,
    seen: Mutex<HashSet<(String, u64)>>,
    pub stats: Mutex<Stats>,
    pub faults: Mutex<Faults>,
    /// Every accepted (device, seq), to check seq continuation.
    pub accepted: Mutex<Vec<(String, u64)>>,
    /// Acknowledge and drop everything: measures the simulator alone.
    pub discard: std::sync::atomic::AtomicBool,
    /// (device, metric) -> (ts, value) of the newest reading.
    latest: Mutex<HashMap<(String, String), (i64, f64)>>,
    /// Connections by MQTT protocol level (4 or 5).
    pub protocols: Mutex<BTreeMap<u8, u64>>,
    /// TLS connections that presented a client certificate.
    pub client_certs: std::sync::atomic::AtomicU64,
    /// Source addresses connections came from.
    pub peers: Mutex<std::collections::BTreeSet<std::net::IpAddr>>,
    /// A slow broker: each connection acknowledges one PUBLISH per this
    /// long at most, in order.
    pub puback_every: Mutex<Option<std::time::Duration>>,
    /// The first PUBLISH received and the last PUBACK sent, on any
    /// connection: the broker's own view of a run's rate.
    pub first_publish: Mutex<Option<tokio::time::Instant>>,
    pub last_puback: Mutex<Option<tokio::time::Instant>>,
    /// The last PUBLISH received, on any connection.
    pub last_publish: Mutex<Option<tokio::time::Instant>>,
    /// When each DISCONNECT came, on any connection, in order; a watch, so
    /// that a test can wait for them.
    pub disconnects: tokio::sync::watch::Sender<Vec<tokio::time::Instant>>,
    /// Devices `GET /v1/devices/{id}` never shows (404), though their
    /// readings are stored and their windows served.
    pub hidden_devices: Mutex<HashSet<String>>,
}

impl Pipeline {
    /// The first DISCONNECT's time, once `n` have come.
    pub async fn first_of_disconnects(&self, n: usize) -> tokio::time::Instant {
        let mut byes = self.disconnects.subscribe();
        let byes = byes.wait_for(|b| b.len() >= n.max(1)).await.unwrap();
        byes[0]
    }

    /// The accepted seqs of `device`, sorted: what continuing a ledger must
    /// leave without gaps or repeats.
    pub fn accepted_seqs(&self, device: &str) -> Vec<u64> {
        let mut seqs: Vec<u64> = self
            .accepted
            .lock()
            .unwrap()
            .iter()
            .filter(|(d, _)| d == device)
            .map(|(_, s)| *s)
            .collect();
        seqs.sort_unstable();
        seqs
    }

    fn reject(&self, reason: &str) {
        *self
            .stats
            .lock()
            .unwrap()
            .rejected
            .entry(reason.into())
            .or_default() += 1;
    }

    fn ingest(&self, topic: &str, payload: &[u8], received_at: i64) {
        if self.discard.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let parts: Vec<&str> = topic.split('/').collect();
        let [_, fleet, device, _] = parts.as_slice() else {
            return self.reject("bad_topic");
        };
        let Ok(v) = serde_json::from_slice::<Value>(payload) else {
            return self.reject("malformed_json");
        };
        let readings = match v.get("readings") {
            Some(Value::Array(a)) => a.clone(),
            _ => vec![v],
        };
        for r in readings {
            let seq = r["seq"].as_u64().unwrap();
            let ts = r["ts"].as_i64().unwrap();
            let finest_end = ts.div_euclid(60_000) * 60_000 + 60_000;
            if finest_end + ALLOWED_LATENESS_MS <= received_at {
                self.reject("too_late");
                continue;
            }
            if !self.seen.lock().unwrap().insert((device.to_string(), seq)) {
                self.stats.lock().unwrap().duplicate_readings += 1;
                continue;
            }
            self.stats.lock().unwrap().accepted_readings += 1;
            self.accepted
                .lock()
                .unwrap()
                .push((device.to_string(), seq));
            let mut series = self.series.lock().unwrap();
            for (metric, value) in r["metrics"].as_object().unwrap() {
                let value = value.as_f64().unwrap();
                let mut latest = self.latest.lock().unwrap();
                let l = latest
                    .entry((device.to_string(), metric.clone()))
                    .or_insert((ts, value));
                if ts >= l.0 {
                    *l = (ts, value);
                }
                drop(latest);
                for (res, _) in RESOLUTIONS {
                    let start = ts.div_euclid(res) * res;
                    let late = start + res <= received_at;
                    for key in [
                        (
                            "device".to_string(),
                            device.to_string(),
                            metric.clone(),
                            res,
                        ),
                        ("fleet".to_string(), fleet.to_string(), metric.clone(), res),
                    ] {
                        let w = series.entry(key).or_default().entry(start).or_default();
                        w.values.push((ts, value));
                        if late {
                            w.late_count += 1;
                            w.revision += 1;
                        }
                    }
                }
            }
        }
    }

    fn windows(
        &self,
        kind: &str,
        id: &str,
        metric: &str,
        res: i64,
        from: i64,
        to: i64,
    ) -> Option<Vec<Value>> {
        let series = self.series.lock().unwrap();
        let key = (kind.to_string(), id.to_string(), metric.to_string(), res);
        let Some(s) = series.get(&key) else {
            let known = series.keys().any(|k| k.0 == kind && k.1 == id);
            return if known || kind == "fleet" {
                Some(vec![])
            } else {
                None
            };
        };
        let mut out: Vec<Value> = s
            .range(from..to)
            .map(|(start, w)| view(*start, res, w))
            .collect();
        let faults = self.faults.lock().unwrap();
        if kind == "device" && res == 60_000 && faults.corrupt_device.as_deref() == Some(id) {
            let first_metric = series
                .keys()
                .filter(|k| k.0 == "device" && k.1 == id)
                .map(|k| k.2.clone())
                .min();
            if first_metric.as_deref() == Some(metric) && !out.is_empty() {
                let c = out[0]["count"].as_u64().unwrap();
                out[0]["count"] = json!(c + 1);
                let mut extra = out[out.len() - 1].clone();
                let start = extra["start"].as_i64().unwrap() + 5 * res;
                extra["start"] = json!(start);
                extra["end"] = json!(start + res);
                out.push(extra);
            }
        }
        Some(out)
    }
}

fn view(start: i64, res: i64, w: &Window) -> Value {
    let n = w.values.len() as f64;
    let sum: f64 = w.values.iter().map(|v| v.1).sum();
    let sum_sq: f64 = w.values.iter().map(|v| v.1 * v.1).sum();
    let mean = sum / n;
    let min = w.values.iter().map(|v| v.1).fold(f64::INFINITY, f64::min);
    let max = w
        .values
        .iter()
        .map(|v| v.1)
        .fold(f64::NEG_INFINITY, f64::max);
    // By time, ties broken by value, as the store's first and last are.
    let mut by_time = w.values.clone();
    by_time.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
    let (first, last) = (by_time[0], by_time[by_time.len() - 1]);
    let mut sorted: Vec<f64> = w.values.iter().map(|v| v.1).collect();
    sorted.sort_by(f64::total_cmp);
    let q = |p: f64| sorted[((p * (sorted.len() - 1) as f64).round()) as usize];
    json!({
        "start": start, "end": start + res, "count": w.values.len(),
        "sum": sum, "min": min, "max": max, "avg": mean,
        "stddev": (sum_sq / n - mean * mean).max(0.0).sqrt(),
        "first": {"ts": first.0, "value": first.1}, "last": {"ts": last.0, "value": last.1},
        "p50": q(0.5), "p90": q(0.9), "p99": q(0.99),
        "late_count": w.late_count, "revision": w.revision,
        "final": start + res + ALLOWED_LATENESS_MS <= now_ms(),
    })
}

/// The stand-in's MQTT listener and API, both on port 0.
pub struct Harness {
    pub pipeline: Arc<Pipeline>,
    pub mqtt: SocketAddr,
    pub api: SocketAddr,
}

impl Harness {
    pub async fn start() -> Harness {
        Harness::start_with(None).await
    }

    /// A stand-in whose MQTT listener speaks TLS only.
    pub async fn start_tls(pki: &Pki, client_auth: bool) -> Harness {
        Harness::start_with(Some(pki.acceptor(client_auth).unwrap())).await
    }

    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> Harness {
        let pipeline = Arc::new(Pipeline::default());
        let mqtt_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mqtt = mqtt_listener.local_addr().unwrap();
        let p = pipeline.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = mqtt_listener.accept().await else {
                    return;
                };
                let p = p.clone();
                p.peers.lock().unwrap().insert(peer.ip());
                match tls.clone() {
                    None => drop(tokio::spawn(serve_mqtt(stream, p))),
                    Some(acceptor) => drop(tokio::spawn(async move {
                        let Ok(stream) = acceptor.accept(stream).await else {
                            return;
                        };
                        if stream.get_ref().1.peer_certificates().is_some() {
                            p.client_certs
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        serve_mqtt(stream, p).await;
                    })),
                }
            }
        });
        let api_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = api_listener.local_addr().unwrap();
        let app = Router::new()
            .route("/v1/devices/{id}", get(device_latest))
            .route("/v1/devices/{id}/metrics/{metric}", get(device_windows))
            .route("/v1/fleets/{fleet}/metrics/{metric}", get(fleet_windows))
            .route("/v1/stats", get(stats))
            .with_state(pipeline.clone());
        tokio::spawn(async move { axum::serve(api_listener, app).await });
        Harness {
            pipeline,
            mqtt,
            api,
        }
    }

    pub fn broker_url(&self) -> String {
        format!("mqtt://{}", self.mqtt)
    }

    pub fn api_url(&self) -> String {
        format!("http://{}", self.api)
    }
}

/// The protocol level of a CONNECT at the front of `buf`, once its
/// header is there.
fn connect_level(buf: &[u8]) -> Option<u8> {
    // Fixed header, remaining length (1..=4 bytes), then "\0\4MQTT" and the level.
    let mut i = 1;
    while i < buf.len() && i < 5 && buf[i] & 0x80 != 0 {
        i += 1;
    }
    buf.get(i + 1 + 6).copied()
}

/// Both protocols reduced to what the stand-in acts on.
enum In {
    Connect(String),
    Publish(String, bytes::Bytes, QoS, u16),
    Ping,
    Disconnect,
    Other,
}

/// The next packet at the front of `buf` at protocol `level`, or the
/// bytes it still needs; `None` when the stream is not MQTT the stand-in
/// can read.
fn read_packet(level: Option<u8>, buf: &mut BytesMut) -> Option<Result<In, mqttbytes::Error>> {
    Some(match level {
        None => Err(mqttbytes::Error::InsufficientBytes(1)),
        Some(5) => match mqttbytes5::v5::Packet::read(buf, Some(1 << 20)) {
            Ok(mqttbytes5::v5::Packet::Connect(c, _, _)) => Ok(In::Connect(c.client_id)),
            Ok(mqttbytes5::v5::Packet::Publish(p)) => Ok(In::Publish(
                String::from_utf8(p.topic.to_vec()).unwrap(),
                p.payload,
                match p.qos {
                    mqttbytes5::QoS::AtMostOnce => QoS::AtMostOnce,
                    _ => QoS::AtLeastOnce,
                },
                p.pkid,
            )),
            Ok(mqttbytes5::v5::Packet::PingReq(_)) => Ok(In::Ping),
            Ok(mqttbytes5::v5::Packet::Disconnect(_)) => Ok(In::Disconnect),
            Ok(_) => Ok(In::Other),
            Err(mqttbytes5::Error::InsufficientBytes(n)) => {
                Err(mqttbytes::Error::InsufficientBytes(n))
            }
            // A two-byte DISCONNECT, which rumqttc's v5 reader refuses.
            Err(_) if buf.starts_with(&[0xE0, 0x00]) => Ok(In::Disconnect),
            Err(_) => return None,
        },
        Some(_) => match Packet::read(buf, 1 << 20) {
            Ok(Packet::Connect(c)) => Ok(In::Connect(c.client_id)),
            Ok(Packet::Publish(p)) => Ok(In::Publish(p.topic, p.payload, p.qos, p.pkid)),
            Ok(Packet::PingReq) => Ok(In::Ping),
            Ok(Packet::Disconnect) => Ok(In::Disconnect),
            Ok(_) => Ok(In::Other),
            Err(e) => Err(e),
        },
    })
}

/// Takes in one PUBLISH and queues its PUBACK in `out`, as the faults and
/// the PUBACK pacing say; `false` when the connection is to end.
async fn on_publish<S: AsyncWrite + Unpin>(
    stream: &mut S,
    out: &mut BytesMut,
    pipeline: &Pipeline,
    device: &str,
    next_ack: &mut tokio::time::Instant,
    (topic, payload, qos, pkid): (&str, &[u8], QoS, u16),
    v5: bool,
) -> bool {
    let now = tokio::time::Instant::now();
    pipeline.first_publish.lock().unwrap().get_or_insert(now);
    *pipeline.last_publish.lock().unwrap() = Some(now);
    pipeline.ingest(topic, payload, now_ms());
    let drop_now = {
        let mut f = pipeline.faults.lock().unwrap();
        match f.drop_after.get_mut(device) {
            Some(0) => {
                f.drop_after.remove(device);
                true
            }
            Some(n) => {
                *n -= 1;
                false
            }
            None => false,
        }
    };
    if drop_now {
        // Stored, never acknowledged: the device must retry,
        // and the retry must count once.
        let _ = stream.write_all(out).await;
        return false;
    }
    if qos == QoS::AtLeastOnce {
        let every = *pipeline.puback_every.lock().unwrap();
        if let Some(every) = every {
            // Serialized: one PUBACK per interval, each
            // written on its own. A timer that fires late
            // does not slow the cadence; an idle spell
            // does not earn a burst.
            let now = tokio::time::Instant::now();
            *next_ack = (*next_ack).max(now - every) + every;
            if stream.write_all(out).await.is_err() {
                return false;
            }
            out.clear();
            tokio::time::sleep_until(*next_ack).await;
            *pipeline.last_puback.lock().unwrap() = Some(tokio::time::Instant::now());
        }
        if v5 {
            mqttbytes5::v5::PubAck::new(pkid, None).write(out).unwrap();
        } else {
            Packet::PubAck(PubAck::new(pkid))
                .write(out, 1 << 20)
                .unwrap();
        }
    }
    true
}

async fn serve_mqtt<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, pipeline: Arc<Pipeline>) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut out = BytesMut::new();
    let mut device = String::new();
    let mut level: Option<u8> = None;
    // When the slow broker may send its next PUBACK.
    let mut next_ack = tokio::time::Instant::now();
    loop {
        loop {
            if level.is_none() {
                level = connect_level(&buf);
                if let Some(l) = level {
                    *pipeline.protocols.lock().unwrap().entry(l).or_default() += 1;
                }
            }
            let packet = match read_packet(level, &mut buf) {
                Some(p) => p,
                None => return,
            };
            let v5 = level == Some(5);
            match packet {
                Ok(In::Connect(id)) => {
                    device = id;
                    if v5 {
                        mqttbytes5::v5::ConnAck {
                            session_present: false,
                            code: mqttbytes5::v5::ConnectReturnCode::Success,
                            properties: None,
                        }
                        .write(&mut out)
                        .unwrap();
                    } else {
                        Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false))
                            .write(&mut out, 1 << 20)
                            .unwrap();
                    }
                }
                Ok(In::Publish(topic, payload, qos, pkid)) => {
                    let publish = (topic.as_str(), &payload[..], qos, pkid);
                    if !on_publish(
                        &mut stream,
                        &mut out,
                        &pipeline,
                        &device,
                        &mut next_ack,
                        publish,
                        v5,
                    )
                    .await
                    {
                        return;
                    }
                }
                Ok(In::Ping) => {
                    if v5 {
                        out.extend_from_slice(&[0xD0, 0x00]);
                    } else {
                        Packet::PingResp.write(&mut out, 1 << 20).unwrap();
                    }
                }
                Ok(In::Disconnect) => {
                    pipeline
                        .disconnects
                        .send_modify(|b| b.push(tokio::time::Instant::now()));
                    let _ = stream.write_all(&out).await;
                    return;
                }
                Ok(In::Other) => {}
                Err(mqttbytes::Error::InsufficientBytes(_)) => break,
                Err(_) => return,
            }
        }
        if !out.is_empty() {
            if stream.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        match stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

#[derive(Deserialize)]
struct WindowQuery {
    res: String,
    from: i64,
    to: i64,
    limit: Option<usize>,
    cursor: Option<String>,
}

fn page(all: Vec<Value>, q: &WindowQuery, head: Value) -> Response {
    let skip: usize = q.cursor.as_deref().map(|c| c.parse().unwrap()).unwrap_or(0);
    let size = q.limit.unwrap_or(1440).min(PAGE);
    let items: Vec<Value> = all.iter().skip(skip).take(size).cloned().collect();
    let next = (skip + size < all.len()).then(|| (skip + size).to_string());
    let mut body = head;
    body["windows"] = json!(items);
    body["next_cursor"] = json!(next);
    Json(body).into_response()
}

fn res_ms(res: &str) -> i64 {
    RESOLUTIONS.iter().find(|r| r.1 == res).unwrap().0
}

async fn device_windows(
    State(p): State<Arc<Pipeline>>,
    Path((id, metric)): Path<(String, String)>,
    Query(q): Query<WindowQuery>,
) -> Response {
    match p.windows("device", &id, &metric, res_ms(&q.res), q.from, q.to) {
        Some(all) => page(
            all,
            &q,
            json!({"device_id": id, "metric": metric, "res": q.res}),
        ),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"status": 404, "detail": format!("unknown device {id}")})),
        )
            .into_response(),
    }
}

async fn device_latest(State(p): State<Arc<Pipeline>>, Path(id): Path<String>) -> Response {
    let hidden = p.hidden_devices.lock().unwrap().contains(&id);
    let latest = p.latest.lock().unwrap();
    let metrics: BTreeMap<String, Value> = latest
        .iter()
        .filter(|((d, _), _)| *d == id)
        .map(|((_, m), (ts, v))| (m.clone(), json!({"ts": ts, "value": v})))
        .collect();
    if metrics.is_empty() || hidden {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"status": 404, "detail": format!("unknown device {id}")})),
        )
            .into_response();
    }
    Json(json!({"device_id": id, "metrics": metrics})).into_response()
}

async fn fleet_windows(
    State(p): State<Arc<Pipeline>>,
    Path((fleet, metric)): Path<(String, String)>,
    Query(q): Query<WindowQuery>,
) -> Response {
    let all = p
        .windows("fleet", &fleet, &metric, res_ms(&q.res), q.from, q.to)
        .unwrap_or_default();
    page(
        all,
        &q,
        json!({"fleet": fleet, "metric": metric, "res": q.res}),
    )
}

async fn stats(State(p): State<Arc<Pipeline>>) -> Response {
    let s = p.stats.lock().unwrap();
    Json(json!({
        "accepted_readings": s.accepted_readings,
        "duplicate_readings": s.duplicate_readings,
        "rejected": s.rejected,
    }))
    .into_response()
}
