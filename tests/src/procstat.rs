//! What a process holds, read from `/proc/<pid>`: resident memory, open
//! file descriptors and threads, for the soak bench's leak checks; and
//! the slope of a series of such readings.

use std::time::Duration;

/// One reading of one process.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProcStat {
    /// `VmRSS`, KiB.
    pub rss_kib: u64,
    pub fds: u64,
    pub threads: u64,
}

// === impl ProcStat ===

impl ProcStat {
    /// Reads process `pid`; an error once it has exited.
    pub fn read(pid: u32) -> std::io::Result<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
        Ok(ProcStat {
            rss_kib: field("VmRSS:"),
            fds,
            threads: field("Threads:"),
        })
    }
}

/// The least-squares slope of `points` (time since start, value), per
/// hour; 0 with fewer than two distinct times.
pub fn slope_per_hour(points: &[(Duration, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let hours = |d: &Duration| d.as_secs_f64() / 3600.0;
    let mean_t = points.iter().map(|(t, _)| hours(t)).sum::<f64>() / n;
    let mean_v = points.iter().map(|(_, v)| v).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for (t, v) in points {
        let dt = hours(t) - mean_t;
        num += dt * (v - mean_v);
        den += dt * dt;
    }
    if den == 0.0 { 0.0 } else { num / den }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_a_line_and_of_a_flat_series() {
        let line: Vec<_> = (0..10)
            .map(|i| (Duration::from_secs(360 * i), 5.0 + 2.0 * i as f64))
            .collect();
        // 2 per 6 minutes: 20 per hour.
        assert!((slope_per_hour(&line) - 20.0).abs() < 1e-9);
        let flat: Vec<_> = (0..10).map(|i| (Duration::from_secs(i), 7.0)).collect();
        assert_eq!(slope_per_hour(&flat), 0.0);
        assert_eq!(slope_per_hour(&flat[..1]), 0.0);
    }

    #[test]
    fn reads_this_process() {
        let s = ProcStat::read(std::process::id()).unwrap();
        assert!(s.rss_kib > 0 && s.fds > 0 && s.threads > 0, "{s:?}");
        assert!(ProcStat::read(u32::MAX).is_err());
    }
}
