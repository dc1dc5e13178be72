//! One moto server per test binary, standing in for Kinesis, DynamoDB, SNS and SQS.
//!
//! `MOTO_ENDPOINT`, when set, names a running server to use instead. Else the
//! first caller starts `moto_server` on a free loopback port through a small
//! shell that holds the server's lifetime to this process: the shell waits
//! on a pipe from us and kills the server when the pipe closes, which
//! happens however the test binary exits.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use aws::AwsConfig;

/// moto takes about a second to import; a loaded machine may take longer.
const START_TIMEOUT: Duration = Duration::from_secs(60);

struct Server {
    endpoint: String,
    /// Held open until the process exits: its closing stops the server.
    _guard: Option<Mutex<Child>>,
}

static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();

/// The stand-in's URL, starting it on first use.
pub fn moto_endpoint() -> Result<String, String> {
    SERVER
        .get_or_init(start)
        .as_ref()
        .map(|s| s.endpoint.clone())
        .map_err(Clone::clone)
}

/// Client configuration for the stand-in.
pub fn moto_config() -> Result<AwsConfig, String> {
    Ok(AwsConfig::stand_in(moto_endpoint()?))
}

pub use crate::unique_name;

/// A fresh SQS queue on the stand-in, named after `prefix`; returns its URL.
pub async fn sqs_queue(sqs: &aws_sdk_sqs::Client, prefix: &str) -> anyhow::Result<String> {
    let created = sqs
        .create_queue()
        .queue_name(unique_name(prefix))
        .send()
        .await?;
    created
        .queue_url
        .ok_or_else(|| anyhow::anyhow!("the stand-in named no URL for queue {prefix}"))
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

fn start() -> Result<Server, String> {
    if let Ok(endpoint) = std::env::var("MOTO_ENDPOINT") {
        return Ok(Server {
            endpoint,
            _guard: None,
        });
    }
    if !on_path("moto_server") {
        return Err(
            "moto_server is not installed; these tests need it: pip install 'moto[server]'"
                .to_string(),
        );
    }
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("finding a free port: {e}"))?;
    let log = std::env::temp_dir().join(format!("iotpipe-moto-{port}.log"));
    let child = Command::new("sh")
        .arg("-c")
        .arg(r#"moto_server -H 127.0.0.1 -p "$1" >"$2" 2>&1 & server=$!; read _closed; kill "$server""#)
        .arg("sh")
        .arg(port.to_string())
        .arg(&log)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting moto_server: {e}"))?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        match TcpStream::connect((Ipv4Addr::LOCALHOST, port)) {
            Ok(_) => break,
            Err(e) if e.kind() == ErrorKind::ConnectionRefused && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                return Err(format!(
                    "moto_server did not listen on port {port} within {START_TIMEOUT:?} ({e}); see {}",
                    log.display()
                ));
            }
        }
    }
    Ok(Server {
        endpoint: format!("http://127.0.0.1:{port}"),
        _guard: Some(Mutex::new(child)),
    })
}
