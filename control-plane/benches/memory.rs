//! Memory of the control plane holding 10,000 services x 10 instances.
//!
//! The real `isdp-control-plane` binary runs as a child process, so the
//! numbers are its own resident set and not this client's. Cargo builds
//! that binary alongside the bench (with the bench profile) and passes its
//! path in `CARGO_BIN_EXE_isdp-control-plane`.
//!
//! A round registers every instance through gRPC, waits until the resident
//! set stops growing, reads `VmRSS` (now) and `VmHWM` (peak) from
//! `/proc/<pid>/status`, then restarts the binary on the same data
//! directory and reads them again once the registry has been reloaded.
//!
//! The binary runs every publisher it runs in production, so the figure
//! holds, besides the registry and the sidecars' `ServiceEndpoints`, the
//! standard translation of all 10,000 services (`publish/standard.rs`:
//! a `Listener`, `RouteConfiguration`, `Cluster` and
//! `ClusterLoadAssignment` each, and Envoy's outbound route configuration
//! with one virtual host per service), published at startup and kept up
//! to date on every registration. The instances have no inbound port, so
//! their clusters carry no mTLS context; the `standard` bench counts the
//! cache's bytes per type with one.

mod support;

use std::{
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use isdp_proto::v1::{ListServicesRequest, registry_client::RegistryClient};
use support::{Mem, ms, percentile, read_mem};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

const BINARY: &str = env!("CARGO_BIN_EXE_isdp-control-plane");
const PER_SERVICE: usize = 10;
/// Calls in flight while loading, over `CHANNELS` connections.
const CONCURRENCY: usize = 256;
const CHANNELS: usize = 4;

struct RoundResult {
    loaded: Mem,
    restarted: Mem,
    load_rate: f64,
    reload: Duration,
}

fn main() -> anyhow::Result<()> {
    if !support::measuring("memory") {
        return Ok(());
    }
    let services = support::knob("SERVICES", 10_000)?;
    let rounds = support::knob("ROUNDS", 1)?;
    support::header("memory", &[("SERVICES", services), ("ROUNDS", rounds)]);
    println!("binary:  {BINARY}");
    let rt = tokio::runtime::Runtime::new()?;
    let results = rt.block_on(async {
        let mut out = Vec::with_capacity(rounds);
        for r in 0..rounds {
            let res = round(services)
                .await
                .with_context(|| format!("round {}", r + 1))?;
            println!(
                "round {}: loaded {} instances at {:.0}/s | RSS {:.1} MiB, peak (HWM) {:.1} MiB \
                 | after restart: reload {:.0} ms, RSS {:.1} MiB, peak {:.1} MiB",
                r + 1,
                services * PER_SERVICE,
                res.load_rate,
                res.loaded.rss,
                res.loaded.hwm,
                ms(res.reload),
                res.restarted.rss,
                res.restarted.hwm
            );
            out.push(res);
        }
        Ok::<_, anyhow::Error>(out)
    })?;
    let med =
        |f: fn(&RoundResult) -> f64| support::median(&results.iter().map(f).collect::<Vec<_>>());
    println!(
        "median: RSS {:.1} MiB (peak {:.1}) loaded; RSS {:.1} MiB (peak {:.1}) after restart (target: RSS < 150 MB)",
        med(|r| r.loaded.rss),
        med(|r| r.loaded.hwm),
        med(|r| r.restarted.rss),
        med(|r| r.restarted.hwm)
    );
    Ok(())
}

async fn round(services: usize) -> anyhow::Result<RoundResult> {
    let dir = support::data_dir()?;
    let total = services * PER_SERVICE;

    let (mut child, addr) = spawn(dir.path()).await?;
    let channels = support::channels(addr, &support::auth_from_dir(dir.path())?, CHANNELS).await?;
    let bulk = support::register_bulk(
        &channels,
        CONCURRENCY,
        total,
        Duration::from_secs(600),
        |i| support::instance(&format!("svc-{:05}", i / PER_SERVICE), i),
    )
    .await?;
    anyhow::ensure!(bulk.done == total, "registered {} of {total}", bulk.done);
    wait_for_instances(&channels[0], total).await?;
    let loaded = settle(&child).await?;
    drop(channels);
    stop(&mut child).await?;

    let started = Instant::now();
    let (mut child, addr) = spawn(dir.path()).await?;
    let channels = support::channels(addr, &support::auth_from_dir(dir.path())?, 1).await?;
    wait_for_instances(&channels[0], total).await?;
    let reload = started.elapsed();
    let restarted = settle(&child).await?;
    drop(channels);
    stop(&mut child).await?;

    Ok(RoundResult {
        loaded,
        restarted,
        load_rate: bulk.per_sec(),
        reload,
    })
}

/// Starts the binary on `data_dir` and reads the gRPC address it prints.
async fn spawn(data_dir: &Path) -> anyhow::Result<(Child, std::net::SocketAddr)> {
    let mut child = Command::new(BINARY)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data_dir)
        // One info line per registration would measure the log pipe.
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {BINARY}"))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .context("control plane did not report its address within 30 s")??
        .context("control plane exited before listening")?;
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("grpc="))
        .with_context(|| format!("no grpc= in {line:?}"))?
        .parse()?;
    Ok((child, addr))
}

/// Waits until the registry reports `total` instances, which after a
/// restart means the reload from disk has finished.
async fn wait_for_instances(channel: &support::Channel, total: usize) -> anyhow::Result<()> {
    let mut client = RegistryClient::new(channel.clone());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let resp = client.list_services(ListServicesRequest {}).await;
        if let Ok(resp) = resp {
            let n: usize = resp
                .into_inner()
                .services
                .iter()
                .map(|s| s.instances as usize)
                .sum();
            if n == total {
                return Ok(());
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "registry never reached {total} instances"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Samples until the resident set has stopped moving (within 1% for two
/// seconds), so background work after the last call (snapshot rebuilds,
/// freed buffers) is reflected, then returns that reading.
async fn settle(child: &Child) -> anyhow::Result<Mem> {
    let pid = child.id().context("child already exited")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut samples = vec![read_mem(pid)?];
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let m = read_mem(pid)?;
        samples.push(m);
        let window = &samples[samples.len().saturating_sub(9)..];
        let mut rss: Vec<f64> = window.iter().map(|m| m.rss).collect();
        rss.sort_by(f64::total_cmp);
        let stable =
            window.len() == 9 && percentile(&rss, 100.0) - percentile(&rss, 0.0) < 0.01 * m.rss;
        if stable || Instant::now() >= deadline {
            return Ok(m);
        }
    }
}

/// SIGTERM, so the store closes cleanly and the restart measures a normal
/// reload rather than crash recovery.
async fn stop(child: &mut Child) -> anyhow::Result<()> {
    let pid = child.id().context("child already exited")?;
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await?;
    anyhow::ensure!(status.success(), "kill -TERM {pid} failed");
    match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
        Ok(exit) => {
            exit?;
            Ok(())
        }
        Err(_) => {
            child.kill().await?;
            anyhow::bail!("control plane did not stop within 30 s of SIGTERM")
        }
    }
}
