//! Per-upstream balancing state, rebuilt from the discovery snapshot.
//!
//! A background task follows the `watch` of snapshots; whenever an
//! upstream's version changes it builds a new [`UpstreamLb`] (health
//! filtering, panic threshold, balancer tables) and swaps it in. Requests
//! only read the current one: the data plane never waits on the control
//! plane. Load state (in-flight, latency) is kept per endpoint id across
//! rebuilds, and requests in flight keep the target they picked.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, RwLock},
};

use http::{HeaderMap, HeaderValue};
use tokio::sync::watch;

use super::forward::Dest;
use crate::{
    balance::{Algorithm, Balancer, EndpointLoad, HashKey, LoadGuard, candidates},
    config::{Protocol, Upstream},
    metrics::{Direction, Metrics, RouteMetrics},
    probe::Health,
    xds::Snapshot,
};

/// Below this share of healthy endpoints, traffic spreads over all of them
/// rather than overloading the few survivors.
pub const PANIC_THRESHOLD: f64 = 0.5;

/// Where one endpoint is reached. Shared (`Arc`) between the balancer's
/// table and the requests that picked it.
#[derive(Debug)]
pub struct Target {
    pub id: String,
    pub dest: Dest,
    /// True when `addr` is the endpoint's sidecar (mesh traffic, mTLS:
    /// `dest.service` is set), false when the instance has no sidecar and
    /// is reached directly in plaintext.
    pub via_sidecar: bool,
    pub load: Arc<EndpointLoad>,
}

/// One upstream's balancing state for one endpoint-set version.
pub struct UpstreamLb {
    pub name: Arc<str>,
    /// `name` as the `x-isdp-service` value the receiving sidecar routes by.
    pub service_header: Option<HeaderValue>,
    pub protocol: Protocol,
    pub version: String,
    pub targets: Vec<Arc<Target>>,
    /// True when too few endpoints are healthy and all are used.
    pub panic: bool,
    /// This upstream's request metrics; the same handles across rebuilds.
    pub metrics: Arc<RouteMetrics>,
    balancer: Balancer,
    hash_key: Option<HashKey>,
}

impl UpstreamLb {
    /// Picks a target for a request and marks it started; the guard
    /// records the request's latency for latency-aware balancing.
    pub fn pick(
        &self,
        headers: &HeaderMap,
        source: Option<IpAddr>,
    ) -> Option<(Arc<Target>, LoadGuard)> {
        let t = self.choose(headers, source)?;
        let guard = t.load.start();
        Some((t, guard))
    }

    /// Picks a target for a TCP connection: counted in flight, but its
    /// lifetime is not a latency.
    pub fn pick_connection(&self, source: Option<IpAddr>) -> Option<(Arc<Target>, LoadGuard)> {
        let t = self.choose(&HeaderMap::new(), source)?;
        let guard = t.load.start_untimed();
        Some((t, guard))
    }

    fn choose(&self, headers: &HeaderMap, source: Option<IpAddr>) -> Option<Arc<Target>> {
        let hash = self.hash_key.as_ref().and_then(|k| k.hash(headers, source));
        let i = self.balancer.pick(hash)?;
        self.targets.get(i).cloned()
    }

    pub fn algorithm(&self) -> Algorithm {
        self.balancer.algorithm()
    }
}

#[derive(Clone)]
pub struct Upstreams {
    shared: Arc<Shared>,
}

struct Shared {
    configs: HashMap<String, Upstream>,
    metrics: HashMap<String, Arc<RouteMetrics>>,
    current: RwLock<HashMap<String, Arc<UpstreamLb>>>,
    loads: Mutex<HashMap<String, Arc<EndpointLoad>>>,
}

impl Upstreams {
    /// Builds the state from the current snapshot and keeps it current
    /// until the snapshot sender goes away or `shutdown` turns true.
    pub fn spawn(
        configs: &[Upstream],
        metrics: &Metrics,
        mut snapshots: watch::Receiver<Arc<Snapshot>>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Self {
        let upstreams = Upstreams {
            shared: Arc::new(Shared {
                configs: configs
                    .iter()
                    .map(|u| (u.name.clone(), u.clone()))
                    .collect(),
                metrics: configs
                    .iter()
                    .map(|u| (u.name.clone(), metrics.route(Direction::Outbound, &u.name)))
                    .collect(),
                current: RwLock::default(),
                loads: Mutex::default(),
            }),
        };
        let first = snapshots.borrow_and_update().clone();
        upstreams.apply(&first);
        let this = upstreams.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => return,
                    changed = snapshots.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let snap = snapshots.borrow_and_update().clone();
                        this.apply(&snap);
                    }
                }
            }
        });
        upstreams
    }

    /// The current state of a configured upstream; None if `name` is not
    /// an upstream of this sidecar.
    pub fn get(&self, name: &str) -> Option<Arc<UpstreamLb>> {
        self.shared
            .current
            .read()
            .expect("upstreams lock")
            .get(name)
            .cloned()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.shared.configs.keys().map(String::as_str)
    }

    fn apply(&self, snap: &Snapshot) {
        let mut rebuilt = Vec::new();
        {
            let current = self.shared.current.read().expect("upstreams lock");
            for (name, cfg) in &self.shared.configs {
                let state = snap.upstreams.get(name);
                let version = state
                    .filter(|s| s.exists)
                    .map_or("", |s| s.version.as_str());
                if current.get(name).is_some_and(|c| c.version == version) {
                    continue;
                }
                rebuilt.push((name.clone(), self.build(cfg, snap, version)));
            }
        }
        if rebuilt.is_empty() {
            return;
        }
        let mut current = self.shared.current.write().expect("upstreams lock");
        for (name, lb) in rebuilt {
            tracing::debug!(upstream = %name, version = %lb.version, targets = lb.targets.len(), panic = lb.panic, "endpoints updated");
            current.insert(name, Arc::new(lb));
        }
        drop(current);
        self.forget_gone_loads(snap);
    }

    fn build(&self, cfg: &Upstream, snap: &Snapshot, version: &str) -> UpstreamLb {
        let endpoints = snap
            .upstreams
            .get(&cfg.name)
            .filter(|s| s.exists)
            .map(|s| s.endpoints.as_slice())
            .unwrap_or_default();
        // Unknown health is routable, as in Envoy: a new instance must not
        // wait a check interval for traffic.
        let (chosen, panic) = candidates(
            endpoints,
            |e| e.health != Health::Unhealthy,
            PANIC_THRESHOLD,
        );
        if panic && !endpoints.is_empty() {
            tracing::warn!(upstream = %cfg.name, total = endpoints.len(), "too few healthy endpoints; spreading over all of them");
        }
        let name: Arc<str> = Arc::from(cfg.name.as_str());
        let mut loads = self.shared.loads.lock().expect("loads lock");
        let targets: Vec<Arc<Target>> = chosen
            .iter()
            .filter_map(|e| {
                let ip: IpAddr = e.address.parse().ok()?;
                let (port, via_sidecar) = if e.inbound_port != 0 {
                    (e.inbound_port, true)
                } else {
                    (e.port, false)
                };
                let load = loads
                    .entry(e.id.clone())
                    .or_insert_with(|| EndpointLoad::new(e.id.clone(), e.weight.max(1)))
                    .clone();
                Some(Arc::new(Target {
                    id: e.id.clone(),
                    dest: if via_sidecar {
                        Dest::mesh(SocketAddr::new(ip, port), name.clone())
                    } else {
                        Dest::new(SocketAddr::new(ip, port))
                    },
                    via_sidecar,
                    load,
                }))
            })
            .collect();
        drop(loads);
        UpstreamLb {
            name,
            service_header: HeaderValue::from_str(&cfg.name).ok(),
            protocol: cfg.protocol,
            version: version.to_owned(),
            balancer: Balancer::new(cfg.lb, targets.iter().map(|t| t.load.clone()).collect()),
            targets,
            panic,
            metrics: self.shared.metrics[&cfg.name].clone(),
            hash_key: cfg.hash_key.clone(),
        }
    }

    /// Drops load state of endpoints no upstream has any more.
    fn forget_gone_loads(&self, snap: &Snapshot) {
        let live: std::collections::HashSet<&str> = snap
            .upstreams
            .values()
            .flat_map(|u| u.endpoints.iter().map(|e| e.id.as_str()))
            .collect();
        self.shared
            .loads
            .lock()
            .expect("loads lock")
            .retain(|id, _| live.contains(id.as_str()));
    }
}
