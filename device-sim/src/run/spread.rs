//! A run over several processes (see [`crate::processes`]): the parent
//! starts the workers, starts their schedules together and adds up what
//! they did; a worker runs its share and answers.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::time::Instant;

use super::fleets::{FleetRun, fleet_plans};
use super::{Published, connect, publish, record_start, set_phase};
use crate::config::SimConfig;
use crate::exporter::Phase;
use crate::freshness::Tally;
use crate::ledger::Ledger;
use crate::processes::{FleetReport, Processes, Recorded, Start, ToParent, WorkerReport};
use crate::publish::device::DeviceOutcome;
use crate::publish::{AckTimeline, FleetShared, PublishOutcome};
use crate::{now_ms, now_us, resources};

/// One worker process, as its parent talks to it.
struct Worker {
    index: u32,
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Worker {
    fn spawn(p: &Processes, index: u32) -> anyhow::Result<Worker> {
        let mut child = Command::new(&p.exe)
            .args(&p.args)
            .arg("--worker")
            .arg(format!("{index}/{}", p.count))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting worker {index}: {}", p.exe.display()))?;
        let stdin = child.stdin.take().context("a worker's stdin")?;
        let stdout = child.stdout.take().context("a worker's stdout")?;
        Ok(Worker {
            index,
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        })
    }

    /// The worker's next word; its end (it failed: its stderr says why) is
    /// an error naming its exit.
    async fn next(&mut self) -> anyhow::Result<ToParent> {
        match self.lines.next_line().await? {
            Some(line) => serde_json::from_str(&line)
                .with_context(|| format!("worker {} said `{line}`", self.index)),
            None => {
                let status = self.child.wait().await?;
                bail!("worker {} ended early ({status})", self.index)
            }
        }
    }

    async fn start(&mut self, start: &Start) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(start)?;
        line.push(b'\n');
        self.stdin.write_all(&line).await?;
        self.stdin.flush().await?;
        Ok(())
    }
}

/// The parent's side: starts the workers, waits until every one has
/// connected its devices, records the run's start and starts them all on
/// one schedule, then adds up their reports.
pub(super) async fn publish_workers(
    cfg: &SimConfig,
    runs: &[FleetRun],
    p: &Processes,
) -> anyhow::Result<Published> {
    let connecting = Instant::now();
    let mut workers = (0..p.count)
        .map(|i| Worker::spawn(p, i))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut rss_mib = (0.0, 0.0);
    for w in &mut workers {
        match w.next().await? {
            ToParent::Connected {
                rss_before_mib,
                rss_connected_mib,
                ..
            } => {
                rss_mib.0 += rss_before_mib;
                rss_mib.1 += rss_connected_mib;
            }
            ToParent::Done(_) => bail!("worker {} finished before it started", w.index),
        }
    }
    let connect_ms = connecting.elapsed().as_millis() as u64;
    set_phase(cfg, Phase::Publishing);
    let run_start_ms = now_ms() + 100;
    record_start(cfg, runs, run_start_ms)?;
    let clock = (Instant::now(), now_us());
    let start = Start { run_start_ms };
    for w in &mut workers {
        w.start(&start).await?;
    }
    let mut reports = Vec::with_capacity(workers.len());
    for w in &mut workers {
        match w.next().await? {
            ToParent::Done(report) => reports.push(*report),
            ToParent::Connected { .. } => bail!("worker {} connected twice", w.index),
        }
    }
    for mut w in workers {
        let status = w.child.wait().await?;
        ensure!(status.success(), "worker {} ended with {status}", w.index);
    }
    let mut published = merge(runs, reports, run_start_ms, clock)?;
    published.connect_ms = connect_ms;
    published.rss_mib = rss_mib;
    Ok(published)
}

/// The workers' reports as one process's outcome. `clock` is an instant and
/// the wall-clock µs at it, to place the workers' times on this process's
/// clock.
fn merge(
    runs: &[FleetRun],
    reports: Vec<WorkerReport>,
    run_start_ms: i64,
    clock: (Instant, i64),
) -> anyhow::Result<Published> {
    let (origin, origin_us) = clock;
    let at = |us: Option<i64>| {
        us.map(|us| {
            let d = Duration::from_micros(us.abs_diff(origin_us));
            if us >= origin_us {
                origin + d
            } else {
                origin.checked_sub(d).unwrap_or(origin)
            }
        })
    };
    let mut outcomes = Vec::with_capacity(runs.len());
    for r in runs {
        let mut plan = r.plan.clone();
        plan.run_start_ms = run_start_ms;
        let outcome = PublishOutcome {
            plan,
            sum: DeviceOutcome::default(),
            elapsed: Duration::ZERO,
            not_connected: 0,
        };
        outcomes.push((outcome, Arc::new(FleetShared::new()?)));
    }
    let mut freshness: Option<Tally> = None;
    let mut workers = resources::Usage::default();
    for report in reports {
        ensure!(
            report.fleets.len() == runs.len(),
            "a worker planned {} fleets where its parent planned {}",
            report.fleets.len(),
            runs.len()
        );
        for ((o, shared), f) in outcomes.iter_mut().zip(report.fleets) {
            o.sum.merge(DeviceOutcome {
                counters: f.counters,
                exceptions: f.exceptions,
                first_publish: at(f.first_publish_us),
                last_done: at(f.last_done_us),
            });
            o.elapsed = o.elapsed.max(Duration::from_micros(f.elapsed_us));
            o.not_connected += f.not_connected;
            shared.absorb(
                &f.latency.histogram()?,
                &AckTimeline::from_buckets(&f.timeline),
                &f.lag.histogram()?,
            )?;
        }
        if let Some(t) = report.freshness {
            freshness.get_or_insert_with(Tally::default).merge(t);
        }
        workers.add(&report.usage);
    }
    Ok(Published {
        outcomes,
        connect_ms: 0,
        freshness,
        rss_mib: (0.0, 0.0),
        workers,
        liveness: Vec::new(),
    })
}

/// A worker's side: plans the run as its parent did, connects its share of
/// the devices, publishes from the parent's start and reports on stdout.
pub async fn serve_worker(cfg: SimConfig) -> anyhow::Result<()> {
    cfg.validate()?;
    let slot = cfg.worker.context("serve_worker needs a worker slot")?;
    let ledger = match &cfg.ledger {
        Some(path) => Ledger::load(path)?,
        None => Ledger::default(),
    };
    let runs = fleet_plans(&cfg, &ledger)?;
    let devices: u32 = runs
        .iter()
        .map(|r| (0..r.plan.devices).filter(|d| slot.holds(*d)).count() as u32)
        .sum();
    let files_limit = resources::ensure_open_files(u64::from(devices) + resources::SPARE_FILES)?;
    let rss_before_mib = resources::Usage::now(files_limit).rss_mib;
    let connecting = Instant::now();
    let connected = connect(&cfg, &runs, devices).await?;
    say(&ToParent::Connected {
        connect_ms: connecting.elapsed().as_millis() as u64,
        rss_before_mib,
        rss_connected_mib: resources::Usage::now(files_limit).rss_mib,
    })?;
    let mut line = String::new();
    BufReader::new(tokio::io::stdin())
        .read_line(&mut line)
        .await
        .context("reading the start from the parent")?;
    let start: Start = serde_json::from_str(&line)
        .with_context(|| format!("the parent's start `{}`", line.trim()))?;
    let published = publish(&cfg, &runs, connected, start.run_start_ms).await?;
    let fleets = published
        .outcomes
        .into_iter()
        .map(|(o, shared)| FleetReport {
            counters: o.sum.counters,
            exceptions: o.sum.exceptions,
            first_publish_us: o.sum.first_publish.map(wall_us),
            last_done_us: o.sum.last_done.map(wall_us),
            elapsed_us: o.elapsed.as_micros() as u64,
            not_connected: o.not_connected,
            latency: Recorded::of(&shared.latency()),
            lag: Recorded::of(&shared.lag()),
            timeline: shared.ack_timeline().buckets(),
        })
        .collect();
    say(&ToParent::Done(Box::new(WorkerReport {
        fleets,
        freshness: published.freshness,
        usage: resources::Usage::now(files_limit),
    })))
}

/// One line to the parent.
fn say(word: &ToParent) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, word)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

/// An instant of this process as wall-clock µs since the epoch.
fn wall_us(at: Instant) -> i64 {
    now_us() - Instant::now().saturating_duration_since(at).as_micros() as i64
}
