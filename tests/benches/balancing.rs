//! Balancers compared on two scenarios with real processes: three
//! `catalog` instances (`echo-http`, 10 ms a request) behind their
//! sidecars, a `web` sidecar under steady load from 16 closed-loop
//! callers. Per balancer, scenario and run, a fresh mesh; the report gives
//! each run and the medians over runs.
//!
//! **Slow**: after 4 s one instance turns five times slower (`POST
//! /admin/delay?ms=40`), 10 s later it recovers.
//! - all fast (1..4 s): p50 / p99;
//! - slow, settled (5..10 s after the change): the slow instance's share,
//!   p50 / p99 and p99 over the all-fast p99;
//! - recovered (7..10 s after it): the instance's share;
//! - failed requests over the whole run.
//!
//! **Costly**: every instance reports (ORCA header) a utilisation of
//! 0.001 per request per second; after 6 s one reports ten times that
//! (`POST /admin/load?cost=0.01`) while answering as fast as before, 15 s
//! later it is cheap again. Only the control plane's load weights (2 s
//! blackout here) can see it; how far each balancer honours them:
//! - the costly instance's share before (3..6 s), settled (8..14 s after
//!   the change) and back (12..15 s after it is cheap again);
//! - p50 / p99 while it is costly, and failed requests.
//!
//! `cargo bench -p isdp-tests --bench balancing` (it returns at once
//! without `--bench`); knobs `ISDP_BENCH_RUNS` (3), `ISDP_BENCH_LB` (a
//! comma-separated list; all four by default) and `ISDP_BENCH_SCENARIOS`
//! (`slow,costly`).

use std::time::Duration;

use isdp_tests::ControlPlaneOpts;
use isdp_tests::load::{CatalogMesh, SLOW_DELAY_MS, WORKERS};
use tokio::time::Instant;

const BALANCERS: &[&str] = &["round_robin", "least_request", "peak_ewma", "load_aware"];

/// Utilisation per request per second an instance reports, and the costly
/// one's.
const CHEAP: f64 = 0.001;
const COSTLY: f64 = 0.01;

/// One run's figures of the costly scenario.
#[derive(Clone, Copy, Debug, Default)]
struct Costly {
    before_share: f64,
    costly_share: f64,
    back_share: f64,
    p50: f64,
    p99: f64,
    failed: f64,
}

/// One run's figures.
#[derive(Clone, Copy, Debug, Default)]
struct Run {
    fast_p50: f64,
    fast_p99: f64,
    slow_share: f64,
    slow_p50: f64,
    slow_p99: f64,
    p99_ratio: f64,
    back_share: f64,
    failed: f64,
}

fn main() -> anyhow::Result<()> {
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "balancing: not measured without --bench; run `cargo bench -p isdp-tests --bench balancing`"
        );
        return Ok(());
    }
    let runs: usize = std::env::var("ISDP_BENCH_RUNS")
        .ok()
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(3);
    let list = std::env::var("ISDP_BENCH_LB").unwrap_or_else(|_| BALANCERS.join(","));
    let scenarios = std::env::var("ISDP_BENCH_SCENARIOS").unwrap_or_else(|_| "slow,costly".into());
    let balancers: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("== isdp-tests bench: balancing");
    println!("command: cargo bench -p isdp-tests --bench balancing");
    println!(
        "knobs:   ISDP_BENCH_RUNS={runs} ISDP_BENCH_LB={list} ISDP_BENCH_SCENARIOS={scenarios}"
    );
    println!(
        "load:    {WORKERS} closed-loop callers, 10 ms requests, +{SLOW_DELAY_MS} ms on cat-0"
    );
    println!("machine: {cores} cores");
    let rt = tokio::runtime::Runtime::new()?;
    if scenarios.split(',').any(|s| s.trim() == "slow") {
        slow_scenario(&rt, &balancers, runs);
    }
    if scenarios.split(',').any(|s| s.trim() == "costly") {
        costly_scenario(&rt, &balancers, runs);
    }
    Ok(())
}

/// The slow scenario for each balancer: its runs, then the table.
fn slow_scenario(rt: &tokio::runtime::Runtime, balancers: &[&str], runs: usize) {
    let mut rows = Vec::new();
    for lb in balancers {
        let mut results = Vec::new();
        for n in 0..runs {
            let r = rt.block_on(run(lb));
            println!("slow {lb} run {n}: {r:?}");
            results.push(r);
        }
        rows.push((lb.to_owned(), median(&results)));
    }
    println!();
    println!(
        "| balancer | all fast p50 / p99 | slow share (5..10 s) | slow p50 / p99 | p99 / all-fast p99 | share back (7..10 s after recovery) | failed |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (lb, m) in rows {
        println!(
            "| `{lb}` | {:.1} / {:.1} ms | {:.1} % | {:.1} / {:.1} ms | {:.2}x | {:.1} % | {} |",
            m.fast_p50,
            m.fast_p99,
            100.0 * m.slow_share,
            m.slow_p50,
            m.slow_p99,
            m.p99_ratio,
            100.0 * m.back_share,
            m.failed
        );
    }
    println!();
}

/// The costly scenario for each balancer: its runs, then the table.
fn costly_scenario(rt: &tokio::runtime::Runtime, balancers: &[&str], runs: usize) {
    let mut rows = Vec::new();
    for lb in balancers {
        let mut results = Vec::new();
        for n in 0..runs {
            let r = rt.block_on(run_costly(lb));
            println!("costly {lb} run {n}: {r:?}");
            results.push(r);
        }
        let m = |f: fn(&Costly) -> f64| {
            let mut v: Vec<f64> = results.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or_default()
        };
        rows.push((
            lb.to_owned(),
            Costly {
                before_share: m(|r| r.before_share),
                costly_share: m(|r| r.costly_share),
                back_share: m(|r| r.back_share),
                p50: m(|r| r.p50),
                p99: m(|r| r.p99),
                failed: m(|r| r.failed),
            },
        ));
    }
    println!();
    println!(
        "| balancer | share before (3..6 s) | costly share (8..14 s) | p50 / p99 then | share back (12..15 s after) | failed |"
    );
    println!("|---|---|---|---|---|---|");
    for (lb, m) in rows {
        println!(
            "| `{lb}` | {:.1} % | {:.1} % | {:.1} / {:.1} ms | {:.1} % | {} |",
            100.0 * m.before_share,
            100.0 * m.costly_share,
            m.p50,
            m.p99,
            100.0 * m.back_share,
            m.failed
        );
    }
    println!();
}

async fn run_costly(lb: &str) -> Costly {
    let mesh = CatalogMesh::start_with(
        3,
        lb,
        ControlPlaneOpts {
            extra_args: vec!["--load-weight-blackout".into(), "2s".into()],
            ..ControlPlaneOpts::default()
        },
    )
    .await;
    for i in 0..3 {
        mesh.cost(i, CHEAP).await;
    }
    let mut load = mesh.load();
    let start = Instant::now();
    let secs = Duration::from_secs;
    let before = load.window_after(start, secs(3), secs(6)).await;
    mesh.cost(0, COSTLY).await;
    let costly_at = Instant::now();
    let costly = load.window_after(costly_at, secs(8), secs(14)).await;
    mesh.cost(0, CHEAP).await;
    let cheap_at = Instant::now();
    let back = load.window_after(cheap_at, secs(12), secs(15)).await;
    load.stop();
    let all = load.window(start, Instant::now());
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Costly {
        before_share: before.share("cat-0"),
        costly_share: costly.share("cat-0"),
        back_share: back.share("cat-0"),
        p50: ms(costly.quantile(0.5)),
        p99: ms(costly.quantile(0.99)),
        failed: all.failed() as f64,
    }
}

async fn run(lb: &str) -> Run {
    let mesh = CatalogMesh::start(3, lb).await;
    let mut load = mesh.load();
    let start = Instant::now();
    let secs = Duration::from_secs;
    let fast = load.window_after(start, secs(1), secs(4)).await;
    mesh.delay(0, SLOW_DELAY_MS).await;
    let slowed = Instant::now();
    let slow = load.window_after(slowed, secs(5), secs(10)).await;
    mesh.delay(0, 0).await;
    let recovered = Instant::now();
    let back = load.window_after(recovered, secs(7), secs(10)).await;
    load.stop();
    let all = load.window(start, Instant::now());
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Run {
        fast_p50: ms(fast.quantile(0.5)),
        fast_p99: ms(fast.quantile(0.99)),
        slow_share: slow.share("cat-0"),
        slow_p50: ms(slow.quantile(0.5)),
        slow_p99: ms(slow.quantile(0.99)),
        p99_ratio: slow.quantile(0.99).as_secs_f64() / fast.quantile(0.99).as_secs_f64(),
        back_share: back.share("cat-0"),
        failed: all.failed() as f64,
    }
}

/// The median of each figure on its own.
fn median(runs: &[Run]) -> Run {
    let m = |f: fn(&Run) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or_default()
    };
    Run {
        fast_p50: m(|r| r.fast_p50),
        fast_p99: m(|r| r.fast_p99),
        slow_share: m(|r| r.slow_share),
        slow_p50: m(|r| r.slow_p50),
        slow_p99: m(|r| r.slow_p99),
        p99_ratio: m(|r| r.p99_ratio),
        back_share: m(|r| r.back_share),
        failed: m(|r| r.failed),
    }
}
