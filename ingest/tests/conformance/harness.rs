//! An endpoint on a real embedded log, and the external clients that drive
//! it.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ingest::{IngestMetrics, Listener, MetricsSnapshot, UsersFile, serve_on};
use schemas::{RejectReason, StreamRecord};
use serde_json::{Value, json};
use stream::ShardReader;
use stream::embedded::{EmbeddedConfig, EmbeddedLog};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use testkit::mosquitto::require;
use testkit::{ClientCert, Pki};

pub const WAIT: Duration = Duration::from_secs(10);

/// Devices the users file knows, with their passwords.
pub const DEV1: (&str, &str) = ("dev-1", "token-1");
pub const DEV2: (&str, &str) = ("dev-2", "token-2");
/// A user with the operator role, who may watch the whole fleet.
pub const OPERATOR: (&str, &str) = ("ops", "token-ops");

pub fn payload(seq: u64) -> String {
    format!(r#"{{"seq": {seq}, "ts": 1764240000123, "metrics": {{"temperature": 21.5}}}}"#)
}

pub fn topic(device: &str) -> String {
    format!("dt/f/{device}/telemetry")
}

pub struct Endpoint {
    pub tcp: SocketAddr,
    pub tls: SocketAddr,
    pub pki: Pki,
    pub metrics: Arc<IngestMetrics>,
    log: Arc<EmbeddedLog>,
    _dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

/// What the log holds: accepted readings as (device, seq), and refusals.
#[derive(Debug, Default)]
pub struct Stored {
    pub readings: BTreeSet<(String, u64)>,
    pub rejected: Vec<(RejectReason, String)>,
}

impl Endpoint {
    /// Users-file authentication on both listeners; the TLS one also takes
    /// client certificates (optional) signed by the test CA.
    pub async fn start() -> Result<Endpoint> {
        let pki = Pki::new()?;
        let dir = tempfile::tempdir()?;
        let log = EmbeddedLog::open(
            &dir.path().join("stream"),
            EmbeddedConfig {
                shards: 2,
                sync: true,
                ..EmbeddedConfig::default()
            },
        )?;
        let users = UsersFile::parse(&format!(
            "{}\n{}\n{}\n",
            UsersFile::entry(DEV1.0, DEV1.1, b"salt-1"),
            UsersFile::entry(DEV2.0, DEV2.1, b"salt-2"),
            UsersFile::entry_as(OPERATOR.0, OPERATOR.1, b"salt-3", ingest::Role::Operator),
        ))?;
        let config = ingest::EndpointConfig {
            authorizer: Arc::new(users),
            ..ingest::EndpointConfig::default()
        };
        let tcp = TcpListener::bind("127.0.0.1:0").await?;
        let tls = TcpListener::bind("127.0.0.1:0").await?;
        let (tcp_addr, tls_addr) = (tcp.local_addr()?, tls.local_addr()?);
        let acceptor = ingest::tls::acceptor(&pki.server(true, false))?;
        let metrics = Arc::new(IngestMetrics::new());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_on(
            vec![Listener::tcp(tcp), Listener::tls(tls, acceptor)],
            log.clone(),
            config,
            metrics.clone(),
            async move {
                let _ = stopped.await;
            },
        ));
        Ok(Endpoint {
            tcp: tcp_addr,
            tls: tls_addr,
            pki,
            metrics,
            log,
            _dir: dir,
            stop: Some(stop),
            task: Some(task),
        })
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        self.metrics.snapshot()
    }

    /// Everything in the log so far.
    pub async fn stored(&self) -> Result<Stored> {
        let mut out = Stored::default();
        for shard in self.log.shard_ids() {
            let mut reader = self.log.reader(&shard, "conformance")?;
            loop {
                let batch = reader.next_batch(10_000, Duration::ZERO).await?;
                if batch.is_empty() {
                    break;
                }
                for r in batch {
                    match schemas::decode_record(&r.data)? {
                        StreamRecord::Readings(p) => {
                            for reading in p.readings {
                                let seq = reading.seq.context("a reading without seq")?;
                                out.readings.insert((p.device_id.clone(), seq));
                            }
                        }
                        StreamRecord::Rejected(m) => out.rejected.push((m.reason, m.client_id)),
                        // Connects and disconnects: not what these clients are held to.
                        StreamRecord::Presence(_) => {}
                    }
                }
            }
        }
        Ok(out)
    }

    /// Waits until the log holds `(device, seq)` for every seq given.
    pub async fn wait_readings(&self, device: &str, seqs: &[u64]) -> Result<()> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let stored = self.stored().await?;
            let missing: Vec<u64> = seqs
                .iter()
                .copied()
                .filter(|s| !stored.readings.contains(&(device.to_string(), *s)))
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("readings of {device} never stored: {missing:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .context("the endpoint did not stop")???;
        }
        self.log.close().await?;
        Ok(())
    }
}

/// An external client program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    Paho,
    MqttJs,
    MosquittoPub,
}

/// One client run: how to connect and what to publish.
#[derive(Debug, Clone)]
pub struct Run<'a> {
    pub addr: SocketAddr,
    /// Over TLS, trusting the test CA.
    pub tls: bool,
    pub client_cert: Option<&'a ClientCert>,
    pub version: u8,
    pub qos: u8,
    pub login: Option<(&'a str, &'a str)>,
    pub client_id: String,
    /// (topic, payload) in order.
    pub publishes: Vec<(String, String)>,
}

/// What the client reported.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The CONNACK's code (0: accepted); `None` if there was none.
    pub connack: Option<i64>,
    /// Per publish: the PUBACK reason (0: success; QoS 0 counts as 0), or
    /// `None` when none came.
    pub acks: Vec<Option<i64>>,
    pub closed: bool,
    /// The tool's own account, for failure messages.
    pub raw: String,
}

impl Outcome {
    pub fn all_acked(&self, n: usize) -> bool {
        self.connack == Some(0) && self.acks.len() == n && self.acks.iter().all(|a| *a == Some(0))
    }
}

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

/// Checks that `tool` can run here, or says how to install it.
pub fn available(tool: Tool) -> Result<()> {
    match tool {
        Tool::Paho => {
            require("python3", "apt-get install -y python3")?;
            let ok = Command::new("python3")
                .args(["-c", "import paho.mqtt.client"])
                .stderr(Stdio::null())
                .status()?
                .success();
            if !ok {
                bail!(
                    "Python's paho-mqtt is not installed; install it with: pip install paho-mqtt"
                );
            }
        }
        Tool::MqttJs => {
            require("node", "apt-get install -y nodejs npm")?;
            if !clients_dir().join("node_modules/mqtt").is_dir() {
                bail!(
                    "MQTT.js is not installed; install it with: npm ci --prefix {}",
                    clients_dir().display()
                );
            }
        }
        Tool::MosquittoPub => {
            require("mosquitto_pub", "apt-get install -y mosquitto-clients")?;
        }
    }
    Ok(())
}

/// Runs `tool` as a child process and reads its outcome.
pub async fn run(tool: Tool, pki: &Pki, r: &Run<'_>) -> Result<Outcome> {
    available(tool)?;
    let mut input = None;
    let mut command = match tool {
        Tool::Paho | Tool::MqttJs => {
            let spec = json!({
                "port": r.addr.port(),
                "version": r.version,
                "qos": r.qos,
                "tls_ca": r.tls.then(|| pki.ca_cert.display().to_string()),
                "cert": r.client_cert.map(|c| c.cert.display().to_string()),
                "key": r.client_cert.map(|c| c.key.display().to_string()),
                "username": r.login.map(|l| l.0),
                "password": r.login.map(|l| l.1),
                "client_id": r.client_id,
                "publishes": r.publishes.iter().map(|(t, p)| json!({"topic": t, "payload": p})).collect::<Vec<_>>(),
            });
            let (program, script) = match tool {
                Tool::Paho => ("python3", "paho_client.py"),
                _ => ("node", "mqttjs_client.mjs"),
            };
            let mut c = tokio::process::Command::new(program);
            c.arg(clients_dir().join(script)).arg(spec.to_string());
            c
        }
        Tool::MosquittoPub => {
            let (c, stdin) = mosquitto_pub(pki, r)?;
            input = Some(stdin);
            c
        }
    };
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn()?;
    let mut stdin = child.stdin.take().context("no stdin")?;
    if let Some(text) = input {
        stdin.write_all(text.as_bytes()).await?;
    }
    drop(stdin);
    let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .context("the client did not finish")??;
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    let raw = format!(
        "exit {:?}\nstdout: {stdout}\nstderr: {stderr}",
        output.status.code()
    );
    match tool {
        Tool::MosquittoPub => {
            // mosquitto_pub reports through its exit code and stderr; with
            // -d its debug lines show every packet it receives.
            let connack = stdout
                .lines()
                .find_map(|l| l.split("received CONNACK (").nth(1))
                .and_then(|s| s.split(')').next())
                .and_then(|s| s.parse().ok());
            let mut acks: Vec<Option<i64>> = stdout
                .lines()
                .filter_map(|l| l.split("received PUBACK (").nth(1))
                .map(|s| {
                    // "Mid: 1, RC:135)"; codes below 0x80 are successes
                    // (16 is "no matching subscribers").
                    let rc: i64 = s
                        .split("RC:")
                        .nth(1)
                        .and_then(|rc| rc.trim().trim_end_matches(')').parse().ok())
                        .unwrap_or(0);
                    Some(if rc < 0x80 { 0 } else { rc })
                })
                .collect();
            if r.qos == 0 && output.status.success() {
                acks = vec![Some(0); r.publishes.len()];
            }
            acks.resize(r.publishes.len(), None);
            Ok(Outcome {
                connack,
                acks,
                closed: stderr.contains("rror") || !output.status.success(),
                raw,
            })
        }
        _ => {
            let line = stdout.lines().last().unwrap_or("");
            let v: Value = serde_json::from_str(line)
                .with_context(|| format!("unreadable client output: {raw}"))?;
            Ok(Outcome {
                connack: v["connack"].as_i64(),
                acks: v["acks"]
                    .as_array()
                    .map(|a| a.iter().map(Value::as_i64).collect())
                    .unwrap_or_default(),
                closed: v["closed"].as_bool().unwrap_or(false),
                raw,
            })
        }
    }
}

/// `mosquitto_pub`, with `-d` so that its debug lines show the CONNACK and
/// every PUBACK. Several messages go as stdin lines (`-l`), all to one topic;
/// one goes with `-m`, because in line mode mosquitto_pub reconnects and
/// resends after a refusal instead of exiting.
fn mosquitto_pub(pki: &Pki, r: &Run<'_>) -> Result<(tokio::process::Command, String)> {
    let mut c = tokio::process::Command::new("mosquitto_pub");
    c.args(["-d", "-h", "127.0.0.1", "-p"])
        .arg(r.addr.port().to_string())
        .args(["-V", if r.version == 5 { "mqttv5" } else { "mqttv311" }])
        .args(["-q", &r.qos.to_string(), "-i", &r.client_id]);
    if let Some((user, password)) = r.login {
        c.args(["-u", user, "-P", password]);
    }
    if r.tls {
        c.arg("--cafile").arg(&pki.ca_cert);
        if let Some(cert) = r.client_cert {
            c.arg("--cert").arg(&cert.cert).arg("--key").arg(&cert.key);
        }
    }
    let Some((topic, _)) = r.publishes.first() else {
        bail!("nothing to publish");
    };
    if r.publishes.iter().any(|(t, _)| t != topic) {
        bail!("mosquitto_pub publishes to one topic per run");
    }
    c.args(["-t", topic]);
    if let [(_, body)] = r.publishes.as_slice() {
        c.args(["-m", body]);
        return Ok((c, String::new()));
    }
    c.arg("-l");
    let lines = r.publishes.iter().map(|(_, p)| format!("{p}\n")).collect();
    Ok((c, lines))
}
