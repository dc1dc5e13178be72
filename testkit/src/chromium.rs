//! Headless Chromium, for tests of the dashboard page.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// How long one page load may take, scripts and their requests included.
const DUMP_TIMEOUT: Duration = Duration::from_secs(60);

/// The browser binary, or an error that says how to get one.
pub fn chromium() -> Result<PathBuf> {
    crate::mosquitto::require("chromium", "apt-get install -y chromium")
        .or_else(|_| crate::mosquitto::require("chromium-browser", "apt-get install -y chromium"))
}

/// The page's DOM once its scripts have run: virtual time lets the page's
/// requests finish without the test guessing how long they take.
pub async fn dump_dom(url: &str) -> Result<String> {
    let profile = tempfile::tempdir()?;
    let run = tokio::process::Command::new(chromium()?)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            // Less than the page's refresh period: one load, one render.
            "--virtual-time-budget=3000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(url)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(DUMP_TIMEOUT, run)
        .await
        .with_context(|| format!("chromium did not finish within {DUMP_TIMEOUT:?}"))?
        .context("chromium could not be started")?;
    if !out.status.success() {
        bail!(
            "chromium failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}
