//! Propagation latency: from just before an operator's `Register` call to
//! the moment each of many delta ADS streams receives a response naming the
//! new instance.
//!
//! The control plane runs in process on loopback; the streams stand in for
//! sidecars. They are spread over a few HTTP/2 connections (each below the
//! server's default of 200 concurrent streams per connection) and ACK every
//! response at once, because the server keeps one response per type in
//! flight per stream until it is ACKed: a slow ACK would show up here as
//! latency the server did not cause.
//!
//! A round seeds a service of `POOL` instances (a typical service size),
//! opens the streams, waits until every stream holds it, makes a few warm-up
//! changes, then makes `CHANGES` registration changes one at a time,
//! `SPACING_MS` apart: change `i` re-registers instance `i % POOL` with
//! metadata `change=i`, so the resource keeps its size and every stream must
//! decode what a real sidecar would. Every (stream, change) pair is one
//! sample. Rounds use fresh servers; the report gives each round's
//! percentiles and the percentiles over all rounds' samples.
//!
//! The same rounds run on both backends in one run: the embedded store,
//! then a 3-member etcd cluster on loopback (started by the test harness;
//! the `etcd` binary must be installed, see README), where a change travels
//! Register -> etcd -> the replica's watch -> snapshot -> streams.

mod support;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use envoy_types::pb::envoy::{
    config::core::v3::Node,
    service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse,
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
};
use isdp_proto::v1::{
    RegisterRequest, SERVICE_ENDPOINTS_TYPE_URL, ServiceEndpoints, registry_client::RegistryClient,
};
use prost::Message;
use support::Channel;
use support::{InProcess, ms, percentile};
use tokio::{
    sync::{mpsc, watch},
    task::JoinSet,
};
use tokio_stream::wrappers::ReceiverStream;

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
    let k = Knobs {
        streams: support::knob("STREAMS", 1_000)?,
        connections: support::knob("CONNECTIONS", 8)?,
        changes: support::knob("CHANGES", 100)?,
        spacing: Duration::from_millis(support::knob("SPACING_MS", 50)? as u64),
        rounds: support::knob("ROUNDS", 3)?,
    };
    support::header(
        "propagation",
        &[
            ("STREAMS", k.streams),
            ("CONNECTIONS", k.connections),
            ("CHANGES", k.changes),
            ("SPACING_MS", k.spacing.as_millis() as usize),
            ("ROUNDS", k.rounds),
        ],
    );
    let rt = tokio::runtime::Runtime::new()?;
    let by_backend = rt.block_on(async {
        let mut etcd = support::Etcd::start().await;
        println!("etcd: 3 members at {}", etcd.endpoints);
        let mut by_backend = Vec::new();
        for on_etcd in [false, true] {
            let label = if on_etcd { "etcd" } else { "embedded" };
            let mut rounds = Vec::with_capacity(k.rounds);
            for r in 0..k.rounds {
                let round = run_round(&k, on_etcd.then_some(&mut etcd))
                    .await
                    .with_context(|| format!("{label} round {}", r + 1))?;
                print_round(&format!("{label} round {}", r + 1), &round);
                rounds.push(round);
            }
            by_backend.push((label, rounds));
        }
        Ok::<_, anyhow::Error>(by_backend)
    })?;
    println!();
    for (label, rounds) in &by_backend {
        summarize(label, rounds);
    }
    Ok(())
}

/// Percentiles over every round's samples, and the median per-round p99.
fn summarize(label: &str, rounds: &[Round]) {
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
    println!(
        "{label}: median of per-round p50 {:.1} ms, p99 {:.1} ms (target: p99 < 50 ms)",
        support::median(&p50s),
        support::median(&p99s)
    );
}

async fn run_round(k: &Knobs, etcd: Option<&mut support::Etcd>) -> anyhow::Result<Round> {
    let dir = support::data_dir()?;
    let server = InProcess::start_round(dir.path(), etcd).await?;
    let operator = support::channels(server.grpc_addr, &server.auth, 1)
        .await?
        .remove(0);
    let mut registry = RegistryClient::new(operator);
    let total = 1 + WARMUP + k.changes;
    for slot in 0..POOL {
        register(&mut registry, slot, 0).await?;
    }

    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let streams = open_streams(server.grpc_addr, &server.auth, k, total, ready_tx, stop_rx).await?;
    let mut streams = streams;
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

/// Registers instance `slot` tagged with change number `change`.
async fn register(
    client: &mut RegistryClient<Channel>,
    slot: usize,
    change: usize,
) -> anyhow::Result<()> {
    let mut instance = support::instance(SERVICE, slot);
    instance
        .metadata
        .insert("change".to_owned(), change.to_string());
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

async fn open_streams(
    addr: SocketAddr,
    auth: &support::ControlAuth,
    k: &Knobs,
    total: usize,
    ready: mpsc::UnboundedSender<()>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<JoinSet<anyhow::Result<Vec<(usize, Instant)>>>> {
    let channels = support::channels(addr, auth, k.connections).await?;
    let mut set = JoinSet::new();
    for s in 0..k.streams {
        let channel = channels[s % channels.len()].clone();
        set.spawn(follow(
            channel,
            format!("bench-node-{s}"),
            total,
            ready.clone(),
            stop.clone(),
        ));
    }
    Ok(set)
}

/// One stand-in sidecar: subscribes, ACKs every response, and logs when it
/// first sees each instance. Returns once it has seen all `total`.
async fn follow(
    channel: Channel,
    node_id: String,
    total: usize,
    ready: mpsc::UnboundedSender<()>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<Vec<(usize, Instant)>> {
    let (tx, rx) = mpsc::channel(8);
    tx.send(DeltaDiscoveryRequest {
        node: Some(Node {
            id: node_id.clone(),
            ..Default::default()
        }),
        type_url: SERVICE_ENDPOINTS_TYPE_URL.to_owned(),
        resource_names_subscribe: vec![SERVICE.to_owned()],
        ..Default::default()
    })
    .await?;
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let mut inbound = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .with_context(|| format!("{node_id}: opening the delta stream"))?
        .into_inner();
    let mut seen = vec![false; total];
    let mut count = 0;
    let mut log = Vec::with_capacity(total);
    let mut first = true;
    while count < total {
        let resp = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            msg = inbound.message() => match msg.with_context(|| format!("{node_id}: stream failed"))? {
                Some(resp) => resp,
                None => break,
            },
        };
        let at = Instant::now();
        // ACK before decoding, so the next change can be on its way.
        tx.send(ack(&resp)).await?;
        for id in instance_ids(&resp)? {
            if let Some(i) = id.filter(|&i| i < total && !seen[i]) {
                seen[i] = true;
                count += 1;
                log.push((i, at));
            }
        }
        if std::mem::take(&mut first) {
            let _ = ready.send(());
        }
    }
    Ok(log)
}

fn ack(resp: &DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: resp.type_url.clone(),
        response_nonce: resp.nonce.clone(),
        ..Default::default()
    }
}

/// The change number every endpoint in the response carries (None where
/// it has none).
fn instance_ids(resp: &DeltaDiscoveryResponse) -> anyhow::Result<Vec<Option<usize>>> {
    let mut out = Vec::new();
    for r in &resp.resources {
        let Some(any) = &r.resource else { continue };
        let eps =
            ServiceEndpoints::decode(any.value.as_slice()).context("decoding ServiceEndpoints")?;
        out.extend(
            eps.endpoints
                .iter()
                .map(|e| e.metadata.get("change").and_then(|c| c.parse().ok())),
        );
    }
    Ok(out)
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
