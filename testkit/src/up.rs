//! `iotpipe up` as a child process, for tests that kill it with SIGKILL.

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

impl Up {
    /// Runs `bin up --data-dir DIR ARGS… --log-format json` and waits for its
    /// first line, which it prints once it accepts connections:
    /// `iotpipe up: mqtt://ADDR http://ADDR …`. `bin` is the test's
    /// `env!("CARGO_BIN_EXE_iotpipe")`, which only the binary's own tests see.
    pub fn spawn(bin: &Path, dir: &Path, args: &[&str]) -> Result<Up> {
        let mut child = Command::new(bin)
            .args(["up", "--data-dir"])
            .arg(dir)
            .args(args)
            .args(["--log-format", "json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut line = String::new();
        let stdout = child.stdout.take().context("no stdout")?;
        BufReader::new(stdout).read_line(&mut line)?;
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.get(..2) != Some(&["iotpipe", "up:"][..]) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("unexpected first line: {line}");
        }
        let addr = |scheme: &str| -> Result<SocketAddr> {
            words
                .iter()
                .find_map(|w| w.strip_prefix(scheme))
                .with_context(|| format!("no {scheme} address in the first line: {line}"))?
                .parse()
                .with_context(|| format!("a bad {scheme} address in: {line}"))
        };
        Ok(Up {
            mqtt: addr("mqtt://")?,
            http: addr("http://")?,
            child,
        })
    }

    /// SIGKILL, and reaps the process.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
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
