//! Soak: a mesh under steady load for a long time (30 minutes by
//! default), with instance churn every few seconds and a traffic-policy
//! change every minute, checking that nothing grows and nothing is lost.
//!
//! The mesh: a control plane on the embedded store, three stable
//! `payments` instances (`echo-http` behind a sidecar each) and `web`'s
//! sidecar, which the bench loads with closed-loop callers. Every
//! [`CHURN_EVERY`] a new `payments` instance joins and, once two churned
//! ones run, the oldest leaves: alternately a clean stop (SIGTERM, which
//! deregisters) and a kill -9 of its sidecar (its instance lingers until
//! the session timeout; `web` must route around it). Every
//! [`POLICY_EVERY`] the `payments` policy flips between two versions.
//!
//! Every [`SAMPLE_EVERY`] it reads the resident memory, open descriptors
//! and threads of the control plane, `web`'s sidecar and one stable
//! `payments` sidecar from `/proc`, and reports each series' least-squares
//! slope per hour after a warm-up. Requests are counted by outcome; a
//! failed request is excused only if it was in flight when a sidecar was
//! killed (its span holds the kill). Any other failure fails the run.
//!
//! `cargo bench -p isdp-tests --bench soak` (it returns at once without
//! `--bench`); knobs: `ISDP_SOAK_MINUTES` (30), `ISDP_SOAK_WORKERS` (4).
//! Not run by `make test`: results go to BENCHMARKS.md.

use std::collections::VecDeque;
use std::time::Duration;

use isdp_tests::load::{Load, Sample};
use isdp_tests::procstat::{ProcStat, slope_per_hour};
use isdp_tests::{ControlPlane, ControlPlaneOpts, EchoHttp, Sidecar, SidecarToml, eventually};
use tokio::time::Instant;

const SERVICE: &str = "payments";
const PATH: &str = "/slow?ms=5";
const CHURN_EVERY: Duration = Duration::from_secs(5);
const POLICY_EVERY: Duration = Duration::from_secs(60);
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Readings before this (or a quarter of a shorter run) are start-up,
/// not steady state.
const WARM_UP: Duration = Duration::from_secs(120);
const POLICIES: [&str; 2] = [
    "service: payments\ntimeouts: { request: 5s }\nretries: { attempts: 2 }\n",
    "service: payments\ntimeouts: { request: 6s }\nretries: { attempts: 3 }\n",
];

struct Instance {
    echo: EchoHttp,
    sidecar: Sidecar,
}

async fn start_instance(cp: &ControlPlane, id: &str) -> Instance {
    let echo = EchoHttp::start(id).await;
    let sidecar = SidecarToml::new(id, &cp.grpc_url())
        .service(SERVICE, echo.port(), Duration::from_millis(500))
        .start()
        .await;
    Instance { echo, sidecar }
}

/// One process's readings over time.
struct Series {
    name: &'static str,
    pid: u32,
    points: Vec<(Duration, ProcStat)>,
}

impl Series {
    fn row(&self, warm_up: Duration) -> String {
        let steady: Vec<_> = self.points.iter().filter(|(t, _)| *t >= warm_up).collect();
        let slope = |f: fn(&ProcStat) -> f64| {
            let pts: Vec<_> = steady.iter().map(|(t, s)| (*t, f(s))).collect();
            slope_per_hour(&pts)
        };
        let (first, last) = (
            steady.first().map(|p| p.1).unwrap_or_default(),
            steady.last().map(|p| p.1).unwrap_or_default(),
        );
        let mib = |k: u64| k as f64 / 1024.0;
        format!(
            "| {} | {:.1} → {:.1} MiB | {:+.2} MiB/h | {} → {} | {:+.1}/h | {} → {} | {:+.1}/h |",
            self.name,
            mib(first.rss_kib),
            mib(last.rss_kib),
            slope(|s| s.rss_kib as f64) / 1024.0,
            first.fds,
            last.fds,
            slope(|s| s.fds as f64),
            first.threads,
            last.threads,
            slope(|s| s.threads as f64),
        )
    }
}

fn main() -> anyhow::Result<()> {
    if !std::env::args().any(|a| a == "--bench") {
        println!("soak: not run without --bench; run `cargo bench -p isdp-tests --bench soak`");
        return Ok(());
    }
    let minutes: u64 = std::env::var("ISDP_SOAK_MINUTES")
        .ok()
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(30);
    let workers: usize = std::env::var("ISDP_SOAK_WORKERS")
        .ok()
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(4);
    println!("== isdp-tests bench: soak");
    println!("command: cargo bench -p isdp-tests --bench soak");
    println!("knobs:   ISDP_SOAK_MINUTES={minutes} ISDP_SOAK_WORKERS={workers}");
    tokio::runtime::Runtime::new()?.block_on(soak(Duration::from_secs(minutes * 60), workers))
}

async fn soak(length: Duration, workers: usize) -> anyhow::Result<()> {
    let mut cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let mut stable = Vec::new();
    for n in 0..3 {
        stable.push(start_instance(&cp, &format!("pay-{n}")).await);
    }
    let mut web = SidecarToml::new("web", &cp.grpc_url())
        .upstream_on_port0(SERVICE, "http", "load_aware")
        .start()
        .await;
    let dir = tempfile::tempdir()?;
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, POLICIES[0])?;
    let policy_arg = policy.display().to_string();
    cp.ctl_ok(&["policy", "apply", "-f", &policy_arg]).await;
    eventually(Duration::from_secs(30), "web holds 3 endpoints", || async {
        let eps = web.endpoints(SERVICE).await?;
        anyhow::ensure!(eps.len() == 3, "{eps:?}");
        Ok(())
    })
    .await;

    let mut series = vec![
        Series {
            name: "control plane",
            pid: cp.process().pid(),
            points: vec![],
        },
        Series {
            name: "web's sidecar (client)",
            pid: web.process().pid(),
            points: vec![],
        },
        Series {
            name: "pay-0's sidecar (server)",
            pid: stable[0].sidecar.process().pid(),
            points: vec![],
        },
    ];
    let load = Load::start(web.upstream_addr(SERVICE), PATH, workers);
    let start = Instant::now();
    let mut churn: VecDeque<Instance> = VecDeque::new();
    let (mut joined, mut terms, mut kills_done) = (0u64, 0u64, 0u64);
    let mut kills: Vec<Instant> = Vec::new();
    let mut policy_flips = 0usize;
    let (mut next_churn, mut next_policy, mut next_sample) = (
        start + CHURN_EVERY,
        start + POLICY_EVERY,
        start + Duration::ZERO,
    );
    while start.elapsed() < length {
        let now = Instant::now();
        if now >= next_sample {
            for s in &mut series {
                s.points.push((now - start, ProcStat::read(s.pid)?));
            }
            next_sample += SAMPLE_EVERY;
        }
        if now >= next_churn {
            churn.push_back(start_instance(&cp, &format!("churn-{joined}")).await);
            joined += 1;
            if churn.len() > 2 {
                let mut gone = churn.pop_front().expect("two churned instances");
                if (terms + kills_done) % 2 == 0 {
                    gone.sidecar.terminate().await;
                    terms += 1;
                } else {
                    kills.push(Instant::now());
                    gone.sidecar.kill9().await;
                    kills_done += 1;
                }
                drop(gone.echo);
            }
            next_churn += CHURN_EVERY;
        }
        if now >= next_policy {
            policy_flips += 1;
            std::fs::write(&policy, POLICIES[policy_flips % 2])?;
            cp.ctl_ok(&["policy", "apply", "-f", &policy_arg]).await;
            next_policy += POLICY_EVERY;
        }
        let next = next_sample.min(next_churn).min(next_policy);
        tokio::time::sleep_until(next).await;
    }
    let end = Instant::now();
    let all = load.window(start, end);

    let at_kill = |at: Instant, latency: Duration| {
        let began = at - latency;
        kills.iter().any(|k| *k >= began && *k <= at)
    };
    let failed: Vec<_> = all
        .0
        .iter()
        .filter(|s| !(200..300).contains(&s.status))
        .collect();
    let (excused, unexcused): (Vec<&Sample>, Vec<&Sample>) =
        failed.iter().partition(|s| at_kill(s.at, s.latency));
    let secs = (end - start).as_secs_f64();
    println!();
    println!(
        "ran {:.1} min: {} instances joined, {terms} left with SIGTERM, {kills_done} killed (-9), \
         {policy_flips} policy changes",
        secs / 60.0,
        joined
    );
    println!(
        "requests: {} ({:.0}/s), ok {}, failed {} (in flight at a kill -9: {}, other: {}); \
         p50 {:?} p99 {:?}",
        all.len(),
        all.len() as f64 / secs,
        all.len() - failed.len(),
        failed.len(),
        excused.len(),
        unexcused.len(),
        all.quantile(0.5),
        all.quantile(0.99),
    );
    println!();
    let warm_up = WARM_UP.min(length / 4);
    println!(
        "steady state (after {}s warm-up), first → last reading and least-squares slope:",
        warm_up.as_secs()
    );
    println!("| process | RSS | RSS slope | fds | fd slope | threads | thread slope |");
    println!("|---|---|---|---|---|---|---|");
    for s in &series {
        println!("{}", s.row(warm_up));
    }
    drop(churn);
    drop(stable);
    drop(web);
    anyhow::ensure!(
        unexcused.is_empty(),
        "{} requests failed that were not in flight at a kill: {:?}",
        unexcused.len(),
        unexcused
            .iter()
            .take(10)
            .map(|s| format!("{} after {:?}", s.status, s.latency))
            .collect::<Vec<_>>()
    );
    Ok(())
}
