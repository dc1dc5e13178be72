//! What the processors count, for `/metrics`. Counters here are per process;
//! the exact, persisted counts live in the store (see `keys::counters`).

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use schemas::RejectReason;

use rollup::aggregate::BatchStats;

/// A latency histogram with fixed buckets, cheap enough for every batch.
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds in seconds.
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|b| secs <= *b) {
            self.counts[i].fetch_add(1, Relaxed);
        }
        self.sum_micros.fetch_add(d.as_micros() as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    /// How many durations were observed.
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// The observed durations added up, to the microsecond.
    pub fn sum(&self) -> std::time::Duration {
        std::time::Duration::from_micros(self.sum_micros.load(Relaxed))
    }

    /// Writes the histogram in Prometheus text format.
    pub fn render(&self, name: &str, help: &str, labels: &str, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count.load(Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        let total = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {total}");
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(
            out,
            "{name}_sum{braces} {}",
            self.sum_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{braces} {total}");
    }
}

/// Per-shard lag, the IteratorAge equivalent.
#[derive(Debug, Default)]
pub struct ShardLag {
    pub records_behind: AtomicU64,
    /// Arrival time of the oldest record not yet processed; 0 when caught up.
    pub oldest_unprocessed_ms: AtomicI64,
}

#[derive(Debug)]
pub struct ProcessorMetrics {
    pub batches: AtomicU64,
    pub records: AtomicU64,
    pub readings_accepted: AtomicU64,
    pub readings_duplicate: AtomicU64,
    pub readings_late: AtomicU64,
    pub readings_replayed: AtomicU64,
    pub rejected: Vec<AtomicU64>,
    pub batch_retries: AtomicU64,
    /// Shard reads and checkpoints retried after a passing error.
    pub read_retries: AtomicU64,
    pub store_writes: AtomicU64,
    /// Items the write-behind cache wrote to the durable store: what
    /// pre-aggregation and coalescing leave of `store_writes`.
    pub store_flushed: AtomicU64,
    pub batch_seconds: Histogram,
    pub store_write_seconds: Histogram,
    /// Time to flush the write-behind store (and so make batches durable).
    pub flush_seconds: Histogram,
    /// Time from a record's arrival in the stream to its effect in the store.
    pub freshness_seconds: Histogram,
    pub lag: Mutex<Vec<(String, std::sync::Arc<ShardLag>)>>,
}

impl Default for ProcessorMetrics {
    fn default() -> Self {
        ProcessorMetrics {
            batches: AtomicU64::new(0),
            records: AtomicU64::new(0),
            readings_accepted: AtomicU64::new(0),
            readings_duplicate: AtomicU64::new(0),
            readings_late: AtomicU64::new(0),
            readings_replayed: AtomicU64::new(0),
            rejected: RejectReason::ALL
                .iter()
                .map(|_| AtomicU64::new(0))
                .collect(),
            batch_retries: AtomicU64::new(0),
            read_retries: AtomicU64::new(0),
            store_writes: AtomicU64::new(0),
            store_flushed: AtomicU64::new(0),
            batch_seconds: Histogram::new(LATENCY_BUCKETS),
            store_write_seconds: Histogram::new(LATENCY_BUCKETS),
            flush_seconds: Histogram::new(LATENCY_BUCKETS),
            freshness_seconds: Histogram::new(LATENCY_BUCKETS),
            lag: Mutex::new(Vec::new()),
        }
    }
}

impl ProcessorMetrics {
    pub fn record_batch(&self, stats: &BatchStats, writes: usize) {
        self.batches.fetch_add(1, Relaxed);
        self.records.fetch_add(stats.records, Relaxed);
        self.readings_accepted
            .fetch_add(stats.accepted_readings, Relaxed);
        self.readings_duplicate
            .fetch_add(stats.duplicate_readings, Relaxed);
        self.readings_late.fetch_add(stats.late_readings, Relaxed);
        self.readings_replayed
            .fetch_add(stats.replayed_readings, Relaxed);
        self.store_writes.fetch_add(writes as u64, Relaxed);
        for (reason, n) in &stats.rejected {
            self.rejected[reason.index()].fetch_add(*n, Relaxed);
        }
    }

    /// Items written to the durable store per accepted reading: the
    /// write-behind cache's flushed items where one runs, else what batches
    /// committed (stores that write through flush nothing).
    pub fn items_per_reading(&self) -> f64 {
        let flushed = self.store_flushed.load(Relaxed);
        let written = if flushed > 0 {
            flushed
        } else {
            self.store_writes.load(Relaxed)
        };
        written as f64 / self.readings_accepted.load(Relaxed).max(1) as f64
    }

    /// The lag gauges of `shard`, created on first use.
    pub fn shard_lag(&self, shard: &str) -> std::sync::Arc<ShardLag> {
        let mut lags = self.lag.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, lag)) = lags.iter().find(|(s, _)| s == shard) {
            return lag.clone();
        }
        let lag = std::sync::Arc::new(ShardLag::default());
        lags.push((shard.to_string(), lag.clone()));
        lag
    }

    /// Writes every metric in Prometheus text format; `now_ms` turns the
    /// oldest unprocessed arrival into an age.
    pub fn render(&self, now_ms: i64, out: &mut String) {
        self.render_counters(out);
        self.render_histograms(out);
        self.render_lag(now_ms, out);
    }

    /// The counters, the items-per-reading gauge and the refusals by reason.
    fn render_counters(&self, out: &mut String) {
        use std::fmt::Write;
        let counters = [
            (
                "iotpipe_processor_batches_total",
                "Batches processed.",
                &self.batches,
            ),
            (
                "iotpipe_processor_records_total",
                "Stream records processed.",
                &self.records,
            ),
            (
                "iotpipe_processor_readings_accepted_total",
                "Readings folded into rollups.",
                &self.readings_accepted,
            ),
            (
                "iotpipe_processor_readings_duplicate_total",
                "Readings delivered again and absorbed.",
                &self.readings_duplicate,
            ),
            (
                "iotpipe_processor_readings_late_total",
                "Accepted readings that arrived after a window's end.",
                &self.readings_late,
            ),
            (
                "iotpipe_processor_readings_replayed_total",
                "Readings skipped because a retried batch had already applied them.",
                &self.readings_replayed,
            ),
            (
                "iotpipe_processor_batch_retries_total",
                "Batch attempts retried after a store error.",
                &self.batch_retries,
            ),
            (
                "iotpipe_store_writes_total",
                "Items written to the rollup store by batch commits.",
                &self.store_writes,
            ),
            (
                "iotpipe_store_flushed_items_total",
                "Items the write-behind cache wrote to the durable store.",
                &self.store_flushed,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Relaxed)
            );
        }
        let name = "iotpipe_store_items_per_reading";
        let _ = writeln!(
            out,
            "# HELP {name} Items written to the durable rollup store per accepted reading, since start: what a reading costs the store.\n# TYPE {name} gauge\n{name} {}",
            self.items_per_reading()
        );
        let name = "iotpipe_processor_rejected_total";
        let _ = writeln!(
            out,
            "# HELP {name} Readings and messages refused by the processors, by reason.\n# TYPE {name} counter"
        );
        for reason in RejectReason::ALL {
            let _ = writeln!(
                out,
                "{name}{{reason=\"{reason}\"}} {}",
                self.rejected[reason.index()].load(Relaxed)
            );
        }
    }

    fn render_histograms(&self, out: &mut String) {
        self.batch_seconds.render(
            "iotpipe_processor_batch_seconds",
            "Time to process one batch, load to commit.",
            "",
            out,
        );
        self.store_write_seconds.render(
            "iotpipe_store_write_seconds",
            "Time to commit one batch's writes.",
            "",
            out,
        );
        self.flush_seconds.render(
            "iotpipe_store_flush_seconds",
            "Time to make applied batches durable in the store.",
            "",
            out,
        );
        self.freshness_seconds.render(
            "iotpipe_processor_freshness_seconds",
            "Time from a record's arrival in the stream to its effect in the store.",
            "",
            out,
        );
    }

    /// The per-shard lag gauges.
    fn render_lag(&self, now_ms: i64, out: &mut String) {
        use std::fmt::Write;
        let lags = self.lag.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(
            out,
            "# HELP iotpipe_stream_records_behind Records in the shard not yet processed.\n# TYPE iotpipe_stream_records_behind gauge"
        );
        for (shard, lag) in lags.iter() {
            let _ = writeln!(
                out,
                "iotpipe_stream_records_behind{{shard=\"{shard}\"}} {}",
                lag.records_behind.load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP iotpipe_stream_iterator_age_seconds Age of the oldest unprocessed record in the shard.\n# TYPE iotpipe_stream_iterator_age_seconds gauge"
        );
        for (shard, lag) in lags.iter() {
            let oldest = lag.oldest_unprocessed_ms.load(Relaxed);
            let age = if oldest == 0 {
                0.0
            } else {
                (now_ms - oldest).max(0) as f64 / 1000.0
            };
            let _ = writeln!(
                out,
                "iotpipe_stream_iterator_age_seconds{{shard=\"{shard}\"}} {age}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_per_reading_counts_what_reached_the_durable_store() {
        let m = ProcessorMetrics::default();
        m.readings_accepted.store(4, Relaxed);
        m.store_writes.store(40, Relaxed);
        assert_eq!(m.items_per_reading(), 10.0, "a store that writes through");
        m.store_flushed.store(6, Relaxed);
        assert_eq!(m.items_per_reading(), 1.5, "behind a write-behind cache");
        let mut out = String::new();
        m.render(0, &mut out);
        assert!(
            out.contains("\niotpipe_store_items_per_reading 1.5\n"),
            "{out}"
        );
    }
}
