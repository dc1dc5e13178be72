//! One step of the benchmark: fresh processes, one simulator run at one
//! rate, and the verdict with the figures behind it.
//!
//! - [`Bench::pipeline_step`]: `iotpipe up` (the embedded endpoint, or
//!   Mosquitto in front with iotpipe's bridge behind it; on the embedded
//!   log and SQLite, or on NATS JetStream and PostgreSQL), the simulator
//!   with `--verify`, the pipeline's own counters read alongside.
//! - [`Bench::baseline_step`]: the broker alone (Mosquitto, or rumqttd
//!   embedded in a counting subscriber), every message counted as delivered.
//! - [`Bench::fleet_baseline_step`]: Mosquitto alone at fleet shape, nothing
//!   subscribed, with its CPU per message.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use testkit::mosquitto::Mosquitto;
use testkit::up::Up;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::report::{SimReport, rates_agree};
use crate::sample::{CpuSampler, StatsSampler, WrittenSince, flushed_after, metric, pipeline_rate};

/// The built binaries a step runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub iotpipe: PathBuf,
    pub device_sim: PathBuf,
    /// `ingest/examples/baseline.rs`: the counting subscriber.
    pub baseline: PathBuf,
}

/// What every step shares: the binaries and the run's fixed shape.
pub struct Bench {
    pub bins: Binaries,
    pub devices: u32,
    pub duration_s: u64,
    /// Devices connecting per second; thousands at once overflow the listen
    /// backlog.
    pub connect_rate: Option<f64>,
    pub iotpipe_config: Option<PathBuf>,
    /// `device-sim --hold-connections` on every step.
    pub hold_connections: bool,
    pub http: reqwest::Client,
}

/// Where the pipeline keeps its stream and its rollups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The embedded log and SQLite behind the write-behind cache: `iotpipe
    /// up`'s default.
    Embedded,
    /// A NATS JetStream server and a PostgreSQL database, started for the
    /// step by the test kit's launchers (PostgreSQL there runs with
    /// `fsync=off`; JetStream syncs on its own interval, not per message).
    NatsPostgres,
}

/// The servers a [`Backend::NatsPostgres`] step runs on, stopped with it.
struct Services {
    nats: testkit::nats::NatsServer,
    db: testkit::postgres::TestDb,
}

impl Services {
    async fn start(backend: Backend) -> Result<Option<Services>> {
        if backend == Backend::Embedded {
            return Ok(None);
        }
        let nats = blocking(testkit::nats::NatsServer::start).await?;
        let db = testkit::postgres::database()
            .await
            .map_err(anyhow::Error::msg)?;
        Ok(Some(Services { nats, db }))
    }

    fn args(&self) -> Vec<String> {
        [
            "--stream",
            "nats",
            "--nats-url",
            self.nats.url(),
            "--store",
            "postgres",
            "--postgres-url",
            &self.db.url(),
        ]
        .map(String::from)
        .to_vec()
    }

    /// The processes besides iotpipe whose CPU and disk writes the step
    /// counts: the NATS server, and every PostgreSQL process (the server
    /// forks one per connection).
    fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self.nats.pid().into_iter().collect();
        pids.extend(processes_named("postgres"));
        pids
    }
}

/// The pids of the processes whose command is `name`.
fn processes_named(name: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name)
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broker {
    /// iotpipe's own MQTT endpoint (the pipeline), or rumqttd embedded in
    /// the counting subscriber (the baseline).
    Embedded,
    Mosquitto,
}

/// The load of one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Load {
    pub qos: u8,
    pub readings: u32,
    /// Total messages per second offered.
    pub rate: f64,
}

/// A step's verdict and the figures it was reached on.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub pass: bool,
    pub figures: Value,
}

/// Mosquitto in front of iotpipe: docs/mosquitto.conf's queue and
/// in-flight settings, without persistence (each run starts clean).
const MOSQUITTO_IN_FRONT: &str = "max_inflight_messages 1000\nmax_queued_messages 5000000\n\
     max_queued_bytes 2000000000\nmessage_size_limit 262144\n";

/// The store flushes every 10 s: a step waits for a flush after the
/// simulator, so that disk bytes count every reading's store writes too.
/// Past this, the figures are taken as they are.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the simulator may run, verify included.
const SIMULATOR_TIMEOUT: Duration = Duration::from_secs(1200);

/// How the simulator runs in a step.
struct Sim<'a> {
    broker: &'a str,
    load: Load,
    /// The API to verify against and sample freshness from.
    verify: Option<&'a str>,
    /// Mosquitto sits in front: its PUBACK says only that it has the
    /// message, and its queue may hold the message past a window's end
    /// before iotpipe stamps it.
    in_front: bool,
    /// Processes whose CPU per acknowledged message is measured.
    cpu_of: Vec<u32>,
}

/// `iotpipe up`, killed when the step ends however it ends.
struct Running(Up);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
    }
}

impl Bench {
    pub async fn pipeline_step(
        &self,
        broker: Broker,
        backend: Backend,
        load: Load,
    ) -> Result<Step> {
        let workdir = workdir()?;
        let mosquitto = match broker {
            Broker::Mosquitto => {
                Some(blocking(|| Mosquitto::start_quiet(MOSQUITTO_IN_FRONT)).await?)
            }
            Broker::Embedded => None,
        };
        let services = Services::start(backend).await?;
        let extra = services.as_ref().map(Services::args).unwrap_or_default();
        let up = self.up(workdir.path(), mosquitto.as_ref(), extra).await?;
        let pid = up.0.child.id();
        // iotpipe first, then Mosquitto in front, then the servers behind.
        let mut pids = vec![pid];
        pids.extend(mosquitto.as_ref().map(Mosquitto::pid));
        let servers = services.as_ref().map(Services::pids).unwrap_or_default();
        pids.extend(&servers);
        let api = format!("http://{}", up.0.http);
        let broker_url = match &mosquitto {
            Some(m) => m.url(),
            None => format!("mqtt://{}", up.0.mqtt),
        };
        if mosquitto.is_some() {
            // The bridge's subscription must exist before publishing starts,
            // or Mosquitto has nobody to queue the first messages for.
            self.wait_subscribed(&api).await?;
        }
        let stats = StatsSampler::start(self.http.clone(), format!("{api}/v1/stats"));
        let written_since = WrittenSince::start(&pids, workdir.path());
        let sim = Sim {
            broker: &broker_url,
            load,
            verify: Some(&api),
            in_front: mosquitto.is_some(),
            cpu_of: pids.clone(),
        };
        let run = self.simulate(sim, workdir.path()).await;
        let pipeline_readings_per_s = pipeline_rate(&stats.finish().await);
        let (r, cpu) = run?;
        if backend == Backend::Embedded {
            // Only the write-behind cache flushes; PostgreSQL is written
            // through.
            self.wait_flushed(&api).await?;
        }
        let (written, device) = written_since.now();
        let mosquitto_cpu = mosquitto
            .as_ref()
            .and_then(|_| cpu.get(1).copied().flatten());
        let servers_cpu: Option<f64> = cpu
            .iter()
            .skip(1 + usize::from(mosquitto.is_some()))
            .flatten()
            .copied()
            .reduce(|a, b| a + b);
        let page = self.get(&format!("{api}/metrics")).await?;
        let accepted = metric(&page, "iotpipe_processor_readings_accepted_total");
        let writes = metric(&page, "iotpipe_store_writes_total");
        let flushed = metric(&page, "iotpipe_store_flushed_items_total");
        let log_syncs = metric(&page, "iotpipe_stream_syncs_completed_total");
        let log_written = metric(&page, "iotpipe_stream_segment_written_bytes_total");
        let pass = r.verified()
            && accepted == r.readings_sent as f64
            && r.none_failed()
            && r.kept_schedule(load.rate)
            && r.fresh_enough()
            && rates_agree(r.achieved_readings_per_sec, pipeline_readings_per_s);
        let per_reading = |n: f64| (accepted > 0.0).then(|| n / accepted);
        let freshness = r.freshness.as_ref();
        let figures = json!({
            "target_msgs_per_s": load.rate,
            // Acknowledged over the real time from first publish to last PUBACK.
            "msgs_per_s": r.achieved_msgs_per_sec,
            "readings_per_s": r.achieved_readings_per_sec,
            "rate_span_ms": r.rate_span_ms,
            // /v1/stats' accepted_readings over the same step.
            "pipeline_readings_per_s": pipeline_readings_per_s,
            "schedule_lag_p99_ms": r.schedule_lag.as_ref().map(|l| l.p99_ms),
            "verdict": r.verdict,
            "messages": r.messages_sent,
            "verify_ok": r.verify.as_ref().map(|v| v.ok),
            "windows": r.verify.as_ref().map(|v| v.windows),
            "freshness_samples": freshness.map(|f| f.samples),
            "freshness_missed": freshness.map(|f| f.missed),
            "freshness_p50_ms": freshness.and_then(|f| f.p50_ms.clone()),
            "freshness_p99_ms": freshness.and_then(|f| f.p99_ms.clone()),
            "freshness_poll_late_p99_ms": freshness.and_then(|f| f.poll_late_p99_ms),
            "puback_p50_ms": r.puback.as_ref().map(|l| l.p50_ms),
            "puback_p99_ms": r.puback.as_ref().map(|l| l.p99_ms),
            // CPU of iotpipe (and of Mosquitto in front) per acknowledged
            // message, over the publishing window.
            "iotpipe_cpu_us_per_msg": cpu.first().copied().flatten(),
            "mosquitto_cpu_us_per_msg": mosquitto_cpu,
            // The NATS server and PostgreSQL's processes together.
            "servers_cpu_us_per_msg": servers_cpu,
            "devices": self.devices,
            "hold_connections": self.hold_connections,
            "readings_accepted": accepted,
            "store_writes": writes,
            "store_flushed": flushed,
            // Batch commits: what a store without the write-behind cache
            // (DynamoDB under the Lambda function) would write.
            "write_amplification": per_reading(writes),
            // What reached SQLite after the cache coalesced it.
            "sqlite_writes_per_reading": per_reading(flushed),
            // Bytes iotpipe (and the servers behind it) made the kernel
            // write, log and store together, as `/proc/PID/io` counts them:
            // whole pages, or whole large folios, each time one turns dirty
            // (see `sample::device_written`).
            "disk_bytes_per_reading": per_reading(written as f64),
            // Bytes the data directory's disk wrote over the step, journal
            // included: what reached the disk, from the whole machine.
            "device_bytes_per_reading": device.and_then(|d| per_reading(d as f64)),
            // The embedded log's own account since iotpipe started (connects
            // included): its syncs, each of which rewrites at least a page of
            // a segment's tail, and the bytes it wrote, zeros ahead included.
            "log_syncs_per_reading": per_reading(log_syncs),
            "log_written_bytes_per_reading": per_reading(log_written),
        });
        Ok(Step { pass, figures })
    }

    pub async fn baseline_step(&self, broker: Broker, load: Load) -> Result<Step> {
        let workdir = workdir()?;
        let (mosquitto, broker_url, counter_args) = match broker {
            Broker::Mosquitto => {
                let m = blocking(|| Mosquitto::start_quiet(MOSQUITTO_IN_FRONT)).await?;
                let url = m.url();
                let args = vec!["count".to_string(), url.clone(), load.qos.to_string()];
                (Some(m), url, args)
            }
            Broker::Embedded => {
                let addr = format!("127.0.0.1:{}", free_port()?);
                (None, format!("mqtt://{addr}"), vec!["rumqttd".into(), addr])
            }
        };
        let mut counter = tokio::process::Command::new(&self.bins.baseline)
            .args(&counter_args)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.bins.baseline.display()))?;
        let stdout = counter.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        if lines.next_line().await?.as_deref() != Some("ready") {
            bail!("the counting subscriber did not start");
        }
        let sim = Sim {
            broker: &broker_url,
            load,
            verify: None,
            in_front: false,
            cpu_of: vec![],
        };
        let (r, _) = self.simulate(sim, workdir.path()).await?;
        // The subscriber prints its count once no message has come for a while.
        let last = tokio::time::timeout(Duration::from_secs(120), async {
            let mut last = None;
            while let Some(line) = lines.next_line().await? {
                last = Some(line);
            }
            anyhow::Ok(last)
        })
        .await
        .context("the counting subscriber did not report")??
        .context("the counting subscriber printed no count")?;
        let got: Value = serde_json::from_str(&last)
            .with_context(|| format!("the counting subscriber printed {last:?}"))?;
        let received = got["received"].as_u64().unwrap_or(0);
        let subscriber_rate = got["msgs_per_s"].as_f64().unwrap_or(0.0);
        drop(mosquitto);
        // A broker that acknowledges on receipt can take messages faster
        // than it delivers them; only delivery at the offered rate counts.
        let pass = received >= r.messages_sent
            && r.none_failed()
            && r.kept_schedule(load.rate)
            && subscriber_rate >= 0.95 * load.rate;
        let figures = json!({
            "target_msgs_per_s": load.rate,
            "msgs_per_s": r.achieved_msgs_per_sec,
            "messages": r.messages_sent,
            "received": received,
            "lost": r.messages_sent.saturating_sub(received),
            "subscriber_msgs_per_s": subscriber_rate,
        });
        Ok(Step { pass, figures })
    }

    /// Mosquitto alone at the same shape: every publish acknowledged on
    /// time, and the broker's CPU per message over the publishing window.
    pub async fn fleet_baseline_step(&self, load: Load) -> Result<Step> {
        let workdir = workdir()?;
        let mosquitto = blocking(|| Mosquitto::start_quiet(&mosquitto_alone())).await?;
        let sim = Sim {
            broker: &mosquitto.url(),
            load,
            verify: None,
            in_front: false,
            cpu_of: vec![mosquitto.pid()],
        };
        let (r, cpu) = self.simulate(sim, workdir.path()).await?;
        let pass = r.none_failed() && r.kept_schedule(load.rate);
        let figures = json!({
            "target_msgs_per_s": load.rate,
            "msgs_per_s": r.achieved_msgs_per_sec,
            "messages": r.messages_sent,
            "schedule_lag_p99_ms": r.schedule_lag.as_ref().map(|l| l.p99_ms),
            "puback_p99_ms": r.puback.as_ref().map(|l| l.p99_ms),
            "reconnects": r.reconnects,
            "mosquitto_cpu_us_per_msg": cpu.first().copied().flatten(),
            "devices": self.devices,
            "hold_connections": self.hold_connections,
        });
        Ok(Step { pass, figures })
    }

    async fn up(
        &self,
        dir: &Path,
        in_front: Option<&Mosquitto>,
        extra: Vec<String>,
    ) -> Result<Running> {
        let mut args: Vec<String> = [
            "--mqtt-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ]
        .map(String::from)
        .to_vec();
        if let Some(m) = in_front {
            args.extend(["--broker".into(), m.url()]);
        }
        if let Some(config) = &self.iotpipe_config {
            args.extend(["--config".into(), config.display().to_string()]);
        }
        args.extend(extra);
        let bin = self.bins.iotpipe.clone();
        let data = dir.join("data");
        let up = blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Up::spawn(&bin, &data, &args)
        })
        .await?;
        Ok(Running(up))
    }

    /// Runs the simulator; returns its report and, for each process of
    /// `sim.cpu_of`, its CPU µs per acknowledged message over the window
    /// from the first publish to the last acknowledgement.
    async fn simulate(
        &self,
        sim: Sim<'_>,
        workdir: &Path,
    ) -> Result<(SimReport, Vec<Option<f64>>)> {
        let report_file = workdir.join("report.json");
        let mut cmd = tokio::process::Command::new(&self.bins.device_sim);
        cmd.args(["--broker", sim.broker])
            .args(["--devices", &self.devices.to_string()])
            .args(["--total-rate", &format!("{:.1}", sim.load.rate)])
            .args(["--duration", &format!("{}s", self.duration_s)])
            .args(["--qos", &sim.load.qos.to_string()])
            .args(["--readings-per-message", &sim.load.readings.to_string()])
            .args([
                "--metrics",
                "1",
                "--seed",
                "7",
                "--quiet",
                "--report",
                "json",
            ])
            .arg(&report_file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        if let Some(api) = sim.verify {
            // Freshness samples about 5,000 publishes a step (its default).
            cmd.args(["--verify", api, "--verify-timeout", "60s"]);
        }
        if sim.in_front {
            cmd.args(["--arrival-slack", "60s"]);
        }
        if self.hold_connections {
            cmd.arg("--hold-connections");
        }
        if let Some(rate) = self.connect_rate {
            cmd.args(["--connect-rate", &rate.to_string()]);
        }
        let cpu = CpuSampler::start(sim.cpu_of);
        // A failed verify exits non-zero; the report says why, and the
        // verdict reads it from there.
        let status = tokio::time::timeout(SIMULATOR_TIMEOUT, cmd.status()).await;
        let series = cpu.finish();
        status
            .context("the simulator did not finish in time")?
            .context("running the simulator")?;
        let text = std::fs::read_to_string(&report_file).with_context(|| {
            format!("the simulator wrote no report at {}", report_file.display())
        })?;
        let r = SimReport::parse(&text)?;
        // The publishing window: after connecting (and the simulator's 100
        // ms start offset), as long as first publish to last acknowledgement.
        let t0 = r.connect_ms as f64 / 1000.0 + 0.1;
        let t1 = t0 + r.rate_span_ms / 1000.0;
        let acked = if r.acked > 0 {
            r.acked
        } else {
            r.messages_sent
        };
        let cpu = series
            .iter()
            .map(|s| {
                let seconds = s.between(t0, t1)?;
                (acked > 0).then(|| seconds * 1e6 / acked as f64)
            })
            .collect();
        Ok((r, cpu))
    }

    async fn get(&self, url: &str) -> Result<String> {
        let resp = self.http.get(url).send().await?.error_for_status()?;
        Ok(resp.text().await?)
    }

    async fn wait_subscribed(&self, api: &str) -> Result<()> {
        for _ in 0..600 {
            let page = self.get(&format!("{api}/metrics")).await?;
            if metric(&page, "iotpipe_bridge_subscribed") >= 1.0 {
                return Ok(());
            }
            // Polling another process's readiness: nothing to await instead.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("the bridge did not subscribe within 30 s")
    }

    /// Waits until the store has flushed what the step committed (see
    /// [`flushed_after`]), at most [`FLUSH_TIMEOUT`].
    async fn wait_flushed(&self, api: &str) -> Result<()> {
        const FLUSHES: &str = "iotpipe_store_flush_seconds_count";
        let url = format!("{api}/metrics");
        let at_end = metric(&self.get(&url).await?, FLUSHES);
        let deadline = tokio::time::Instant::now() + FLUSH_TIMEOUT;
        while tokio::time::Instant::now() < deadline {
            if flushed_after(at_end, metric(&self.get(&url).await?, FLUSHES)) {
                return Ok(());
            }
            // Polling another process's counter: nothing to await instead.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        eprintln!(
            "iotpipe-bench: no store flush within {} s; disk bytes may miss the last writes",
            FLUSH_TIMEOUT.as_secs()
        );
        Ok(())
    }
}

/// Mosquitto alone at fleet shape: acknowledging and queueing nothing for
/// anyone (no subscriber). As root it must not drop to the mosquitto user,
/// whose open-file limit is lower than the fleet's connections.
fn mosquitto_alone() -> String {
    let mut conf = String::from(
        "max_inflight_messages 1000\nmax_queued_messages 0\nmax_queued_bytes 2000000000\n\
         message_size_limit 262144\n",
    );
    if running_as_root() {
        conf.push_str("user root\nmax_connections -1\n");
    }
    conf
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the process's effective user.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn workdir() -> Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new()
        .prefix("iotpipe-bench-")
        .tempdir()?)
}

/// A port free a moment ago, for the counting subscriber's embedded
/// broker, which takes its address on the command line.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Runs a blocking launcher (they wait for a child's first line or port)
/// off the runtime's threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await?
}
