//! Comparing ISDP sidecar pairs that differ in one setting (tracing,
//! traffic policies), in one run: latency at a fixed rate with `oha`, peak
//! throughput with `wrk`, both sidecars' CPU per request, runs interleaved
//! across the pairs and repeated, medians against the first pair.

use crate::load;
use crate::process::Proc;
use crate::shapes::Shape;
use crate::tools::Tools;

/// One pair's measurements.
#[derive(Default)]
pub struct Runs {
    pub p50: Vec<f64>,
    pub p99: Vec<f64>,
    pub rate_cpu_us: Vec<f64>,
    pub peak_rps: Vec<f64>,
    pub peak_p50: Vec<f64>,
    pub peak_p99: Vec<f64>,
    pub peak_cpu_us: Vec<f64>,
    /// Requests over the measured runs.
    pub requests: f64,
}

/// Prints the run's settings under `title`.
pub fn print_setup(title: &str, tools: &Tools, secs: u64, reps: u64) {
    println!("## {title}");
    for v in &tools.versions {
        println!("- {v}");
    }
    println!(
        "- {reps} runs of {secs} s per measurement; sidecars on core {}, load on core {}",
        crate::shapes::SERVER_CORE,
        load::LOAD_CORE
    );
    println!(
        "- latency: taskset -c {} oha {}",
        load::LOAD_CORE,
        load::oha_args(secs, "URL").join(" ")
    );
    println!(
        "- peak: taskset -c {} wrk {}",
        load::LOAD_CORE,
        load::wrk_args(secs, "URL").join(" ")
    );
}

/// Measures every pair `reps` times, interleaved.
pub fn measure(
    tools: &Tools,
    ticks: f64,
    pairs: &[(Shape, Proc)],
    secs: u64,
    reps: u64,
) -> anyhow::Result<Vec<Runs>> {
    for (shape, _) in pairs {
        load::oha(&tools.oha, 2, &shape.url)?;
    }
    let mut runs: Vec<Runs> = pairs.iter().map(|_| Runs::default()).collect();
    let cpu = |procs: &[Proc]| -> anyhow::Result<f64> {
        procs.iter().map(|p| p.cpu_seconds(ticks)).sum()
    };
    for rep in 1..=reps {
        for ((shape, _), r) in pairs.iter().zip(&mut runs) {
            eprintln!("[{rep}/{reps}] {} at {} req/s", shape.name, load::RATE);
            let before = cpu(&shape.proxies)?;
            let l = load::oha(&tools.oha, secs, &shape.url)?;
            let used = cpu(&shape.proxies)? - before;
            r.p50.push(l.p50.as_secs_f64() * 1e6);
            r.p99.push(l.p99.as_secs_f64() * 1e6);
            r.rate_cpu_us.push(used / l.requests * 1e6);
            r.requests += l.requests;
        }
    }
    for rep in 1..=reps {
        for ((shape, _), r) in pairs.iter().zip(&mut runs) {
            eprintln!("[{rep}/{reps}] {} flat out", shape.name);
            let before = cpu(&shape.proxies)?;
            let p = load::wrk(&tools.wrk, secs, &shape.url)?;
            let used = cpu(&shape.proxies)? - before;
            r.peak_rps.push(p.rps);
            r.peak_p50.push(p.p50.as_secs_f64() * 1e6);
            r.peak_p99.push(p.p99.as_secs_f64() * 1e6);
            r.peak_cpu_us.push(used / p.requests * 1e6);
            r.requests += p.requests;
        }
    }
    Ok(runs)
}

/// The medians table, each pair against the first; then each sidecar's
/// peak RSS.
pub fn print(pairs: &[(Shape, Proc)], runs: &[Runs]) -> anyhow::Result<()> {
    let base = pairs.first().map_or("", |(s, _)| s.name);
    println!("\n### Medians (CPU is sidecar A + B per request)\n");
    println!(
        "| pair | p50 µs at {} req/s | p99 µs | CPU µs/req | peak req/s | peak vs {base} | p50 / p99 µs at peak | CPU µs/req at peak | CPU vs {base} at peak |",
        load::RATE
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let base_rps = median(&runs[0].peak_rps);
    let base_cpu = median(&runs[0].peak_cpu_us);
    for ((shape, _), r) in pairs.iter().zip(runs) {
        println!(
            "| {} | {:.0} | {:.0} | {:.1} | {:.0} | {:.2} | {:.0} / {:.0} | {:.1} | {:.2} |",
            shape.name,
            median(&r.p50),
            median(&r.p99),
            median(&r.rate_cpu_us),
            median(&r.peak_rps),
            median(&r.peak_rps) / base_rps,
            median(&r.peak_p50),
            median(&r.peak_p99),
            median(&r.peak_cpu_us),
            median(&r.peak_cpu_us) / base_cpu,
        );
    }
    println!("\n| sidecar | peak RSS MiB (VmHWM) |\n|---|---:|");
    for (shape, _) in pairs {
        for p in &shape.proxies {
            println!(
                "| {} | {:.1} |",
                p.name(),
                p.peak_rss_kib()? as f64 / 1024.0
            );
        }
    }
    Ok(())
}

pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}
