//! Medians of the repeated runs, printed as Markdown tables (so a run can go
//! into BENCHMARKS.md as it is), then each target of the issue with its
//! verdict. Targets are reported, not asserted: a miss is a finding, and
//! the numbers are worth having either way.

use std::time::Duration;

use crate::load::{Latency, Peak, RATE};

/// Everything one shape measured, across the repetitions.
pub struct ShapeRuns {
    pub name: &'static str,
    /// The proxy processes, in the shape's order (A, then B).
    pub proxies: Vec<String>,
    pub latency: Vec<Latency>,
    pub peak: Vec<Peak>,
    /// `[proxy][run]`: CPU seconds during each fixed-rate run.
    pub cpu_rate: Vec<Vec<f64>>,
    /// `[proxy][run]`: CPU seconds during each peak run.
    pub cpu_peak: Vec<Vec<f64>>,
    /// `[proxy]`: peak RSS (KiB) after the fixed-rate runs.
    pub rss_rate: Vec<u64>,
    /// `[proxy]`: peak RSS (KiB) after the peak runs too.
    pub rss_peak: Vec<u64>,
}

/// Medians of one shape: what the tables and verdicts use.
struct Summary {
    p50: f64,
    p99: f64,
    peak_rps: f64,
    peak_p50: f64,
    peak_p99: f64,
    /// Per proxy: (name, CPU s per run, CPU µs per request) at the fixed rate.
    cpu_rate: Vec<(String, f64, f64)>,
    /// The same at peak.
    cpu_peak: Vec<(String, f64, f64)>,
}

// === impl ShapeRuns ===

impl ShapeRuns {
    pub fn new(name: &'static str, proxies: Vec<String>) -> Self {
        let n = proxies.len();
        Self {
            name,
            proxies,
            latency: Vec::new(),
            peak: Vec::new(),
            cpu_rate: vec![Vec::new(); n],
            cpu_peak: vec![Vec::new(); n],
            rss_rate: vec![0; n],
            rss_peak: vec![0; n],
        }
    }

    fn summary(&self) -> Summary {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let rate_requests = median(self.latency.iter().map(|l| l.requests));
        let peak_requests = median(self.peak.iter().map(|p| p.requests));
        let per_proxy = |cpu: &[Vec<f64>], requests: f64| {
            self.proxies
                .iter()
                .zip(cpu)
                .map(|(name, runs)| {
                    let s = median(runs.iter().copied());
                    (name.clone(), s, s / requests * 1e6)
                })
                .collect()
        };
        Summary {
            p50: median(self.latency.iter().map(|l| us(l.p50))),
            p99: median(self.latency.iter().map(|l| us(l.p99))),
            peak_rps: median(self.peak.iter().map(|p| p.rps)),
            peak_p50: median(self.peak.iter().map(|p| us(p.p50))),
            peak_p99: median(self.peak.iter().map(|p| us(p.p99))),
            cpu_rate: per_proxy(&self.cpu_rate, rate_requests),
            cpu_peak: per_proxy(&self.cpu_peak, peak_requests),
        }
    }
}

/// The median; the mean of the middle two for an even count.
fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Prints the tables and verdicts. `runs` is direct, ISDP, HAProxy in
/// that order.
pub fn print(runs: &[ShapeRuns; 3]) {
    let [direct, isdp, haproxy] = runs.each_ref().map(ShapeRuns::summary);
    println!("\n### Latency at {RATE} req/s and peak throughput (medians)\n");
    println!(
        "| shape | p50 µs | p99 µs | added p50 µs | added p99 µs | peak req/s | p50 µs at peak | p99 µs at peak |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (run, s) in runs.iter().zip([&direct, &isdp, &haproxy]) {
        let added = |v: f64, base: f64| {
            if run.name == "direct" {
                "–".to_owned()
            } else {
                format!("{:.0}", v - base)
            }
        };
        println!(
            "| {} | {:.0} | {:.0} | {} | {} | {:.0} | {:.0} | {:.0} |",
            run.name,
            s.p50,
            s.p99,
            added(s.p50, direct.p50),
            added(s.p99, direct.p99),
            s.peak_rps,
            s.peak_p50,
            s.peak_p99
        );
    }

    println!("\n### Proxy processes (medians; RSS is VmHWM, the peak so far)\n");
    println!(
        "| process | CPU s per run at {RATE} req/s | CPU µs/req at {RATE} req/s | CPU s per peak run | CPU µs/req at peak | peak RSS MiB after {RATE} req/s | peak RSS MiB after peak |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (run, s) in [(&runs[1], &isdp), (&runs[2], &haproxy)] {
        for (i, (name, rate_s, rate_us)) in s.cpu_rate.iter().enumerate() {
            let (_, peak_s, peak_us) = &s.cpu_peak[i];
            println!(
                "| {name} | {rate_s:.2} | {rate_us:.1} | {peak_s:.2} | {peak_us:.1} | {:.1} | {:.1} |",
                mib(run.rss_rate[i]),
                mib(run.rss_peak[i])
            );
        }
    }

    verdicts(&direct, (&isdp, &runs[1]), (&haproxy, &runs[2]));
}

/// The targets, each with its figures and MET / MISSED.
fn verdicts(direct: &Summary, isdp: (&Summary, &ShapeRuns), haproxy: (&Summary, &ShapeRuns)) {
    let ((i, i_runs), (h, h_runs)) = (isdp, haproxy);
    let verdict = |ok: bool| if ok { "MET" } else { "MISSED" };
    let (i50, i99) = (i.p50 - direct.p50, i.p99 - direct.p99);
    let (h50, h99) = (h.p50 - direct.p50, h.p99 - direct.p99);
    let ratio = i.peak_rps / h.peak_rps;
    let cpu_us = |s: &Summary, peak: bool| {
        let v = if peak { &s.cpu_peak } else { &s.cpu_rate };
        v.iter().map(|(_, _, us)| us).sum::<f64>()
    };
    let rss_max = |r: &ShapeRuns| mib(r.rss_rate.iter().copied().max().unwrap_or(0));
    let rss_sum = |r: &ShapeRuns| mib(r.rss_rate.iter().sum());

    println!("\n### Against the targets\n");
    let lines = [
        (
            format!("added p50 at {RATE} req/s <= 120 µs: ISDP {i50:.0} µs"),
            i50 <= 120.0,
        ),
        (
            format!("added p99 at {RATE} req/s <= 250 µs: ISDP {i99:.0} µs"),
            i99 <= 250.0,
        ),
        (
            format!("peak >= 1.3x HAProxy: ISDP/HAProxy = {ratio:.2}x"),
            ratio >= 1.3,
        ),
        (
            format!(
                "RSS <= 15 MiB per sidecar at {RATE} req/s: largest {:.1} MiB",
                rss_max(i_runs)
            ),
            rss_max(i_runs) <= 15.0,
        ),
        (
            format!(
                "ahead of HAProxy, added p50: ISDP {i50:.0} µs vs {h50:.0} µs ({:+.0} µs)",
                i50 - h50
            ),
            i50 < h50,
        ),
        (
            format!(
                "ahead of HAProxy, added p99: ISDP {i99:.0} µs vs {h99:.0} µs ({:+.0} µs)",
                i99 - h99
            ),
            i99 < h99,
        ),
        (
            format!(
                "ahead of HAProxy, peak: ISDP {:.0} vs {:.0} req/s",
                i.peak_rps, h.peak_rps
            ),
            i.peak_rps > h.peak_rps,
        ),
        (
            format!(
                "ahead of HAProxy, CPU per request at {RATE} req/s (both hops): ISDP {:.1} µs vs {:.1} µs",
                cpu_us(i, false),
                cpu_us(h, false)
            ),
            cpu_us(i, false) < cpu_us(h, false),
        ),
        (
            format!(
                "ahead of HAProxy, CPU per request at peak (both hops): ISDP {:.1} µs vs {:.1} µs",
                cpu_us(i, true),
                cpu_us(h, true)
            ),
            cpu_us(i, true) < cpu_us(h, true),
        ),
        (
            format!(
                "ahead of HAProxy, RSS at {RATE} req/s (both hops): ISDP {:.1} MiB vs {:.1} MiB",
                rss_sum(i_runs),
                rss_sum(h_runs)
            ),
            rss_sum(i_runs) < rss_sum(h_runs),
        ),
    ];
    for (text, ok) in lines {
        println!("- {}: {text}", verdict(ok));
    }
}
