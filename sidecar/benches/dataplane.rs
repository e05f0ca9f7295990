//! Data-plane benchmark: what a pair of ISDP sidecars adds to an HTTP/1.1
//! request, next to the same request sent directly and through a pair of
//! HAProxies, both pairs with mutual TLS between their two hops.
//!
//! ```sh
//! apt-get update && apt-get install -y wrk haproxy nginx-light
//! cargo install --locked oha
//! cargo build --release --workspace --bins
//! cargo bench -p isdp-sidecar --bench dataplane
//! ```
//!
//! Everything runs on loopback: nginx as the backend (`return 200 "ok"`,
//! one process, so it never limits a shape), a real control plane, and the
//! release binaries. Servers and proxies are pinned to core 0 and the load
//! generator to core 1, so every shape gets the same single core and the
//! load generator never steals it. Each run measures latency at a fixed
//! 1,000 req/s with `oha` (latency correction on), then peak throughput
//! with `wrk`, then each proxy's CPU time (`/proc/PID/stat`) and peak RSS
//! (`VmHWM`). Runs are interleaved across shapes, repeated, and reported as
//! medians. A missing tool or binary, or a single failed request, fails
//! the bench; nothing is skipped.
//!
//! `ISDP_BENCH_SECS` (default 15) and `ISDP_BENCH_REPS` (default 3) shorten
//! a run while working on the bench itself.
//!
//! # Layout
//! - `tools`: finding oha, wrk, haproxy, nginx and the ISDP binaries.
//! - `process`: a pinned child process, and its CPU time and peak RSS.
//! - `shapes`: starting the backend and the three shapes.
//! - `load`: running oha and wrk, reading their reports.
//! - `report`: medians, tables and the issue's targets.

#[path = "dataplane/load.rs"]
mod load;
#[path = "dataplane/process.rs"]
mod process;
#[path = "dataplane/report.rs"]
mod report;
#[path = "dataplane/shapes.rs"]
mod shapes;
#[path = "dataplane/tools.rs"]
mod tools;

use std::path::Path;

use anyhow::Context;

use process::Proc;
use report::ShapeRuns;
use shapes::Shape;
use tools::Tools;

/// How long each measurement lasts and how often it is repeated.
struct Settings {
    secs: u64,
    reps: usize,
}

fn main() -> anyhow::Result<()> {
    process::in_temp_dir("dataplane", run)
}

fn run(dir: &Path) -> anyhow::Result<()> {
    let settings = settings()?;
    let tools = tools::preflight()?;
    let bins = tools::isdp_bins()?;
    let ticks = process::clock_ticks()?;

    let backend = shapes::nginx(&tools, dir)?;
    // Kept alive for the whole run; idle once sidecar A knows the endpoint.
    let (isdp, _control_plane) = shapes::isdp(&bins, dir, &backend)?;
    let all = [
        shapes::direct(&backend),
        isdp,
        shapes::haproxy_pair(&tools, dir, &backend)?,
    ];
    for shape in &all {
        shapes::check(shape)?;
    }
    print_setup(&tools, &settings, &all);

    let mut runs = all.each_ref().map(|s| {
        let names = s.proxies.iter().map(|p| p.name().to_owned()).collect();
        ShapeRuns::new(s.name, names)
    });
    for shape in &all {
        // Opens the pooled connections along the path before anything counts.
        load::oha(&tools.oha, 2, &shape.url)?;
    }
    for rep in 1..=settings.reps {
        for (shape, run) in all.iter().zip(&mut runs) {
            eprintln!(
                "[{rep}/{}] {} at {} req/s",
                settings.reps,
                shape.name,
                load::RATE
            );
            let (latency, cpu) = with_cpu(&shape.proxies, ticks, || {
                load::oha(&tools.oha, settings.secs, &shape.url)
            })?;
            run.latency.push(latency);
            push_each(&mut run.cpu_rate, cpu);
        }
    }
    for (shape, run) in all.iter().zip(&mut runs) {
        run.rss_rate = peak_rss(&shape.proxies)?;
    }
    for rep in 1..=settings.reps {
        for (shape, run) in all.iter().zip(&mut runs) {
            eprintln!("[{rep}/{}] {} flat out", settings.reps, shape.name);
            let (peak, cpu) = with_cpu(&shape.proxies, ticks, || {
                load::wrk(&tools.wrk, settings.secs, &shape.url)
            })?;
            run.peak.push(peak);
            push_each(&mut run.cpu_peak, cpu);
        }
    }
    for (shape, run) in all.iter().zip(&mut runs) {
        run.rss_peak = peak_rss(&shape.proxies)?;
    }
    report::print(&runs);
    Ok(())
}

fn settings() -> anyhow::Result<Settings> {
    let var = |name: &str, default: u64| -> anyhow::Result<u64> {
        match std::env::var(name) {
            Ok(v) => v
                .parse()
                .with_context(|| format!("{name}={v} is not a number")),
            Err(_) => Ok(default),
        }
    };
    Ok(Settings {
        secs: var("ISDP_BENCH_SECS", 15)?,
        reps: var("ISDP_BENCH_REPS", 3)? as usize,
    })
}

/// Prints what is being compared and the exact load commands, so the
/// output alone says how to reproduce it.
fn print_setup(tools: &Tools, settings: &Settings, shapes: &[Shape; 3]) {
    println!("## Data-plane bench");
    for v in &tools.versions {
        println!("- {v}");
    }
    println!(
        "- {} runs of {} s per measurement; servers on core {}, load on core {}",
        settings.reps,
        settings.secs,
        shapes::SERVER_CORE,
        load::LOAD_CORE
    );
    let url = "URL";
    println!(
        "- latency: taskset -c {} oha {}",
        load::LOAD_CORE,
        load::oha_args(settings.secs, url).join(" ")
    );
    println!(
        "- peak: taskset -c {} wrk {}",
        load::LOAD_CORE,
        load::wrk_args(settings.secs, url).join(" ")
    );
    for s in shapes {
        println!("- {}: {}", s.name, s.url);
    }
}

/// Runs `f` and returns, beside its result, the CPU seconds each of
/// `procs` used meanwhile.
fn with_cpu<T>(
    procs: &[Proc],
    ticks: f64,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, Vec<f64>)> {
    let cpu =
        || -> anyhow::Result<Vec<f64>> { procs.iter().map(|p| p.cpu_seconds(ticks)).collect() };
    let before = cpu()?;
    let out = f()?;
    let after = cpu()?;
    Ok((out, after.iter().zip(&before).map(|(a, b)| a - b).collect()))
}

/// Appends the i-th value to the i-th series.
fn push_each(series: &mut [Vec<f64>], values: Vec<f64>) {
    for (s, v) in series.iter_mut().zip(values) {
        s.push(v);
    }
}

fn peak_rss(procs: &[Proc]) -> anyhow::Result<Vec<u64>> {
    procs.iter().map(Proc::peak_rss_kib).collect()
}
