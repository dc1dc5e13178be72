//! The simulator's own footprint: the open-files limit it needs, and the
//! memory and CPU it used (Linux `/proc`; zeros elsewhere).

use anyhow::bail;
use serde::Serialize;

/// File descriptors beyond one per device: the runtime, the ledger, the
/// API clients of verify and the freshness probe.
pub const SPARE_FILES: u64 = 256;

/// Raises the soft open-files limit as far as the hard limit allows and
/// checks that `needed` fit. Returns the limit in force.
pub fn ensure_open_files(needed: u64) -> anyhow::Result<u64> {
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    if limit != 0 && limit < needed {
        bail!(
            "this run needs about {needed} open files (one per device plus {SPARE_FILES}), but this process may open at most {limit}: \
             the hard limit (`ulimit -Hn`) is below that, and raising it needs privileges this process lacks \
             (CAP_SYS_RESOURCE, or a higher limit from the shell or service manager that starts it). \
             Run fewer devices per process, e.g. several device-sim processes with their own --fleet or --device-prefix"
        );
    }
    Ok(limit)
}

/// What the simulator process used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Usage {
    /// Peak resident memory (VmHWM), MiB.
    pub peak_rss_mib: f64,
    /// Resident memory now (VmRSS), MiB.
    pub rss_mib: f64,
    /// User plus system CPU time, seconds.
    pub cpu_seconds: f64,
    /// The open-files limit in force.
    pub open_files_limit: u64,
}

impl Usage {
    /// Adds another process's use: a spread run's figures are its
    /// processes' together (the peak as the sum of each one's peak).
    pub fn add(&mut self, other: &Usage) {
        self.peak_rss_mib += other.peak_rss_mib;
        self.rss_mib += other.rss_mib;
        self.cpu_seconds += other.cpu_seconds;
        self.open_files_limit = self.open_files_limit.max(other.open_files_limit);
    }

    pub fn now(open_files_limit: u64) -> Usage {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let kib = |key: &str| -> f64 {
            status
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        Usage {
            peak_rss_mib: kib("VmHWM:") / 1024.0,
            rss_mib: kib("VmRSS:") / 1024.0,
            cpu_seconds: cpu_seconds(),
            open_files_limit,
        }
    }
}

/// utime + stime from `/proc/self/stat`, in seconds (USER_HZ is 100 on
/// Linux).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The command name may hold spaces; fields resume after its ')'.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3, utime 14 and stime 15 (1-based in proc(5)).
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (tick(11) + tick(12)) / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_usage() {
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        let u = Usage::now(1);
        assert!(x != 1);
        if std::path::Path::new("/proc/self/status").exists() {
            assert!(u.peak_rss_mib > 0.0 && u.peak_rss_mib >= u.rss_mib, "{u:?}");
            assert!(u.cpu_seconds >= 0.0);
        }
        let limit = ensure_open_files(16).unwrap();
        if limit > 0 && limit < u64::MAX / 2 {
            let err = ensure_open_files(limit + 1).unwrap_err().to_string();
            assert!(err.contains("open files"), "{err}");
        }
    }
}
