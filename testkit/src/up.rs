//! `iotpipe up`, or one role of it (`ingest`, `process`, `api`), as a child
//! process, for tests that kill it with SIGKILL.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rand::{Rng, SeedableRng};

/// A running `iotpipe up` and the addresses it printed.
pub struct Up {
    pub child: Child,
    pub mqtt: SocketAddr,
    pub http: SocketAddr,
}

/// A child process and the addresses its first line named.
type Spawned = (Child, Option<SocketAddr>, SocketAddr);

/// Runs `bin ROLE --data-dir DIR ARGS… --log-format json`, its log to
/// `stderr`, and waits for its first line, which it prints once it accepts
/// connections: `iotpipe ROLE: [mqtt://ADDR] http://ADDR …`. Returns the
/// child and the MQTT and HTTP addresses; kills it if the line is not so.
fn spawn_role(bin: &Path, role: &str, dir: &Path, args: &[&str], stderr: Stdio) -> Result<Spawned> {
    let mut child = Command::new(bin)
        .arg(role)
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .args(["--log-format", "json"])
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut line = String::new();
    let stdout = child.stdout.take().context("no stdout")?;
    BufReader::new(stdout).read_line(&mut line)?;
    let words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
    if words.first().map(String::as_str) != Some("iotpipe")
        || words.get(1) != Some(&format!("{role}:"))
    {
        let _ = child.kill();
        let _ = child.wait();
        bail!("unexpected first line of iotpipe {role}: {line}");
    }
    let addrs = addr(&words, "mqtt://").and_then(|mqtt| Ok((mqtt, addr(&words, "http://")?)));
    match addrs {
        Ok((mqtt, Some(http))) => Ok((child, mqtt, http)),
        other => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("no HTTP address in the first line {line}: {other:?}")
        }
    }
}

/// The address after `scheme` in a first line's words, if there is one.
fn addr(words: &[String], scheme: &str) -> Result<Option<SocketAddr>> {
    words
        .iter()
        .find_map(|w| w.strip_prefix(scheme))
        .map(|a| {
            a.parse()
                .with_context(|| format!("a bad {scheme} address in: {words:?}"))
        })
        .transpose()
}

impl Up {
    /// Runs `bin up --data-dir DIR ARGS… --log-format json` and waits for its
    /// first line, which it prints once it accepts connections:
    /// `iotpipe up: mqtt://ADDR http://ADDR …`. `bin` is the test's
    /// `env!("CARGO_BIN_EXE_iotpipe")`, which only the binary's own tests see.
    pub fn spawn(bin: &Path, dir: &Path, args: &[&str]) -> Result<Up> {
        let (mut child, mqtt, http) = spawn_role(bin, "up", dir, args, Stdio::null())?;
        let Some(mqtt) = mqtt else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("iotpipe up named no MQTT address");
        };
        Ok(Up { child, mqtt, http })
    }

    /// SIGKILL, and reaps the process.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

/// A running `iotpipe ingest`, `process` or `api` (or `up`), killed with
/// SIGKILL when dropped.
pub struct RoleProcess {
    pub child: Child,
    /// The MQTT endpoint, for `ingest`.
    pub mqtt: Option<SocketAddr>,
    pub http: SocketAddr,
}

impl RoleProcess {
    /// Runs `bin ROLE --data-dir DIR ARGS… --log-format json`, its log in
    /// `DIR/iotpipe.log`, and waits until it accepts connections.
    pub fn spawn(bin: &Path, role: &str, dir: &Path, args: &[&str]) -> Result<RoleProcess> {
        std::fs::create_dir_all(dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("iotpipe.log"))?;
        let (child, mqtt, http) =
            spawn_role(bin, role, dir, args, Stdio::from(log)).map_err(|e| {
                // The process's own words say why it did not start.
                let log = std::fs::read_to_string(dir.join("iotpipe.log")).unwrap_or_default();
                let tail = log.get(log.len().saturating_sub(2000)..).unwrap_or(&log);
                e.context(format!("its log ends: {tail}"))
            })?;
        Ok(RoleProcess { child, mqtt, http })
    }

    /// SIGKILL, and reaps the process.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM, and waits for the process to stop: whether it stopped
    /// cleanly (exit status 0).
    pub fn terminate(mut self) -> Result<bool> {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status()?;
        anyhow::ensure!(status.success(), "kill -TERM {pid} failed");
        Ok(self.child.wait()?.success())
    }
}

impl Drop for RoleProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills `up` with SIGKILL `kills` times at seeded random moments 0.6 to
/// 1.8 s apart, restarting it with `restart` each time, on a thread of its
/// own so that the test's load keeps running meanwhile. The thread returns
/// the last process, still running.
pub fn kill_and_restart(
    mut up: Up,
    kills: u32,
    seed: u64,
    restart: impl Fn() -> Result<Up> + Send + 'static,
) -> std::thread::JoinHandle<Result<Up>> {
    std::thread::spawn(move || {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        for kill in 1..=kills {
            std::thread::sleep(Duration::from_millis(rng.random_range(600..1800)));
            up.kill()?;
            eprintln!("kill {kill}: iotpipe up killed with SIGKILL; restarting");
            up = restart()?;
        }
        Ok(up)
    })
}
