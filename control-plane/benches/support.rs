//! Helpers shared by the control-plane benchmarks: an in-process server on
//! loopback, gRPC channels, bulk registration, and percentile reports.
//!
//! Each bench includes it with `mod support;`; the manifest sets
//! `autobenches = false`, so Cargo does not build this file as a bench of
//! its own.

#![allow(dead_code)] // Each bench binary uses a different subset.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Parser;
pub use isdp_core::dial::{ControlAuth, ControlChannel as Channel};
use isdp_proto::v1::{Instance, RegisterRequest, registry_client::RegistryClient};
use tokio::{sync::watch, task::JoinHandle};

/// A fresh data dir, private (0700) as the control plane wants it.
pub fn data_dir() -> std::io::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt as _;
    tempfile::Builder::new()
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()
}

/// A control plane serving in this process on loopback ports.
pub struct InProcess {
    pub grpc_addr: SocketAddr,
    /// The HTTP/JSON API's address.
    pub http_addr: SocketAddr,
    /// The roots its certificates chain to (DER), for HTTP clients.
    pub roots_der: Vec<Vec<u8>>,
    /// Its trust bundle and an admin token minted in-process.
    pub auth: ControlAuth,
    tokens: isdp_control_plane::tokens::Tokens,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), isdp_control_plane::Error>>,
}

/// Which store a benchmarked control plane uses.
pub enum Backend<'a> {
    /// The embedded store, in this (fresh) directory.
    Embedded(&'a Path),
    /// An etcd cluster, under a key prefix of the round's own; `dir` gets
    /// the control plane's ca.pem and admin.token; `kek_file` seals the CA
    /// key in etcd.
    Etcd {
        endpoints: &'a str,
        prefix: &'a str,
        dir: &'a Path,
        kek_file: &'a Path,
    },
}

impl Backend<'_> {
    /// The control-plane flags selecting this store.
    fn args(&self) -> anyhow::Result<Vec<String>> {
        Ok(match self {
            Backend::Embedded(dir) => vec![
                "--data-dir".into(),
                dir.to_str().context("data dir is not UTF-8")?.into(),
            ],
            Backend::Etcd {
                endpoints,
                prefix,
                dir,
                kek_file,
            } => vec![
                "--data-dir".into(),
                dir.to_str().context("data dir is not UTF-8")?.into(),
                "--store".into(),
                "etcd".into(),
                "--etcd-endpoints".into(),
                endpoints.to_string(),
                "--etcd-prefix".into(),
                prefix.to_string(),
                "--kek-file".into(),
                kek_file.to_str().context("KEK file is not UTF-8")?.into(),
            ],
        })
    }
}

/// A 3-member etcd cluster for the benches' etcd rows (the test harness's,
/// with its short heartbeat and election timings), and a fresh key prefix
/// per round.
pub struct Etcd {
    pub cluster: isdp_tests::EtcdCluster,
    pub endpoints: String,
    rounds: usize,
}

impl Etcd {
    pub async fn start() -> Self {
        let cluster = isdp_tests::EtcdCluster::start(3).await;
        let endpoints = cluster.endpoints_arg();
        Etcd {
            cluster,
            endpoints,
            rounds: 0,
        }
    }

    /// A key prefix no earlier round used.
    pub fn next_prefix(&mut self) -> String {
        self.rounds += 1;
        format!("/bench-{}-{}/", std::process::id(), self.rounds)
    }
}

impl InProcess {
    /// Starts a control plane for one round: on etcd under a fresh prefix
    /// when `etcd` is given, else on an embedded store in `dir`.
    pub async fn start_round(dir: &Path, etcd: Option<&mut Etcd>) -> anyhow::Result<Self> {
        match etcd {
            Some(etcd) => {
                let prefix = etcd.next_prefix();
                Self::start(Backend::Etcd {
                    endpoints: &etcd.endpoints,
                    prefix: &prefix,
                    dir,
                    kek_file: etcd.cluster.kek_file(),
                })
                .await
            }
            None => Self::start(Backend::Embedded(dir)).await,
        }
    }

    /// Binds on `127.0.0.1:0` with the given store, exactly as the binary
    /// would with those flags.
    pub async fn start(backend: Backend<'_>) -> anyhow::Result<Self> {
        let mut args: Vec<String> = [
            "isdp-control-plane",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ]
        .map(String::from)
        .to_vec();
        args.extend(backend.args()?);
        let config = isdp_control_plane::Config::parse_from(args);
        let server = isdp_control_plane::Server::bind(config)
            .await
            .context("binding the control plane")?;
        let grpc_addr = server.grpc_addr;
        let http_addr = server.http_addr;
        let roots_der = server.ca().roots().bundle_der();
        let (_, token) = server
            .tokens()
            .create(
                isdp_control_plane::tokens::Role::Admin,
                isdp_control_plane::tokens::Scope::default(),
                "bench".into(),
                None,
            )
            .await
            .context("minting the bench's token")?;
        let auth = ControlAuth {
            ca_pem: Some(server.ca().roots().bundle_pem()),
            token: Some(token),
            identity: Default::default(),
            learned: Default::default(),
        };
        let tokens = server.tokens().clone();
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(server.serve(stop_rx));
        Ok(InProcess {
            grpc_addr,
            http_addr,
            roots_der,
            auth,
            tokens,
            stop,
            task,
        })
    }

    /// Credentials of a new join token for `service` that may read
    /// `upstreams` besides it: what a caller of those services joins with.
    pub async fn join_auth(
        &self,
        service: &str,
        upstreams: &[&str],
    ) -> anyhow::Result<ControlAuth> {
        let (_, token) = self
            .tokens
            .create(
                isdp_control_plane::tokens::Role::Join,
                isdp_control_plane::tokens::Scope {
                    services: vec![service.to_owned()],
                    upstreams: upstreams.iter().map(|s| s.to_string()).collect(),
                },
                format!("bench {service}"),
                None,
            )
            .await
            .with_context(|| format!("minting a join token for {service}"))?;
        Ok(ControlAuth {
            token: Some(token),
            ..self.auth.clone()
        })
    }

    /// Stops serving and waits until the store is closed.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.task.await.context("control plane task panicked")??;
        Ok(())
    }
}

/// `n` separate HTTP/2 connections to `addr` (TLS, the token on every
/// call, as a sidecar dials), so load spreads as it would from several
/// sidecars rather than multiplexing on one socket.
pub async fn channels(
    addr: SocketAddr,
    auth: &ControlAuth,
    n: usize,
) -> anyhow::Result<Vec<Channel>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let ch = isdp_core::dial::connect(&format!("https://{addr}"), auth)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        out.push(ch);
    }
    Ok(out)
}

/// The credentials a control plane child wrote to its data dir.
pub fn auth_from_dir(dir: &Path) -> anyhow::Result<ControlAuth> {
    let read =
        |f: &str| std::fs::read_to_string(dir.join(f)).with_context(|| format!("reading {f}"));
    Ok(ControlAuth {
        ca_pem: Some(read("ca.pem")?),
        token: Some(read("admin.token")?.trim().to_owned()),
        identity: Default::default(),
        learned: Default::default(),
    })
}

/// An operator-registered instance; ids are unique per `index`.
pub fn instance(service: &str, index: usize) -> Instance {
    Instance {
        id: format!("{service}-{index:07}"),
        service: service.to_owned(),
        address: "127.0.0.1".to_owned(),
        port: 1024 + (index % 60_000) as u32,
        ..Default::default()
    }
}

/// What one bulk registration achieved.
pub struct Bulk {
    pub done: usize,
    pub elapsed: Duration,
}

impl Bulk {
    pub fn per_sec(&self) -> f64 {
        self.done as f64 / self.elapsed.as_secs_f64()
    }
}

/// Registers `make(0..total)` with at most `concurrency` calls in flight,
/// spread round-robin over `channels`. Stops early at `budget`, so slow
/// configurations (one call at a time, each waiting for an fsync) still
/// finish in bounded time; the rate is computed from what completed.
pub async fn register_bulk(
    channels: &[Channel],
    concurrency: usize,
    total: usize,
    budget: Duration,
    make: impl Fn(usize) -> Instance + Send + Sync + 'static,
) -> anyhow::Result<Bulk> {
    let next = Arc::new(AtomicUsize::new(0));
    let make = Arc::new(make);
    let start = Instant::now();
    let deadline = start + budget;
    let mut workers = Vec::with_capacity(concurrency);
    for w in 0..concurrency {
        let mut client = RegistryClient::new(channels[w % channels.len()].clone());
        let next = next.clone();
        let make = make.clone();
        workers.push(tokio::spawn(async move {
            let mut done = 0usize;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total || Instant::now() >= deadline {
                    return Ok::<_, anyhow::Error>(done);
                }
                let req = RegisterRequest {
                    instance: Some(make(i)),
                };
                client
                    .register(req)
                    .await
                    .with_context(|| format!("registering #{i}"))?;
                done += 1;
            }
        }));
    }
    let mut done = 0;
    for w in workers {
        done += w.await.context("register worker panicked")??;
    }
    Ok(Bulk {
        done,
        elapsed: start.elapsed(),
    })
}

/// Nearest-rank percentile of sorted samples.
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> T {
    assert!(!sorted.is_empty(), "percentile of no samples");
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Median of unsorted values (the lower one for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    percentile(&v, 50.0)
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A knob read from `ISDP_BENCH_<name>`, so a run can be scaled without
/// editing code; the report prints the values used.
pub fn knob(name: &str, default: usize) -> anyhow::Result<usize> {
    let var = format!("ISDP_BENCH_{name}");
    match std::env::var(&var) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{var}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

/// One reading of a process's memory, in MiB.
#[derive(Clone, Copy)]
pub struct Mem {
    pub rss: f64,
    pub hwm: f64,
}

/// `VmRSS` (now) and `VmHWM` (peak) of process `pid`.
pub fn read_mem(pid: u32) -> anyhow::Result<Mem> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| -> anyhow::Result<f64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("{name} missing from {path}"))?;
        let kib: f64 = line
            .split_whitespace()
            .nth(1)
            .with_context(|| format!("malformed {line:?}"))?
            .parse()?;
        Ok(kib / 1024.0)
    };
    Ok(Mem {
        rss: field("VmRSS:")?,
        hwm: field("VmHWM:")?,
    })
}

/// Whether this run measures: `cargo bench` passes `--bench` to every
/// bench binary, `cargo test --benches` (or `--all-targets`) passes
/// nothing. Without it a bench says so and returns at once, so a test run
/// that builds the benches to check them does not spend minutes in them.
pub fn measuring(bench: &str) -> bool {
    let measuring = std::env::args().any(|a| a == "--bench");
    if !measuring {
        println!(
            "{bench}: not measured without --bench; run `cargo bench -p isdp-control-plane --bench {bench}`"
        );
    }
    measuring
}

/// The header every report starts with: what ran, where, and how to rerun.
pub fn header(bench: &str, knobs: &[(&str, usize)]) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("== isdp-control-plane bench: {bench}");
    println!("command: cargo bench -p isdp-control-plane --bench {bench}");
    let knobs: Vec<String> = knobs
        .iter()
        .map(|(k, v)| format!("ISDP_BENCH_{k}={v}"))
        .collect();
    println!("knobs:   {}", knobs.join(" "));
    println!("machine: {cores} cores, kernel {}", kernel.trim());
}
