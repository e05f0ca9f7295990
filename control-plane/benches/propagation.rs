//! Propagation latency: from just before an operator's `Register` call to
//! the moment each of many ADS streams receives a response carrying the
//! change, in the two protocols the control plane serves:
//!
//! - **delta**: the sidecar's, one delta stream per sidecar subscribing to
//!   the service's `isdp.v1.ServiceEndpoints` (`propagation/delta.rs`);
//! - **sotw**: proxyless gRPC's, one state-of-the-world stream per client
//!   holding the service's standard `Listener`, `RouteConfiguration`,
//!   `Cluster` and `ClusterLoadAssignment` by name, the change arriving in
//!   the assignment (`propagation/sotw.rs`).
//!
//! The control plane runs in process on loopback; the streams stand in for
//! sidecars and clients. They are spread over a few HTTP/2 connections
//! (each below the server's default of 200 concurrent streams per
//! connection) and ACK every response at once, because the server keeps
//! one response per type in flight per stream until it is ACKed: a slow ACK
//! would show up here as latency the server did not cause. Each connection
//! carries its own join token (a client service whose upstream is the
//! watched service), as callers of one service in a mesh join under their
//! own services' tokens: STREAMS / CONNECTIONS streams per principal stays
//! under `--max-streams-per-principal` (1000) and their names far under
//! the per-principal name budget, so the control plane runs with its
//! default flags.
//!
//! A round seeds `SERVICES` other services of one instance each (the rest
//! of a mesh, which the standard translation's Envoy route configuration
//! holds as one virtual host each), then a service of `POOL` instances (a
//! typical service size), opens the streams of one protocol, waits until
//! every stream holds it, makes a few warm-up changes, then makes
//! `CHANGES` registration changes one at a time, `SPACING_MS` apart:
//! change `i` re-registers instance `i % POOL` with metadata `change=i`
//! and weight `i + 1` (what the delta and the state-of-the-world streams
//! read back respectively), so the resource keeps its size and every
//! stream must decode what a real client would. Every (stream, change)
//! pair is one sample. Rounds use fresh servers and alternate the two
//! protocols, so the machine's noise falls on both alike; the report gives
//! each round's percentiles, the percentiles over all rounds' samples, and
//! the state-of-the-world figures as a ratio of the delta ones.
//!
//! The same rounds run on both backends in one run (`ETCD=0` skips the
//! second): the embedded store, then a 3-member etcd cluster on loopback
//! (started by the test harness; the `etcd` binary must be installed, see
//! README), where a change travels Register -> etcd -> the replica's watch
//! -> publishers -> streams.

#[path = "propagation/delta.rs"]
mod delta;
#[path = "propagation/sotw.rs"]
mod sotw;
mod support;

use std::time::{Duration, Instant};

use anyhow::Context as _;
use isdp_control_plane::registry::validate::MAX_WEIGHT;
use isdp_proto::v1::{RegisterRequest, registry_client::RegistryClient};
use support::Channel;
use support::{InProcess, ms, percentile};
use tokio::{
    sync::{mpsc, watch},
    task::JoinSet,
};

const SERVICE: &str = "bench-svc";
/// Instances of the watched service.
const POOL: usize = 10;
/// Changes made before measuring, so connection and allocator warm-up is
/// not counted.
const WARMUP: usize = 5;
/// How long a round may wait for the last stream to see the last change.
const SETTLE: Duration = Duration::from_secs(30);

struct Knobs {
    streams: usize,
    connections: usize,
    changes: usize,
    spacing: Duration,
    rounds: usize,
    services: usize,
    etcd: bool,
}

/// How the streams of a round follow the watched service.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// `ServiceEndpoints` over delta ADS, as sidecars.
    Delta,
    /// The four standard resources over state-of-the-world ADS, as
    /// proxyless gRPC.
    Sotw,
}

impl Protocol {
    const ALL: [Protocol; 2] = [Protocol::Delta, Protocol::Sotw];

    fn label(self) -> &'static str {
        match self {
            Protocol::Delta => "delta",
            Protocol::Sotw => "sotw",
        }
    }
}

/// What one round measured.
struct Round {
    /// Register-to-receipt latency per (stream, measured change).
    latencies: Vec<Duration>,
    /// Per measured change: latency until the last stream had it.
    fanout: Vec<Duration>,
    /// Round trip of the Register call itself (includes the fsync).
    register: Vec<Duration>,
    /// (stream, change) pairs never delivered within `SETTLE`.
    missing: usize,
}

fn main() -> anyhow::Result<()> {
    if !support::measuring("propagation") {
        return Ok(());
    }
    let k = Knobs {
        streams: support::knob("STREAMS", 1_000)?,
        connections: support::knob("CONNECTIONS", 8)?,
        changes: support::knob("CHANGES", 100)?,
        spacing: Duration::from_millis(support::knob("SPACING_MS", 50)? as u64),
        rounds: support::knob("ROUNDS", 3)?,
        services: support::knob("SERVICES", 0)?,
        etcd: support::knob("ETCD", 1)? != 0,
    };
    // Change `i` is carried as weight `i + 1`.
    anyhow::ensure!(
        1 + WARMUP + k.changes <= MAX_WEIGHT as usize,
        "ISDP_BENCH_CHANGES must be below {}",
        MAX_WEIGHT as usize - WARMUP
    );
    support::header(
        "propagation",
        &[
            ("STREAMS", k.streams),
            ("CONNECTIONS", k.connections),
            ("CHANGES", k.changes),
            ("SPACING_MS", k.spacing.as_millis() as usize),
            ("ROUNDS", k.rounds),
            ("SERVICES", k.services),
            ("ETCD", usize::from(k.etcd)),
        ],
    );
    let rt = tokio::runtime::Runtime::new()?;
    let by_backend = rt.block_on(async {
        let mut etcd = None;
        if k.etcd {
            let cluster = support::Etcd::start().await;
            println!("etcd: 3 members at {}", cluster.endpoints);
            etcd = Some(cluster);
        }
        let mut by_backend = Vec::new();
        for on_etcd in [false, true] {
            if on_etcd && etcd.is_none() {
                continue;
            }
            let label = if on_etcd { "etcd" } else { "embedded" };
            let mut by_protocol: Vec<Vec<Round>> =
                Protocol::ALL.iter().map(|_| Vec::new()).collect();
            for r in 0..k.rounds {
                for (p, &protocol) in Protocol::ALL.iter().enumerate() {
                    let name = format!("{label} {} round {}", protocol.label(), r + 1);
                    let backend = if on_etcd { etcd.as_mut() } else { None };
                    let round = run_round(&k, protocol, backend)
                        .await
                        .with_context(|| name.clone())?;
                    print_round(&name, &round);
                    by_protocol[p].push(round);
                }
            }
            by_backend.push((label, by_protocol));
        }
        Ok::<_, anyhow::Error>(by_backend)
    })?;
    println!();
    for (label, by_protocol) in &by_backend {
        let mut medians = Vec::new();
        for (protocol, rounds) in Protocol::ALL.iter().zip(by_protocol) {
            medians.push(summarize(&format!("{label} {}", protocol.label()), rounds));
        }
        let [(d50, d99), (s50, s99)] = medians[..] else {
            unreachable!("two protocols")
        };
        println!(
            "{label}: sotw / delta: p50 {:.2}x ({s50:.1} / {d50:.1} ms), p99 {:.2}x ({s99:.1} / {d99:.1} ms)",
            s50 / d50,
            s99 / d99,
        );
    }
    Ok(())
}

/// Percentiles over every round's samples, and the median per-round p50
/// and p99 (returned).
fn summarize(label: &str, rounds: &[Round]) -> (f64, f64) {
    let all = Round {
        latencies: rounds
            .iter()
            .flat_map(|r| r.latencies.iter().copied())
            .collect(),
        fanout: rounds
            .iter()
            .flat_map(|r| r.fanout.iter().copied())
            .collect(),
        register: rounds
            .iter()
            .flat_map(|r| r.register.iter().copied())
            .collect(),
        missing: rounds.iter().map(|r| r.missing).sum(),
    };
    print_round(&format!("{label}, all rounds"), &all);
    let p50s: Vec<f64> = rounds
        .iter()
        .map(|r| ms(sorted_pct(&r.latencies, 50.0)))
        .collect();
    let p99s: Vec<f64> = rounds
        .iter()
        .map(|r| ms(sorted_pct(&r.latencies, 99.0)))
        .collect();
    let (p50, p99) = (support::median(&p50s), support::median(&p99s));
    println!("{label}: median of per-round p50 {p50:.1} ms, p99 {p99:.1} ms (target: p99 < 50 ms)");
    (p50, p99)
}

async fn run_round(
    k: &Knobs,
    protocol: Protocol,
    etcd: Option<&mut support::Etcd>,
) -> anyhow::Result<Round> {
    let dir = support::data_dir()?;
    let server = InProcess::start_round(dir.path(), etcd).await?;
    let operator = support::channels(server.grpc_addr, &server.auth, 1)
        .await?
        .remove(0);
    // The rest of the mesh first: the watched service's registrations then
    // reach every publisher after it.
    let others = support::register_bulk(
        std::slice::from_ref(&operator),
        64,
        k.services,
        Duration::from_secs(600),
        |i| support::instance(&format!("bench-other-{i:05}"), i),
    )
    .await?;
    anyhow::ensure!(
        others.done == k.services,
        "registered {} of {} other services",
        others.done,
        k.services
    );
    let mut registry = RegistryClient::new(operator);
    let total = 1 + WARMUP + k.changes;
    for slot in 0..POOL {
        register(&mut registry, slot, 0).await?;
    }

    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut streams = open_streams(&server, protocol, k, total, ready_tx, stop_rx).await?;
    for _ in 0..k.streams {
        ready_rx
            .recv()
            .await
            .context("a stream ended before its first response")?;
    }

    let mut sent = vec![None; total];
    let mut register_rtt = Vec::with_capacity(k.changes);
    for (i, slot) in sent.iter_mut().enumerate().skip(1) {
        let t0 = Instant::now();
        *slot = Some(t0);
        register(&mut registry, i % POOL, i).await?;
        if i > WARMUP {
            register_rtt.push(t0.elapsed());
        }
        tokio::time::sleep_until((t0 + k.spacing).into()).await;
    }

    // Streams finish once they hold every change; stop stragglers.
    let mut seen: Vec<Vec<(usize, Instant)>> = Vec::with_capacity(k.streams);
    let settle = tokio::time::sleep(SETTLE);
    tokio::pin!(settle);
    loop {
        tokio::select! {
            joined = streams.join_next() => match joined {
                Some(r) => seen.push(r.context("stream task panicked")??),
                None => break,
            },
            _ = &mut settle => {
                let _ = stop_tx.send(true);
                while let Some(r) = streams.join_next().await {
                    seen.push(r.context("stream task panicked")??);
                }
                break;
            }
        }
    }
    server.stop().await?;

    let mut latencies = Vec::with_capacity(k.streams * k.changes);
    let mut last = vec![Duration::ZERO; total];
    for log in &seen {
        for &(i, at) in log {
            if i <= WARMUP {
                continue;
            }
            let sent_at = sent[i].context("receipt of a change never sent")?;
            let d = at.saturating_duration_since(sent_at);
            latencies.push(d);
            last[i] = last[i].max(d);
        }
    }
    let missing = k.streams * k.changes - latencies.len();
    Ok(Round {
        latencies,
        fanout: last.into_iter().skip(1 + WARMUP).collect(),
        register: register_rtt,
        missing,
    })
}

/// Registers instance `slot` tagged with change number `change`: in its
/// metadata (which `ServiceEndpoints` carries) and as weight `change + 1`
/// (which a `ClusterLoadAssignment` carries).
async fn register(
    client: &mut RegistryClient<Channel>,
    slot: usize,
    change: usize,
) -> anyhow::Result<()> {
    let mut instance = support::instance(SERVICE, slot);
    instance
        .metadata
        .insert("change".to_owned(), change.to_string());
    instance.weight = change as u32 + 1;
    let req = RegisterRequest {
        instance: Some(instance),
    };
    let i = change;
    client
        .register(req)
        .await
        .with_context(|| format!("registering change {i}"))?;
    Ok(())
}

/// The streams of one round, `protocol`'s, spread over `k.connections`
/// connections, each under a join token of its own.
async fn open_streams(
    server: &InProcess,
    protocol: Protocol,
    k: &Knobs,
    total: usize,
    ready: mpsc::UnboundedSender<()>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<JoinSet<anyhow::Result<Vec<(usize, Instant)>>>> {
    let mut channels = Vec::with_capacity(k.connections);
    for c in 0..k.connections {
        let auth = server
            .join_auth(&format!("bench-client-{c}"), &[SERVICE])
            .await?;
        channels.extend(support::channels(server.grpc_addr, &auth, 1).await?);
    }
    let mut set = JoinSet::new();
    for s in 0..k.streams {
        let channel = channels[s % channels.len()].clone();
        let node = format!("bench-node-{s}");
        let (ready, stop) = (ready.clone(), stop.clone());
        match protocol {
            Protocol::Delta => set.spawn(delta::follow(channel, node, SERVICE, total, ready, stop)),
            Protocol::Sotw => set.spawn(sotw::follow(channel, node, SERVICE, total, ready, stop)),
        };
    }
    Ok(set)
}

/// The changes one stream has seen, and when it first saw each.
pub struct Seen {
    seen: Vec<bool>,
    count: usize,
    log: Vec<(usize, Instant)>,
}

impl Seen {
    pub fn new(total: usize) -> Self {
        Seen {
            seen: vec![false; total],
            count: 0,
            log: Vec::with_capacity(total),
        }
    }

    /// Notes the change numbers a response carried (None: an endpoint
    /// carrying none), received `at`.
    pub fn saw(&mut self, changes: impl IntoIterator<Item = Option<usize>>, at: Instant) {
        for i in changes.into_iter().flatten() {
            if i < self.seen.len() && !self.seen[i] {
                self.seen[i] = true;
                self.count += 1;
                self.log.push((i, at));
            }
        }
    }

    pub fn complete(&self) -> bool {
        self.count == self.seen.len()
    }

    pub fn into_log(self) -> Vec<(usize, Instant)> {
        self.log
    }
}

fn sorted_pct(samples: &[Duration], p: f64) -> Duration {
    let mut v = samples.to_vec();
    v.sort_unstable();
    percentile(&v, p)
}

fn print_round(label: &str, r: &Round) {
    let mut lat = r.latencies.clone();
    lat.sort_unstable();
    let mut fan = r.fanout.clone();
    fan.sort_unstable();
    let mut reg = r.register.clone();
    reg.sort_unstable();
    if lat.is_empty() {
        println!("{label}: no deliveries ({} missing)", r.missing);
        return;
    }
    println!(
        "{label}: {} samples, {} missing | latency p50 {:.1} ms  p90 {:.1}  p99 {:.1}  max {:.1} \
         | last stream per change p50 {:.1} ms  max {:.1} | Register RTT p50 {:.1} ms  p99 {:.1}",
        lat.len(),
        r.missing,
        ms(percentile(&lat, 50.0)),
        ms(percentile(&lat, 90.0)),
        ms(percentile(&lat, 99.0)),
        ms(percentile(&lat, 100.0)),
        ms(percentile(&fan, 50.0)),
        ms(percentile(&fan, 100.0)),
        ms(percentile(&reg, 50.0)),
        ms(percentile(&reg, 99.0)),
    );
}
