//! A Mosquitto broker started by a test on a free loopback port, stopped
//! when dropped.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub struct Mosquitto {
    pub addr: SocketAddr,
    child: Child,
    _dir: tempfile::TempDir,
    pub log: PathBuf,
}

/// Finds `tool` on PATH or fails saying how to install it.
pub fn require(tool: &str, install: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path).chain([PathBuf::from("/usr/sbin")]) {
        let candidate = dir.join(tool);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("`{tool}` is not installed; install it with: {install}")
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Mosquitto {
    /// Starts Mosquitto with `extra` config lines after the listener,
    /// logging everything to [`Mosquitto::log_text`].
    pub fn start(extra: &str) -> Result<Mosquitto> {
        Self::launch("all", extra, None)
    }

    /// Starts Mosquitto as [`Mosquitto::start`] does, enforcing the ACL
    /// that the docs give (`docs/mosquitto.acl`): a device, logged in as its
    /// id, publishes only its own telemetry and status; the bridge logs in
    /// as `iotpipe-bridge`.
    pub fn start_with_acl(extra: &str) -> Result<Mosquitto> {
        let acl = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/mosquitto.acl");
        let text =
            std::fs::read_to_string(&acl).with_context(|| format!("reading {}", acl.display()))?;
        Self::launch("all", extra, Some(&text))
    }

    /// Starts Mosquitto logging errors only, for load: logging every packet
    /// would cost the broker more than the load it is measured under.
    pub fn start_quiet(extra: &str) -> Result<Mosquitto> {
        Self::launch("error", extra, None)
    }

    fn launch(log_type: &str, extra: &str, acl: Option<&str>) -> Result<Mosquitto> {
        let bin = require("mosquitto", "apt-get install -y mosquitto")?;
        let dir = tempfile::tempdir()?;
        let extra = match acl {
            None => extra.to_string(),
            Some(text) => {
                let path = dir.path().join("acl");
                std::fs::write(&path, text)?;
                format!("{extra}\nacl_file {}", path.display())
            }
        };
        // The port is free a moment ago; if another process takes it first,
        // Mosquitto fails to start and the next try picks another.
        for _ in 0..5 {
            let port = free_port()?;
            let conf = dir.path().join("mosquitto.conf");
            let log = dir.path().join("mosquitto.log");
            std::fs::write(
                &conf,
                format!(
                    "listener {port} 127.0.0.1\nallow_anonymous true\nlog_dest file {}\nlog_type {log_type}\n{extra}\n",
                    log.display()
                ),
            )?;
            let mut child = Command::new(&bin)
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting mosquitto")?;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            if wait_listening(addr, &mut child)? {
                return Ok(Mosquitto {
                    addr,
                    child,
                    _dir: dir,
                    log,
                });
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        bail!("mosquitto did not start")
    }

    pub fn url(&self) -> String {
        format!("mqtt://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        self._dir.path()
    }
}

/// Waits until `addr` accepts a connection, or the process exits.
fn wait_listening(addr: SocketAddr, child: &mut Child) -> Result<bool> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(false);
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(false)
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
