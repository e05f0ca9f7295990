//! Registration throughput, durable (every acknowledged write is fsynced by
//! the embedded store's group commit).
//!
//! Three layers are measured so their costs can be told apart:
//! - gRPC: `Registry/Register` against an in-process control plane, which
//!   adds validation, compare-and-set, and waiting until the write is
//!   visible in the registry view.
//! - HTTP: `POST /v1/instances` on the HTTP/JSON API, which calls the same
//!   `Registry/Register` code after routing, authenticating and reading
//!   the JSON body (same number of HTTP/2 connections as gRPC channels).
//! - store: `Store::txn` on the store directly, with the same
//!   compare-and-set shape the registry uses.
//!
//! Every layer runs on both backends in the same run: the embedded store and
//! a 3-member etcd cluster on loopback (started by the test harness; the
//! `etcd` binary must be installed, see README). Each (backend, layer,
//! concurrency) triple runs several rounds on a fresh data directory (etcd:
//! a fresh key prefix); the report gives the median rate and the spread.

mod http_client;
mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bytes::Bytes;
use isdp_control_plane::store::{
    Store, Txn,
    embedded::EmbeddedStore,
    etcd::{EtcdOptions, EtcdStore},
};
use prost::Message;
use support::{Bulk, InProcess};

/// Instances are spread over this many services, as a real mesh spreads
/// them; one giant service would instead measure rebuilding its snapshot.
const SERVICES: usize = 200;
const CONCURRENCY: [usize; 4] = [1, 16, 64, 256];
/// gRPC connections the clients share.
const CHANNELS: usize = 4;

fn main() -> anyhow::Result<()> {
    if !support::measuring("registration") {
        return Ok(());
    }
    let total = support::knob("INSTANCES", 20_000)?;
    let rounds = support::knob("ROUNDS", 3)?;
    let budget = Duration::from_secs(support::knob("ROUND_SECS", 6)? as u64);
    support::header(
        "registration",
        &[
            ("INSTANCES", total),
            ("ROUNDS", rounds),
            ("ROUND_SECS", budget.as_secs() as usize),
        ],
    );
    println!(
        "A round registers INSTANCES new instances or stops after ROUND_SECS, whichever comes first."
    );
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let mut etcd = support::Etcd::start().await;
        println!("etcd: 3 members at {}", etcd.endpoints);
        for on_etcd in [false, true] {
            let label = if on_etcd {
                "etcd (3 members)"
            } else {
                "embedded"
            };
            println!(
                "\n-- gRPC Register, {label} store ({CHANNELS} connections, {SERVICES} services)"
            );
            table_header();
            for c in CONCURRENCY {
                let mut runs = Vec::with_capacity(rounds);
                for _ in 0..rounds {
                    let etcd = on_etcd.then_some(&mut etcd);
                    runs.push(grpc_round(c, total, budget, etcd).await?);
                }
                table_row(c, &runs);
            }
        }
        for on_etcd in [false, true] {
            let label = if on_etcd {
                "etcd (3 members)"
            } else {
                "embedded"
            };
            println!(
                "\n-- HTTP POST /v1/instances, {label} store ({CHANNELS} HTTP/2 connections, {SERVICES} services)"
            );
            table_header();
            for c in CONCURRENCY {
                let mut runs = Vec::with_capacity(rounds);
                for _ in 0..rounds {
                    let etcd = on_etcd.then_some(&mut etcd);
                    runs.push(http_round(c, total, budget, etcd).await?);
                }
                table_row(c, &runs);
            }
        }
        for on_etcd in [false, true] {
            let label = if on_etcd {
                "EtcdStore"
            } else {
                "EmbeddedStore"
            };
            println!("\n-- {label}::txn (compare-and-set put, no gRPC)");
            table_header();
            for c in CONCURRENCY {
                let mut runs = Vec::with_capacity(rounds);
                for _ in 0..rounds {
                    let etcd = on_etcd.then_some(&mut etcd);
                    runs.push(store_round(c, total, budget, etcd).await?);
                }
                table_row(c, &runs);
            }
        }
        Ok(())
    })
}

async fn grpc_round(
    concurrency: usize,
    total: usize,
    budget: Duration,
    etcd: Option<&mut support::Etcd>,
) -> anyhow::Result<Bulk> {
    let dir = support::data_dir()?;
    let server = InProcess::start_round(dir.path(), etcd).await?;
    let channels = support::channels(server.grpc_addr, &server.auth, CHANNELS).await?;
    let bulk = support::register_bulk(&channels, concurrency, total, budget, |i| {
        support::instance(&format!("svc-{:03}", i % SERVICES), i)
    })
    .await?;
    drop(channels);
    server.stop().await?;
    Ok(bulk)
}

async fn http_round(
    concurrency: usize,
    total: usize,
    budget: Duration,
    etcd: Option<&mut support::Etcd>,
) -> anyhow::Result<Bulk> {
    let dir = support::data_dir()?;
    let server = InProcess::start_round(dir.path(), etcd).await?;
    let conns = http_client::connect(server.http_addr, &server.roots_der, CHANNELS).await?;
    let token = server.auth.token.clone().context("the bench's token")?;
    let bulk = http_client::register_bulk(&conns, &token, concurrency, total, budget, |i| {
        support::instance(&format!("svc-{:03}", i % SERVICES), i)
    })
    .await?;
    drop(conns);
    server.stop().await?;
    Ok(bulk)
}

async fn store_round(
    concurrency: usize,
    total: usize,
    budget: Duration,
    etcd: Option<&mut support::Etcd>,
) -> anyhow::Result<Bulk> {
    let dir = tempfile::tempdir()?;
    let (store, prefix, embedded): (Arc<dyn Store>, String, Option<EmbeddedStore>) = match etcd {
        Some(etcd) => {
            let store = EtcdStore::connect(&EtcdOptions {
                endpoints: etcd.endpoints.split(',').map(String::from).collect(),
                ..Default::default()
            })
            .await
            .context("connecting to etcd")?;
            (Arc::new(store), etcd.next_prefix(), None)
        }
        None => {
            let store = EmbeddedStore::open(dir.path()).context("opening the store")?;
            (
                Arc::new(store.clone()),
                isdp_control_plane::KEY_PREFIX.to_owned(),
                Some(store),
            )
        }
    };
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let deadline = start + budget;
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let store = store.clone();
        let next = next.clone();
        let prefix = prefix.clone();
        workers.push(tokio::spawn(async move {
            let mut done = 0usize;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total || Instant::now() >= deadline {
                    return Ok::<_, anyhow::Error>(done);
                }
                let inst = support::instance(&format!("svc-{:03}", i % SERVICES), i);
                let key = format!("{prefix}instances/{}", inst.id);
                // Absent-key precondition, as a first registration does.
                let txn = Txn::default().when_mod_revision(&key, 0).put(
                    key.clone(),
                    Bytes::from(inst.encode_to_vec()),
                    None,
                );
                let out = store.txn(txn).await?;
                anyhow::ensure!(out.succeeded, "compare failed for new key {key}");
                done += 1;
            }
        }));
    }
    let mut done = 0;
    for w in workers {
        done += w.await.context("store worker panicked")??;
    }
    let elapsed = start.elapsed();
    drop(store);
    if let Some(store) = embedded {
        store.close().await;
    }
    Ok(Bulk { done, elapsed })
}

fn table_header() {
    println!(
        "{:>11}  {:>12}  {:>12}  {:>12}  {:>10}",
        "concurrency", "median/s", "min/s", "max/s", "writes"
    );
}

fn table_row(concurrency: usize, runs: &[Bulk]) {
    let rates: Vec<f64> = runs.iter().map(Bulk::per_sec).collect();
    let min = rates.iter().copied().fold(f64::INFINITY, f64::min);
    let max = rates.iter().copied().fold(0.0, f64::max);
    let writes: Vec<String> = runs.iter().map(|r| r.done.to_string()).collect();
    println!(
        "{:>11}  {:>12.0}  {:>12.0}  {:>12.0}  {:>10}",
        concurrency,
        support::median(&rates),
        min,
        max,
        writes.join("/")
    );
}
