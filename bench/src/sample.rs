//! What the benchmark samples while the simulator runs, and the figures it
//! derives from the samples: a process's CPU (from `/proc/PID/stat`), the
//! bytes it made the kernel write (`/proc/PID/io`), and the pipeline's own
//! count of accepted readings (`/v1/stats`, so the simulator's rate is
//! checked against something independent).
//!
//! Sampling runs on a thread or a task; the arithmetic on the samples is
//! pure and tested without either.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How often a process's CPU is read.
const CPU_EVERY: Duration = Duration::from_millis(250);
/// How often `/v1/stats` is asked.
pub const STATS_EVERY: Duration = Duration::from_millis(400);

/// Clock ticks per second of `/proc/PID/stat`'s times: 100 on every Linux
/// this runs on (`getconf CLK_TCK`), and the kernel's ABI keeps it fixed.
const CLK_TCK: f64 = 100.0;

/// User plus system CPU seconds of a process so far, its threads included.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_seconds(&stat)
}

/// Fields 14 and 15 (utime, stime), counted after the command name, which
/// is in parentheses and may hold spaces.
fn parse_cpu_seconds(stat: &str) -> Option<f64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / CLK_TCK)
}

/// Bytes a process has caused to be written to storage so far.
pub fn disk_written(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|l| l.strip_prefix("write_bytes:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Bytes the block device holding `path` has written so far, from
/// `/sys/dev/block/MAJOR:MINOR/stat` (sectors written, in 512-byte units
/// whatever the device's sector size); `None` for a file system on no block
/// device (tmpfs, overlay).
///
/// A process's `write_bytes` counts a page each time it turns dirty, and on
/// kernels that cache a file in large folios it counts the whole folio: a
/// log rewriting its tail page between syncs was charged tens of kilobytes
/// per sync while the disk received four. The device's count is what
/// reached the disk, file-system journal included, from every process on
/// the machine.
pub fn device_written(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path).ok()?.dev();
    // glibc's gnu_dev_major / gnu_dev_minor.
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let stat = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/stat")).ok()?;
    parse_sectors_written(&stat).map(|sectors| sectors * 512)
}

/// Disk writes counted both ways from one moment on: what `pids` were
/// charged ([`disk_written`]) and what the disk holding `path` wrote
/// ([`device_written`]).
pub struct WrittenSince {
    pids: Vec<u32>,
    path: std::path::PathBuf,
    processes: u64,
    device: Option<u64>,
}

impl WrittenSince {
    pub fn start(pids: &[u32], path: &std::path::Path) -> WrittenSince {
        WrittenSince {
            pids: pids.to_vec(),
            path: path.to_path_buf(),
            processes: pids.iter().map(|p| disk_written(*p)).sum(),
            device: device_written(path),
        }
    }

    /// Bytes since `start`: the processes', and the device's if it has one.
    pub fn now(&self) -> (u64, Option<u64>) {
        let processes = self.pids.iter().map(|p| disk_written(*p)).sum::<u64>();
        let device = self
            .device
            .zip(device_written(&self.path))
            .map(|(before, after)| after.saturating_sub(before));
        (processes.saturating_sub(self.processes), device)
    }
}

/// The seventh field of a block device's `stat`: sectors written.
fn parse_sectors_written(stat: &str) -> Option<u64> {
    stat.split_whitespace().nth(6)?.parse().ok()
}

/// One process's CPU seconds over time: (seconds since the series began,
/// CPU seconds so far).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct CpuSeries(pub Vec<(f64, f64)>);

impl CpuSeries {
    /// The CPU used between `t0` and `t1` (seconds since the series began),
    /// interpolated between samples; `None` without samples.
    pub fn between(&self, t0: f64, t1: f64) -> Option<f64> {
        Some(self.at(t1)? - self.at(t0)?)
    }

    fn at(&self, t: f64) -> Option<f64> {
        let samples = &self.0;
        let after = samples.iter().position(|&(ts, _)| ts >= t);
        match after {
            None => samples.last().map(|&(_, c)| c),
            Some(0) => Some(samples[0].1),
            Some(i) => {
                let (pt, pc) = samples[i - 1];
                let (ts, c) = samples[i];
                Some(if ts > pt {
                    pc + (c - pc) * (t - pt) / (ts - pt)
                } else {
                    c
                })
            }
        }
    }
}

/// Samples processes' CPU on a thread of its own, so that the CPU spent in
/// the simulator's publishing window (not while devices connect, nor while
/// verify reads the API) can be cut out afterwards.
pub struct CpuSampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<CpuSeries>>>,
}

impl CpuSampler {
    pub fn start(pids: Vec<u32>) -> CpuSampler {
        let started = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let done = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut series = vec![CpuSeries::default(); pids.len()];
            while !done.load(Ordering::Relaxed) {
                let t = started.elapsed().as_secs_f64();
                for (pid, s) in pids.iter().zip(series.iter_mut()) {
                    if let Some(c) = cpu_seconds(*pid) {
                        s.0.push((t, c));
                    }
                }
                std::thread::sleep(CPU_EVERY);
            }
            series
        });
        CpuSampler {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling; one series per pid, in the order given.
    pub fn finish(mut self) -> Vec<CpuSeries> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

/// The pipeline's readings/s from `/v1/stats` samples (seconds, accepted
/// readings so far): between the first sample that shows an increase and
/// the first that shows the final count, so that a sampling interval at
/// either end of the run does not dilute the rate.
pub fn pipeline_rate(samples: &[(f64, u64)]) -> Option<f64> {
    let (&(_, start), &(_, last)) = (samples.first()?, samples.last()?);
    let first_rise = samples.iter().position(|&(_, n)| n > start)?;
    let (t0, n0) = samples[first_rise];
    let (t1, n1) = samples[first_rise..]
        .iter()
        .copied()
        .find(|&(_, n)| n == last)?;
    (t1 > t0).then(|| (n1 - n0) as f64 / (t1 - t0))
}

/// Whether the store has flushed everything committed before `at_end`
/// was read, given `now`: two readings of the flushes the pipeline has
/// completed (`iotpipe_store_flush_seconds_count`). Its flusher runs one
/// flush at a time and a flush writes everything committed before it
/// started, so once the count has risen by two, the second of those
/// flushes started after `at_end` and covered it. A count that went down
/// belongs to another process.
pub fn flushed_after(at_end: f64, now: f64) -> bool {
    now - at_end >= 2.0
}

/// The sum of every sample of `name`, over all its label sets, in a
/// Prometheus text page.
pub fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Samples `/v1/stats`' accepted readings on a task of its own, with the
/// time each answer came: the pipeline's own account of a step's rate.
pub struct StatsSampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Vec<(f64, u64)>>,
}

impl StatsSampler {
    pub fn start(http: reqwest::Client, url: String) -> StatsSampler {
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let mut samples = vec![];
            let mut every = tokio::time::interval(STATS_EVERY);
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = every.tick() => {}
                }
                if let Some(n) = accepted_readings(&http, &url).await {
                    samples.push((started.elapsed().as_secs_f64(), n));
                }
            }
            samples
        });
        StatsSampler { stop, task }
    }

    pub async fn finish(self) -> Vec<(f64, u64)> {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}

async fn accepted_readings(http: &reqwest::Client, url: &str) -> Option<u64> {
    let resp = http
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    let stats: serde_json::Value = resp.json().await.ok()?;
    stats["accepted_readings"].as_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_seconds_are_read_past_a_command_name_with_spaces_and_parentheses() {
        let stat = "42 (tokio (worker) 1) S 1 2 3 4 5 6 7 8 9 10 250 150 0 0 20";
        assert_eq!(parse_cpu_seconds(stat), Some(4.0));
        assert_eq!(parse_cpu_seconds("42 (x) S 1 2"), None);
    }

    #[test]
    fn sectors_written_are_the_seventh_field_of_a_block_device_stat() {
        let stat = "  193877   5170 13524110   95112 5236338 2263419 564665656  4433297 0 0 0";
        assert_eq!(parse_sectors_written(stat), Some(564_665_656));
        assert_eq!(parse_sectors_written("1 2 3"), None);
        assert_eq!(parse_sectors_written("1 2 3 4 5 6 x"), None);
    }

    #[test]
    fn cpu_between_two_times_is_interpolated_between_samples() {
        let s = CpuSeries(vec![(0.0, 1.0), (1.0, 2.0), (2.0, 4.0)]);
        assert_eq!(s.between(0.5, 1.5), Some(1.5));
        // Before the first sample and after the last, the nearest sample.
        assert_eq!(s.between(-1.0, 3.0), Some(3.0));
        assert_eq!(CpuSeries::default().between(0.0, 1.0), None);
    }

    #[test]
    fn the_pipeline_rate_runs_from_the_first_rise_to_the_final_count() {
        // Idle before and after: 100 readings between t = 1 and t = 3.
        let samples = [(0.0, 10), (1.0, 20), (2.0, 70), (3.0, 120), (4.0, 120)];
        assert_eq!(pipeline_rate(&samples), Some(50.0));
        assert_eq!(pipeline_rate(&[(0.0, 5), (1.0, 5)]), None);
        assert_eq!(pipeline_rate(&[(0.0, 5)]), None);
        // One rising sample: no interval to divide by.
        assert_eq!(pipeline_rate(&[(0.0, 5), (1.0, 9)]), None);
    }

    #[test]
    fn the_store_has_flushed_only_once_a_flush_began_and_ended_after_the_step() {
        for (at_end, now, done) in [
            (0.0, 0.0, false),
            // A flush that was running when the step ended may have started
            // before its last commit.
            (0.0, 1.0, false),
            (0.0, 2.0, true),
            (5.0, 9.0, true),
            // Absent (0) or restarted: never taken for done.
            (3.0, 0.0, false),
        ] {
            assert_eq!(flushed_after(at_end, now), done, "{at_end} -> {now}");
        }
    }

    #[test]
    fn a_metric_is_summed_over_its_label_sets_and_not_confused_with_a_longer_name() {
        let page = "# TYPE a counter\na{shard=\"0\"} 2\na{shard=\"1\"} 3\na_total 100\na 1.5\n";
        assert_eq!(metric(page, "a"), 6.5);
        assert_eq!(metric(page, "a_total"), 100.0);
        assert_eq!(metric(page, "b"), 0.0);
    }
}
