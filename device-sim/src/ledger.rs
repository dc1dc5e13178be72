//! The ledger: an append-only JSON-lines file recording every run, so that a
//! later run continues each device's `seq` and verifies the union of all runs.
//!
//! Each run writes two lines: `{"event":"start",...}` before its first publish
//! (the plan with its `run_start_ms`, and each device's first seq and message
//! count) and `{"event":"finish",...}` after its last PUBACK (the lateness
//! exceptions the publisher observed; see [`crate::lateness`]). A run with a
//! start and no finish was interrupted: what it published is unknown, so its
//! devices' seqs continue after its whole planned range, and verify refuses
//! to judge a fleet that holds such a run.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::lateness::Exceptions;
use crate::plan::RunPlan;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum LedgerLine {
    Start(Box<RunStart>),
    Finish(RunFinish),
}

/// A run's plan and the seqs it uses, written before it publishes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunStart {
    /// 1 for the first run in the file, then counting up.
    pub run: u64,
    pub plan: RunPlan,
    /// Per device index: the seq of its first reading in this run.
    pub first_seq: Vec<u64>,
    /// Per device index: how many telemetry messages it sends.
    pub messages: Vec<u64>,
}

/// What a run observed, written after its last PUBACK.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunFinish {
    pub run: u64,
    pub exceptions: Exceptions,
    /// Sends that were never acknowledged.
    pub failed: u64,
}

/// One run as verify needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub start: RunStart,
    /// `None` until the finish line is read: the run was interrupted.
    pub exceptions: Option<Exceptions>,
}

impl Run {
    /// One past the last seq device `index` uses in this run.
    pub fn end_seq(&self, index: usize) -> u64 {
        let first = self.start.first_seq.get(index).copied().unwrap_or(0);
        let n = self.start.messages.get(index).copied().unwrap_or(0);
        first + n * u64::from(self.start.plan.readings_per_message.max(1))
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ledger {
    pub runs: Vec<Run>,
}

impl Ledger {
    /// Reads `path`; a missing file is an empty ledger.
    pub fn load(path: &Path) -> anyhow::Result<Ledger> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Ledger::default()),
            Err(e) => return Err(e).with_context(|| format!("opening ledger {}", path.display())),
        };
        let mut ledger = Ledger::default();
        for (n, line) in BufReader::new(file).lines().enumerate() {
            let line = line.with_context(|| format!("reading ledger {}", path.display()))?;
            if line.trim().is_empty() {
                continue;
            }
            let parsed: LedgerLine = serde_json::from_str(&line)
                .with_context(|| format!("ledger {} line {}", path.display(), n + 1))?;
            ledger.apply(parsed)?;
        }
        ledger.read_replays()?;
        Ok(ledger)
    }

    /// Reads again the files that replayed runs published, so that verify
    /// can regenerate their readings; a file changed since is refused.
    fn read_replays(&mut self) -> anyhow::Result<()> {
        for run in &mut self.runs {
            let n = run.start.run;
            let plan = &mut run.start.plan;
            let Some(r) = plan.replay.as_mut() else {
                continue;
            };
            if r.data.is_some() {
                continue;
            }
            let rec = crate::replay::load(&r.file, &r.default_fleet, r.speed)
                .with_context(|| format!("ledger run {n} replayed {}", r.file.display()))?;
            if rec.digest != r.digest {
                bail!(
                    "ledger run {n} replayed {}, which has changed since (digest {}, now {}): its readings cannot be regenerated",
                    r.file.display(),
                    r.digest,
                    rec.digest
                );
            }
            r.data = rec
                .fleets
                .get(&plan.fleet)
                .cloned()
                .map(std::sync::Arc::new);
        }
        Ok(())
    }

    pub fn apply(&mut self, line: LedgerLine) -> anyhow::Result<()> {
        match line {
            LedgerLine::Start(start) => self.runs.push(Run {
                start: *start,
                exceptions: None,
            }),
            LedgerLine::Finish(finish) => {
                let Some(run) = self.runs.iter_mut().find(|r| r.start.run == finish.run) else {
                    bail!("ledger: finish of run {} without its start", finish.run);
                };
                run.exceptions = Some(finish.exceptions);
            }
        }
        Ok(())
    }

    pub fn next_run_id(&self) -> u64 {
        self.runs.iter().map(|r| r.start.run).max().unwrap_or(0) + 1
    }

    /// Each device's next unused seq, by (fleet, device id).
    pub fn next_seqs(&self) -> HashMap<(String, String), u64> {
        let mut next: HashMap<(String, String), u64> = HashMap::new();
        for run in &self.runs {
            let plan = &run.start.plan;
            for index in 0..plan.devices {
                let key = (plan.fleet.clone(), plan.device_id(index));
                let end = run.end_seq(index as usize);
                let e = next.entry(key).or_default();
                *e = (*e).max(end);
            }
        }
        next
    }

    /// The runs of `fleet`, and per device id (sorted) the runs and device
    /// index that published as it.
    pub fn devices_of(&self, fleet: &str) -> BTreeMap<String, Vec<(usize, u32)>> {
        let mut devices: BTreeMap<String, Vec<(usize, u32)>> = BTreeMap::new();
        for (r, run) in self.runs.iter().enumerate() {
            let plan = &run.start.plan;
            if plan.fleet != fleet {
                continue;
            }
            for index in 0..plan.devices {
                devices
                    .entry(plan.device_id(index))
                    .or_default()
                    .push((r, index));
            }
        }
        devices
    }

    /// Appends one line and syncs it, so that a crash right after cannot
    /// lose a run that has started publishing.
    pub fn append(path: &Path, line: &LedgerLine) -> anyhow::Result<()> {
        let mut text = serde_json::to_string(line)?;
        text.push('\n');
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening ledger {}", path.display()))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_data())
            .with_context(|| format!("writing ledger {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::tests::plan;

    fn start(run: u64, devices: u32, first: u64, messages: u64) -> RunStart {
        let mut p = plan();
        p.devices = devices;
        RunStart {
            run,
            plan: p,
            first_seq: vec![first; devices as usize],
            messages: vec![messages; devices as usize],
        }
    }

    #[test]
    fn round_trips_and_continues_seqs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        assert!(Ledger::load(&path).unwrap().runs.is_empty());
        Ledger::append(&path, &LedgerLine::Start(Box::new(start(1, 2, 0, 10)))).unwrap();
        let mut ex = Exceptions::default();
        ex.windows.insert((1, 60_000, 0), (0, 1));
        Ledger::append(
            &path,
            &LedgerLine::Finish(RunFinish {
                run: 1,
                exceptions: ex.clone(),
                failed: 0,
            }),
        )
        .unwrap();
        Ledger::append(&path, &LedgerLine::Start(Box::new(start(2, 3, 10, 5)))).unwrap();
        let l = Ledger::load(&path).unwrap();
        assert_eq!(l.runs.len(), 2);
        assert_eq!(l.runs[0].exceptions.as_ref(), Some(&ex));
        assert_eq!(l.runs[1].exceptions, None, "run 2 never finished");
        assert_eq!(l.next_run_id(), 3);
        let next = l.next_seqs();
        assert_eq!(next[&("f".to_string(), "f-d00000".to_string())], 15);
        assert_eq!(next[&("f".to_string(), "f-d00002".to_string())], 15);
        let devices = l.devices_of("f");
        assert_eq!(devices["f-d00001"], vec![(0, 1), (1, 1)]);
        assert_eq!(devices["f-d00002"], vec![(1, 2)]);
        assert!(l.devices_of("other").is_empty());
    }

    #[test]
    fn a_corrupt_line_names_itself() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        std::fs::write(&path, "{\"event\":\"start\"}\n").unwrap();
        let err = Ledger::load(&path).unwrap_err();
        assert!(format!("{err:#}").contains("line 1"), "{err:#}");
    }
}
