//! Host CPU and memory utilisation from `/proc` (Linux), as 0..=1.
//!
//! CPU is the share of non-idle time between two readings of the first
//! (`cpu`) line of `/proc/stat`; memory is `1 - MemAvailable / MemTotal`
//! from `/proc/meminfo`. Elsewhere, or when a file cannot be read, the
//! figure is absent rather than guessed.

/// CPU time counters of one `/proc/stat` reading: (busy, total) jiffies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTimes {
    busy: u64,
    total: u64,
}

/// Reads the aggregate CPU line of `/proc/stat`.
pub fn cpu_times() -> Option<CpuTimes> {
    parse_stat(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// The busy share between two readings; None when no time passed.
pub fn cpu_utilization(before: CpuTimes, after: CpuTimes) -> Option<f64> {
    let total = after.total.checked_sub(before.total)?;
    let busy = after.busy.saturating_sub(before.busy);
    (total > 0).then(|| (busy as f64 / total as f64).clamp(0.0, 1.0))
}

/// Memory in use as a share of the total.
pub fn mem_utilization() -> Option<f64> {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

fn parse_stat(stat: &str) -> Option<CpuTimes> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is
    // already inside user and nice).
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
    Some(CpuTimes {
        busy: total.saturating_sub(idle),
        total,
    })
}

fn parse_meminfo(meminfo: &str) -> Option<f64> {
    let kib = |key: &str| -> Option<f64> {
        let line = meminfo.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    let total = kib("MemTotal:")?;
    let available = kib("MemAvailable:")?;
    (total > 0.0).then(|| (1.0 - available / total).clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_the_busy_share_between_readings() {
        let a = parse_stat("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3 4\n").unwrap();
        let b = parse_stat("cpu  250 0 150 900 100 0 0 0 0 0\n").unwrap();
        // 200 busy of 400.
        assert_eq!(cpu_utilization(a, b), Some(0.5));
        assert_eq!(cpu_utilization(b, b), None, "no time passed");
        assert_eq!(parse_stat("intr 1 2\n"), None);
    }

    #[test]
    fn memory_is_what_is_not_available() {
        let m = "MemTotal:       1000 kB\nMemFree:  100 kB\nMemAvailable:    250 kB\n";
        assert_eq!(parse_meminfo(m), Some(0.75));
        assert_eq!(parse_meminfo("MemTotal: 0 kB\nMemAvailable: 0 kB\n"), None);
    }

    #[test]
    fn this_host_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            let (a, m) = (cpu_times(), mem_utilization());
            assert!(a.is_some() && m.is_some_and(|m| (0.0..=1.0).contains(&m)));
        }
    }
}
