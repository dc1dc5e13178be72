//! Replaying a recorded file (`--replay FILE`): readings of real devices,
//! published at their recorded pace (or scaled, or as fast as the in-flight
//! window allows) and verified like any run.
//!
//! The file is CSV with a header (`device`, `ts`, an optional `fleet`, and
//! one column per metric; an empty cell: no value) or JSON lines
//! (`{"device": .., "ts": .., "fleet"?: .., "metrics": {..}}`); `ts` is ms
//! since the epoch. It is read whole before the run starts, and a bad row
//! is an error naming its line.
//!
//! A replayed fleet is a [`RunPlan`](crate::plan::RunPlan) whose `replay`
//! holds the file's rows: the schedule (`due_us`, the readings) and the
//! values (`payload`) come from them instead of the seed, and everything
//! downstream (publishing, the ledger, `expect`, verify) is the same code
//! as for a seeded run. Device `i`'s `k`-th row is its `k`-th message, one
//! reading with `seq = first_seq + k`: a device's rows keep their file
//! order. A row due before the one ahead of it (out of order within its
//! device) goes out right after that one, carrying its old `ts`: late data,
//! as the device sent it.
//!
//! The ledger records the file's path and digest, so a later process can
//! read the rows again to verify; a file changed since is refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use crate::config::check_id;
use anyhow::{Context, bail, ensure};
use serde::{Deserialize, Serialize};

/// How fast the recording is replayed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Speed {
    /// Recorded time divided by this factor (1: the recorded pace).
    Factor(f64),
    /// Every row due at once: as fast as the in-flight window allows.
    Max,
}

impl FromStr for Speed {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "max" {
            return Ok(Speed::Max);
        }
        match s.trim_end_matches('x').parse::<f64>() {
            Ok(f) if f.is_finite() && f > 0.0 => Ok(Speed::Factor(f)),
            _ => Err(format!(
                "--replay-speed `{s}` must be a positive factor (1, 10, 0.5) or `max`"
            )),
        }
    }
}

/// What the readings' timestamps become.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum TimeMode {
    /// Moved so that the file's first reading is taken when the run starts
    /// (the pipeline refuses readings older than its allowed lateness).
    Shift,
    /// As recorded: for files within the pipeline's allowed lateness.
    Keep,
}

/// What `--replay` asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayConfig {
    pub file: PathBuf,
    pub speed: Speed,
    pub time: TimeMode,
}

/// A replayed fleet's part of a plan: where its rows come from, and (once
/// read) the rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplayPlan {
    pub file: PathBuf,
    /// FNV-1a of the file's bytes, in hex: the file verify reads again must
    /// be the one that was published.
    pub digest: String,
    pub speed: Speed,
    pub time: TimeMode,
    /// The fleet of rows without a `fleet` column.
    pub default_fleet: String,
    /// The file's first row's `ts`: where the replay's clock starts.
    pub first_ts: i64,
    /// The fleet's rows, read from `file`; not in the ledger.
    #[serde(skip)]
    pub data: Option<Arc<ReplayFleet>>,
}

/// One fleet's devices and rows, as replayed.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReplayFleet {
    pub devices: Vec<ReplayDevice>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReplayDevice {
    pub id: String,
    pub rows: Vec<Row>,
}

/// One recorded reading.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// When it is due, µs after the run's start: never before the row ahead
    /// of it in its device.
    pub due_us: u64,
    /// As recorded, ms since the epoch.
    pub ts: i64,
    /// Per metric of the recording (see [`Recording::metrics`]).
    pub values: Vec<Option<f64>>,
}

/// A whole file, read and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Recording {
    /// Every metric in the file, sorted.
    pub metrics: Vec<String>,
    /// The first row's `ts`: where the replay's clock starts.
    pub first_ts: i64,
    /// The latest `ts`.
    pub last_ts: i64,
    /// Fleets in name order.
    pub fleets: BTreeMap<String, ReplayFleet>,
    pub digest: String,
}

impl ReplayPlan {
    /// Device `index`'s row `k`, once the rows are read.
    pub fn row(&self, index: u32, k: u64) -> Option<&Row> {
        self.data
            .as_ref()?
            .devices
            .get(index as usize)?
            .rows
            .get(usize::try_from(k).ok()?)
    }

    /// Device `index`'s rows due before `until_us` after the start.
    pub fn rows_within(&self, index: u32, until_us: u64) -> u64 {
        self.data
            .as_ref()
            .and_then(|d| d.devices.get(index as usize))
            .map_or(0, |d| {
                d.rows.iter().filter(|r| r.due_us < until_us).count() as u64
            })
    }

    /// A row's reading's timestamp, for a run started at `run_start_ms`.
    pub fn ts(&self, row: &Row, run_start_ms: i64) -> i64 {
        match self.time {
            TimeMode::Shift => run_start_ms + (row.ts - self.first_ts),
            TimeMode::Keep => row.ts,
        }
    }
}

/// One row as read, before devices are grouped.
struct RawRow {
    line: usize,
    fleet: Option<String>,
    device: String,
    ts: i64,
    metrics: Vec<(String, f64)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRow {
    device: String,
    ts: i64,
    #[serde(default)]
    fleet: Option<String>,
    metrics: BTreeMap<String, f64>,
}

/// Reads and checks `path`; rows without a fleet belong to `default_fleet`.
pub fn load(path: &Path, default_fleet: &str, speed: Speed) -> anyhow::Result<Recording> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let text = std::str::from_utf8(&bytes)
        .with_context(|| format!("replay file {} is not UTF-8", path.display()))?;
    let jsonl = match path.extension().and_then(|e| e.to_str()) {
        Some("csv") => false,
        Some("jsonl" | "ndjson" | "json") => true,
        _ => text.trim_start().starts_with('{'),
    };
    let rows = if jsonl {
        json_rows(text)
    } else {
        csv_rows(text)
    }
    .with_context(|| format!("replay file {}", path.display()))?;
    ensure!(
        !rows.is_empty(),
        "replay file {} holds no rows",
        path.display()
    );
    group(rows, default_fleet, speed, digest(&bytes))
        .with_context(|| format!("replay file {}", path.display()))
}

/// FNV-1a over the bytes, 64 bits in hex.
pub fn digest(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn json_rows(text: &str) -> anyhow::Result<Vec<RawRow>> {
    let mut rows = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r: JsonRow = serde_json::from_str(line).with_context(|| format!("line {}", n + 1))?;
        rows.push(RawRow {
            line: n + 1,
            fleet: r.fleet,
            device: r.device,
            ts: r.ts,
            metrics: r.metrics.into_iter().collect(),
        });
    }
    Ok(rows)
}

fn csv_rows(text: &str) -> anyhow::Result<Vec<RawRow>> {
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let Some((_, header)) = lines.next() else {
        return Ok(Vec::new());
    };
    let cols: Vec<&str> = header.split(',').map(str::trim).collect();
    let find = |name: &str| cols.iter().position(|c| *c == name);
    let (Some(device), Some(ts_col)) = (find("device"), find("ts")) else {
        bail!("line 1: the header must name a `device` and a `ts` column, got `{header}`");
    };
    let fleet = find("fleet");
    let mut rows = Vec::new();
    for (n, line) in lines {
        let line_no = n + 1;
        ensure!(
            !line.contains('"'),
            "line {line_no}: quoted CSV fields are not supported"
        );
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        ensure!(
            cells.len() == cols.len(),
            "line {line_no}: {} fields, the header has {}",
            cells.len(),
            cols.len()
        );
        let ts = cells[ts_col].parse::<i64>().map_err(|_| {
            anyhow::anyhow!(
                "line {line_no}: ts `{}` is not ms since the epoch",
                cells[ts_col]
            )
        })?;
        let mut metrics = Vec::new();
        for (j, (col, cell)) in cols.iter().zip(&cells).enumerate() {
            if j == device || j == ts_col || Some(j) == fleet || cell.is_empty() {
                continue;
            }
            let v: f64 = cell
                .parse()
                .map_err(|_| anyhow::anyhow!("line {line_no}: {col} `{cell}` is not a number"))?;
            metrics.push(((*col).to_string(), v));
        }
        rows.push(RawRow {
            line: line_no,
            fleet: fleet
                .map(|f| cells[f].to_string())
                .filter(|f| !f.is_empty()),
            device: cells[device].to_string(),
            ts,
            metrics,
        });
    }
    Ok(rows)
}

/// Checks each row and groups them into fleets and devices, in file order.
fn group(
    rows: Vec<RawRow>,
    default_fleet: &str,
    speed: Speed,
    digest: String,
) -> anyhow::Result<Recording> {
    let mut metrics: Vec<String> = Vec::new();
    for r in &rows {
        check_id("device", &r.device).with_context(|| format!("line {}", r.line))?;
        if let Some(f) = &r.fleet {
            check_id("fleet", f).with_context(|| format!("line {}", r.line))?;
        }
        ensure!(
            (0..=MAX_TS).contains(&r.ts),
            "line {}: ts {} is not ms since the epoch",
            r.line,
            r.ts
        );
        ensure!(!r.metrics.is_empty(), "line {}: no metric values", r.line);
        for (name, v) in &r.metrics {
            check_metric(name).with_context(|| format!("line {}", r.line))?;
            ensure!(
                v.is_finite(),
                "line {}: {name} is not a finite number",
                r.line
            );
            if !metrics.contains(name) {
                metrics.push(name.clone());
            }
        }
    }
    metrics.sort();
    ensure!(
        metrics.len() <= 100,
        "the file has {} metrics; payload v1 allows 100",
        metrics.len()
    );
    // The first row in the file starts the clock; rows recorded before it
    // are due at once, and are late when their windows have passed.
    let first_ts = rows.first().map_or(0, |r| r.ts);
    let last_ts = rows.iter().map(|r| r.ts).max().unwrap_or(0);
    let mut fleets: BTreeMap<String, (ReplayFleet, BTreeMap<String, usize>)> = BTreeMap::new();
    for r in rows {
        let fleet = r.fleet.unwrap_or_else(|| default_fleet.to_string());
        let (f, index) = fleets.entry(fleet).or_default();
        let i = *index.entry(r.device.clone()).or_insert_with(|| {
            f.devices.push(ReplayDevice {
                id: r.device.clone(),
                rows: Vec::new(),
            });
            f.devices.len() - 1
        });
        let d = &mut f.devices[i];
        let paced = match speed {
            Speed::Max => 0,
            Speed::Factor(x) => ((r.ts - first_ts).max(0) as f64 * 1000.0 / x).round() as u64,
        };
        let due_us = d.rows.last().map_or(paced, |prev| prev.due_us.max(paced));
        let mut values = vec![None; metrics.len()];
        for (name, v) in r.metrics {
            if let Ok(j) = metrics.binary_search(&name) {
                values[j] = Some(v);
            }
        }
        d.rows.push(Row {
            due_us,
            ts: r.ts,
            values,
        });
    }
    Ok(Recording {
        metrics,
        first_ts,
        last_ts,
        fleets: fleets.into_iter().map(|(k, (f, _))| (k, f)).collect(),
        digest,
    })
}

/// The largest `ts` payload v1 takes (year 9999).
const MAX_TS: i64 = 253_402_300_799_999;

fn check_metric(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    ensure!(ok, "metric name `{name}` must be 1..=64 of [A-Za-z0-9_.-]");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn csv_and_jsonl_read_the_same() {
        let (_d1, csv) = write(
            "r.csv",
            "device,ts,temp,hum\nb,1000,2,40\na,2000,1.5,\na,1500,3,41\n",
        );
        let (_d2, jsonl) = write(
            "r.jsonl",
            "{\"device\":\"b\",\"ts\":1000,\"metrics\":{\"temp\":2,\"hum\":40}}\n\
             {\"device\":\"a\",\"ts\":2000,\"metrics\":{\"temp\":1.5}}\n\
             {\"device\":\"a\",\"ts\":1500,\"metrics\":{\"temp\":3,\"hum\":41}}\n",
        );
        let a = load(&csv, "f", Speed::Factor(1.0)).unwrap();
        let b = load(&jsonl, "f", Speed::Factor(1.0)).unwrap();
        assert_eq!(a.fleets, b.fleets);
        assert_eq!(a.metrics, ["hum", "temp"]);
        assert_eq!(a.first_ts, 1000);
        let f = &a.fleets["f"];
        assert_eq!(
            (f.devices[0].id.as_str(), f.devices[1].id.as_str()),
            ("b", "a")
        );
        assert_eq!(f.devices[0].rows[0].due_us, 0);
        let due: Vec<u64> = f.devices[1].rows.iter().map(|r| r.due_us).collect();
        // a's second row is older than its first: it goes right after it.
        assert_eq!(due, [1_000_000, 1_000_000]);
        assert_eq!(f.devices[1].rows[0].values, [None, Some(1.5)]);
        let fast = load(&csv, "f", Speed::Factor(4.0)).unwrap();
        assert_eq!(fast.fleets["f"].devices[1].rows[0].due_us, 250_000);
    }

    #[test]
    fn a_bad_row_names_its_line() {
        for (name, text, want) in [
            ("a.csv", "device,ts,temp\na,1,2\nb,x,3\n", "line 3"),
            ("b.csv", "device,ts,temp\na,1,2\n\nb,2,NaN\n", "line 4"),
            ("c.csv", "device,ts,temp\na,1\n", "line 2"),
            ("d.csv", "device,temp\na,1\n", "line 1"),
            (
                "e.jsonl",
                "{\"device\":\"a\",\"ts\":1,\"metrics\":{\"t\":1}}\n{\"device\":\"a b\",\"ts\":1,\"metrics\":{\"t\":1}}\n",
                "line 2",
            ),
            (
                "f.jsonl",
                "{\"device\":\"a\",\"ts\":1,\"metrics\":{}}\n",
                "line 1",
            ),
        ] {
            let (_d, path) = write(name, text);
            let err = format!("{:#}", load(&path, "f", Speed::Max).unwrap_err());
            assert!(err.contains(want), "{name}: {err}");
            assert!(err.contains(name), "{name}: {err}");
        }
    }

    #[test]
    fn speeds_parse() {
        assert_eq!("max".parse(), Ok(Speed::Max));
        assert_eq!("10".parse(), Ok(Speed::Factor(10.0)));
        assert_eq!("0.5x".parse(), Ok(Speed::Factor(0.5)));
        assert!("0".parse::<Speed>().is_err());
        assert!("fast".parse::<Speed>().is_err());
    }
}
