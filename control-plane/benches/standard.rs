//! The standard xDS translation at mesh scale, in process: how long one
//! full rebuild takes (every service translated and published, as at
//! startup or after the registry reloads), what one change costs once the
//! mesh is that large, and how many bytes the translated resources hold in
//! the xDS cache, each beside the sidecars' `ServiceEndpoints` publisher
//! on the same registry.
//!
//! A round opens an embedded store and registers `SERVICES` services of
//! `PER_SERVICE` instances straight into the registry (no gRPC: the
//! publishers are what is measured), each instance behind a sidecar (an
//! inbound port, so every cluster carries its mTLS context, as in a mesh).
//! Then:
//! - **full rebuild**: each publisher is started `REBUILDS` times, each
//!   time into a fresh cache. `spawn` publishes every service before it
//!   returns, so timing the call times one full rebuild.
//! - **bytes**: what the cache holds per type after one full rebuild (each
//!   resource is kept encoded twice, as an `Any` for state of the world
//!   and as a delta `Resource`; both are counted), and how much this
//!   process's resident set grew while each publisher first published.
//! - **one change**: with both publishers following the registry into one
//!   cache (as the server runs them), `CHANGES` changes one at a time, each
//!   re-registering one instance of another service with a new weight,
//!   timed from the registry having applied it until each publisher's
//!   resource for that service (`ServiceEndpoints`, the
//!   `ClusterLoadAssignment`) carries it. This includes each publisher's
//!   debounce (5 ms for a lone change). The bench polls the cache between
//!   yields, so on a 2-core machine the publishers share the other core.
//!
//! The resident memory of the whole control plane, standard types
//! included, is the memory bench's.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use isdp_control_plane::{
    policy::Policies,
    publish::{self, standard},
    registry::Registry,
    store::embedded::EmbeddedStore,
};
use isdp_proto::v1::{Instance, ServiceEndpoints};
use isdp_xds::Cache;
use prost::Name as _;
use support::{median, ms};
use tokio::sync::watch;

const PREFIX: &str = "/isdp/";
/// Registrations in flight while loading.
const CONCURRENCY: usize = 256;
/// How long one change may take to reach the cache.
const SETTLE: Duration = Duration::from_secs(10);

struct Knobs {
    services: usize,
    per_service: usize,
    rebuilds: usize,
    changes: usize,
}

fn main() -> anyhow::Result<()> {
    if !support::measuring("standard") {
        return Ok(());
    }
    let k = Knobs {
        services: support::knob("SERVICES", 10_000)?,
        per_service: support::knob("PER_SERVICE", 10)?,
        rebuilds: support::knob("REBUILDS", 5)?,
        changes: support::knob("CHANGES", 50)?,
    };
    anyhow::ensure!(k.services > 0 && k.per_service > 0, "nothing to translate");
    support::header(
        "standard",
        &[
            ("SERVICES", k.services),
            ("PER_SERVICE", k.per_service),
            ("REBUILDS", k.rebuilds),
            ("CHANGES", k.changes),
        ],
    );
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(run(&k))
}

async fn run(k: &Knobs) -> anyhow::Result<()> {
    let dir = support::data_dir()?;
    let store = EmbeddedStore::open(dir.path())?;
    let (stop, shutdown) = watch::channel(false);
    let registry = Registry::start(Arc::new(store.clone()), PREFIX, shutdown.clone()).await?;
    let policies = Policies::start(
        Arc::new(store.clone()),
        PREFIX,
        registry.clone(),
        shutdown.clone(),
    )
    .await?;
    let settings = standard::Settings {
        trust_domain: "isdp.local".to_owned(),
        envoy_outbound: "127.0.0.1:15001".parse()?,
    };

    let started = Instant::now();
    load(&registry, k).await?;
    println!(
        "loaded {} services x {} instances in {:.1} s",
        k.services,
        k.per_service,
        started.elapsed().as_secs_f64()
    );

    // Full rebuilds, the endpoints publisher first.
    let mut standard_ms = Vec::with_capacity(k.rebuilds);
    let mut endpoints_ms = Vec::with_capacity(k.rebuilds);
    let mut held = None;
    for r in 0..k.rebuilds {
        let cache = publish::cache();
        let (stop, shutdown) = watch::channel(false);
        let rss0 = rss()?;
        let t0 = Instant::now();
        let endpoints = publish::endpoints::spawn(
            registry.clone(),
            cache.clone(),
            publish::endpoints::Weighing::operator_only(),
            shutdown.clone(),
        );
        let e = t0.elapsed();
        let rss1 = rss()?;
        let t0 = Instant::now();
        let task = standard::spawn(
            settings.clone(),
            registry.clone(),
            policies.clone(),
            isdp_control_plane::load::LoadWeights::operator_only(),
            cache.clone(),
            shutdown,
        );
        let s = t0.elapsed();
        if r == 0 {
            // Later rebuilds reuse what the allocator kept; the first shows
            // what each publisher's output (and the temporaries of one full
            // rebuild, which the allocator keeps) costs in resident memory.
            println!(
                "resident: {rss0:.1} MiB with the registry loaded; +{:.1} MiB the endpoints publisher's, \
                 +{:.1} MiB the standard publisher's",
                rss1 - rss0,
                rss()? - rss1
            );
        }
        let _ = stop.send(true);
        task.await?;
        endpoints.await?;
        println!(
            "full rebuild {}: standard {:.1} ms, endpoints {:.1} ms",
            r + 1,
            ms(s),
            ms(e)
        );
        standard_ms.push(ms(s));
        endpoints_ms.push(ms(e));
        held = Some(cache);
    }
    if let Some(cache) = held {
        report_bytes(&cache, k.services);
    }
    if !standard_ms.is_empty() {
        let (s, e) = (median(&standard_ms), median(&endpoints_ms));
        println!(
            "median full rebuild: standard {s:.1} ms ({:.1} µs per service), endpoints {e:.1} ms, ratio {:.1}x",
            s * 1e3 / k.services as f64,
            s / e
        );
    }

    changes(&registry, &policies, &settings, k).await?;

    let _ = stop.send(true);
    drop((registry, policies));
    store.close().await;
    Ok(())
}

/// This process's resident set, in MiB.
fn rss() -> anyhow::Result<f64> {
    Ok(support::read_mem(std::process::id())?.rss)
}

/// Registers every instance straight into the registry, `CONCURRENCY` at
/// a time.
async fn load(registry: &Registry, k: &Knobs) -> anyhow::Result<()> {
    let total = k.services * k.per_service;
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::with_capacity(CONCURRENCY);
    for _ in 0..CONCURRENCY {
        let (registry, next) = (registry.clone(), next.clone());
        let per_service = k.per_service;
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<_, anyhow::Error>(());
                }
                registry
                    .register(meshed(i / per_service, i, 1))
                    .await
                    .with_context(|| format!("registering #{i}"))?;
            }
        }));
    }
    for w in workers {
        w.await.context("register worker panicked")??;
    }
    Ok(())
}

/// Instance `index` of service `service`, behind a sidecar at its own
/// address.
fn meshed(service: usize, index: usize, weight: u32) -> Instance {
    Instance {
        id: format!("inst-{index:07}"),
        service: service_name(service),
        address: format!(
            "10.{}.{}.{}",
            (index >> 16) & 255,
            (index >> 8) & 255,
            index & 255
        ),
        port: 8080,
        inbound_port: 15006,
        weight,
        ..Default::default()
    }
}

fn service_name(service: usize) -> String {
    format!("svc-{service:05}")
}

/// The bytes the cache holds per standard type, per service, and Envoy's
/// outbound route configuration alone.
fn report_bytes(cache: &Cache, services: usize) {
    let held = |type_url: &str| -> (usize, usize) {
        let Some(tc) = cache.type_cache(type_url) else {
            return (0, 0);
        };
        let names = tc.names();
        let bytes = names
            .iter()
            .filter_map(|n| tc.get(n))
            .map(|e| e.any.len() + e.delta.len() + e.name.len() + e.version.len())
            .sum();
        (names.len(), bytes)
    };
    let mut total = 0;
    for type_url in standard::type_urls() {
        let (n, bytes) = held(type_url);
        total += bytes;
        println!(
            "cache: {:<22} {n:>6} resources, {:>8.1} KiB",
            type_url.rsplit('.').next().unwrap_or(type_url),
            bytes as f64 / 1024.0
        );
    }
    let (_, eps) = held(&ServiceEndpoints::type_url());
    let outbound = cache
        .get(standard::ROUTE_CONFIGURATION, standard::ENVOY_OUTBOUND)
        .map_or(0, |e| e.any.len());
    println!(
        "cache: standard types {:.1} MiB ({:.0} bytes per service; Envoy's outbound routes alone {:.1} KiB encoded), \
         ServiceEndpoints {:.1} MiB ({:.0} bytes per service)",
        total as f64 / (1 << 20) as f64,
        total as f64 / services as f64,
        outbound as f64 / 1024.0,
        eps as f64 / (1 << 20) as f64,
        eps as f64 / services as f64,
    );
}

/// One change at a time with both publishers running: registry applied ->
/// each publisher's resource updated in the cache.
async fn changes(
    registry: &Registry,
    policies: &Policies,
    settings: &standard::Settings,
    k: &Knobs,
) -> anyhow::Result<()> {
    if k.changes == 0 {
        return Ok(());
    }
    let cache = publish::cache();
    let (stop, shutdown) = watch::channel(false);
    let tasks = [
        standard::spawn(
            settings.clone(),
            registry.clone(),
            policies.clone(),
            isdp_control_plane::load::LoadWeights::operator_only(),
            cache.clone(),
            shutdown.clone(),
        ),
        publish::endpoints::spawn(
            registry.clone(),
            cache.clone(),
            publish::endpoints::Weighing::operator_only(),
            shutdown,
        ),
    ];
    let eps_type = ServiceEndpoints::type_url();
    let mut standard_ms = Vec::with_capacity(k.changes);
    let mut endpoints_ms = Vec::with_capacity(k.changes);
    for c in 0..k.changes {
        // Spread over the mesh; instance 0 of each service changes weight.
        let service = (c * 7_919) % k.services;
        let name = service_name(service);
        let version = |type_url: &str| cache.get(type_url, &name).map(|e| e.version.clone());
        let before = (
            version(standard::CLUSTER_LOAD_ASSIGNMENT),
            version(&eps_type),
        );
        registry
            .register(meshed(service, service * k.per_service, 2 + c as u32))
            .await?;
        let applied = Instant::now();
        let (mut s, mut e) = (None, None);
        while s.is_none() || e.is_none() {
            anyhow::ensure!(applied.elapsed() < SETTLE, "change {c} never published");
            if s.is_none() && version(standard::CLUSTER_LOAD_ASSIGNMENT) != before.0 {
                s = Some(applied.elapsed());
            }
            if e.is_none() && version(&eps_type) != before.1 {
                e = Some(applied.elapsed());
            }
            tokio::task::yield_now().await;
        }
        standard_ms.push(ms(s.unwrap_or_default()));
        endpoints_ms.push(ms(e.unwrap_or_default()));
        // Apart, so each change is a lone one.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(true);
    for t in tasks {
        t.await?;
    }
    let pct = |v: &mut Vec<f64>, p: f64| {
        v.sort_by(f64::total_cmp);
        support::percentile(v, p)
    };
    println!(
        "one change at {} services, registry -> cache: ClusterLoadAssignment p50 {:.1} ms p99 {:.1} ms, \
         ServiceEndpoints p50 {:.1} ms p99 {:.1} ms",
        k.services,
        pct(&mut standard_ms, 50.0),
        pct(&mut standard_ms, 99.0),
        pct(&mut endpoints_ms, 50.0),
        pct(&mut endpoints_ms, 99.0),
    );
    Ok(())
}
