//! Cold start of a Lambda function binary: the time from spawning the
//! process until its first request for work to the Lambda Runtime API
//! (`GET /2018-06-01/runtime/invocation/next`), against a stub Runtime API on
//! a loopback port. The stub never answers, so each run ends there.
//!
//! ```text
//! cargo run -p processors --example cold_start -- BOOTSTRAP [RUNS]
//! ```
//!
//! BOOTSTRAP is a built function, e.g. `$CARGO_TARGET_DIR/lambda/aggregate/bootstrap`
//! from `deploy/build.sh`. The process sees only the variables Lambda would
//! set (and dummy credentials), so local profiles cannot slow it down.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, TcpListener};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

const NEXT: &str = "GET /2018-06-01/runtime/invocation/next";

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let bootstrap = args.next().context("usage: cold_start BOOTSTRAP [RUNS]")?;
    let runs: usize = args.next().map(|r| r.parse()).transpose()?.unwrap_or(20);

    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let api = listener.local_addr()?;
    let (seen, polled) = mpsc::channel::<Instant>();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut line = String::new();
                if BufReader::new(&conn).read_line(&mut line).is_ok() && line.starts_with(NEXT) {
                    let _ = seen.send(Instant::now());
                }
                // Hold the connection open, as the long poll would be,
                // until the function is killed.
                let _ = BufReader::new(&conn).read_line(&mut String::new());
            });
        }
    });

    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        let mut child = Command::new(&bootstrap)
            .env_clear()
            .env("AWS_LAMBDA_RUNTIME_API", api.to_string())
            .env("AWS_LAMBDA_FUNCTION_NAME", "iotpipe-cold-start")
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env(
                "AWS_LAMBDA_LOG_GROUP_NAME",
                "/aws/lambda/iotpipe-cold-start",
            )
            .env("AWS_LAMBDA_LOG_STREAM_NAME", "cold-start")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "AKIDCOLDSTART")
            .env("AWS_SECRET_ACCESS_KEY", "cold-start")
            .env("AWS_SESSION_TOKEN", "cold-start")
            .env("TABLE_NAME", "iotpipe-rollups")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {bootstrap}"))?;
        let at = polled.recv_timeout(Duration::from_secs(10));
        let _ = child.kill();
        let status = child.wait()?;
        match at {
            Ok(at) => times.push(at.duration_since(started)),
            Err(_) => bail!("{bootstrap} never asked for work (exit: {status})"),
        }
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let pick = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    println!(
        "{bootstrap}: {runs} runs, cold start min {:.1} ms, median {:.1} ms, p90 {:.1} ms, max {:.1} ms",
        ms(times[0]),
        ms(pick(0.5)),
        ms(pick(0.9)),
        ms(times[times.len() - 1]),
    );
    Ok(())
}
