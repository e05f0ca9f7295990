//! Per-upstream balancing state, rebuilt from the discovery snapshot.
//!
//! A background task follows the `watch` of snapshots; whenever an
//! upstream's endpoint version or traffic-policy version changes it builds
//! a new [`UpstreamLb`] (health filtering, panic threshold, the compiled
//! policy, balancer tables for every subset) and swaps it in. Requests
//! only read the current one: the data plane never waits on the control
//! plane, and policies are compiled once per version, never per request.
//! Load and outlier state are kept per endpoint id, and breaker, adaptive
//! concurrency limit and retry budget per upstream, across rebuilds; requests in flight keep the
//! target and policy they started with.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use http::{HeaderMap, HeaderValue};
use tokio::sync::watch;

use super::{
    limits::{Adaptive, Breaker, RetryBudget},
    policy::Compiled,
    svc::Dest,
};
use crate::{
    balance::{
        Algorithm, Balancer, EndpointLoad, HashKey, LoadGuard, Outcome, Outlier, candidates,
        locality::{self, LocalityConfig, Member},
        outlier,
    },
    config::{Protocol, Upstream},
    metrics::{Direction, Metrics, RouteMetrics},
    xds::Snapshot,
};
use isdp_core::probe::Health;

pub use isdp_core::probe::PANIC_THRESHOLD;
pub use pool::{LevelView, Pool};

/// One endpoint as the data plane balances and reaches it (the discovery
/// snapshot's `xds::Endpoint`, resolved to a destination and carrying
/// its load and passive health). Shared (`Arc`) between the balancer's
/// table and the requests that picked it.
#[derive(Debug)]
pub struct LbEndpoint {
    pub id: String,
    pub dest: Dest,
    /// True when `addr` is the endpoint's sidecar (mesh traffic, mTLS:
    /// `dest.service` is set), false when the instance has no sidecar and
    /// is reached directly in plaintext.
    pub via_sidecar: bool,
    pub load: Arc<EndpointLoad>,
    /// Passive health; the balancer skips the endpoint while ejected.
    pub outlier: Arc<Outlier>,
    /// The zone it runs in (empty: none) and its failover priority, which
    /// place it in a locality level.
    pub zone: String,
    pub priority: u32,
}

/// The endpoint the balancer chose for a request, and the load it is
/// charged with; `Balance` sets it, `TraceEndpoint` reads it and
/// `Dispatch` takes it.
pub struct Picked {
    pub endpoint: Arc<LbEndpoint>,
    pub guard: LoadGuard,
    pub upstream: Arc<UpstreamLb>,
}

/// How [`Picked`] rides in a request's extensions (which must be `Clone`).
pub type PickedSlot = Arc<Mutex<Option<Picked>>>;

/// One upstream's balancing state for one endpoint-set version.
pub struct UpstreamLb {
    pub name: Arc<str>,
    /// `name` as the `x-isdp-service` value the receiving sidecar routes by.
    pub service_header: Option<HeaderValue>,
    pub protocol: Protocol,
    pub version: String,
    pub endpoints: Vec<Arc<LbEndpoint>>,
    /// True when too few endpoints are healthy and all are used.
    pub panic: bool,
    /// This upstream's request metrics; the same handles across rebuilds.
    pub metrics: Arc<RouteMetrics>,
    /// The traffic policy in force (or the defaults).
    pub policy: Arc<Compiled>,
    /// Concurrency limits; the same state across rebuilds.
    pub breaker: Arc<Breaker>,
    /// The adaptive concurrency limit (off unless the policy sets one);
    /// the same state across rebuilds, so the limit learned is kept.
    pub adaptive: Arc<Adaptive>,
    /// Retries allowed; the same window across rebuilds.
    pub budget: Arc<RetryBudget>,
    /// The caller's zone, which orders the locality levels; None: no zone.
    pub caller_zone: Option<String>,
    /// Every routable endpoint, by locality level when that applies.
    pool: Pool,
    /// By the policy's subset index.
    subsets: Vec<Pool>,
    hash_key: Option<HashKey>,
}

/// How many picks the balancer gets to find an endpoint that is neither
/// ejected nor already tried, before the candidates are scanned in order.
const PICK_TRIES: usize = 3;

impl UpstreamLb {
    /// Picks a target for a request and marks it started; the guard
    /// records the request's latency for latency-aware balancing.
    pub fn pick(
        &self,
        headers: &HeaderMap,
        source: Option<IpAddr>,
    ) -> Option<(Arc<LbEndpoint>, LoadGuard)> {
        self.pick_in(headers, source, None, &[])
    }

    /// Picks within subset `subset` (all endpoints when None, or when the
    /// subset has none), avoiding the endpoints in `avoid` (earlier tries
    /// of the same request) and ejected ones while others exist.
    pub fn pick_in(
        &self,
        headers: &HeaderMap,
        source: Option<IpAddr>,
        subset: Option<usize>,
        avoid: &[Arc<LbEndpoint>],
    ) -> Option<(Arc<LbEndpoint>, LoadGuard)> {
        let pool = match subset.and_then(|i| self.subsets.get(i)) {
            Some(s) if !s.endpoints.is_empty() => s,
            _ => &self.pool,
        };
        let hash = self.hash_key.as_ref().and_then(|k| k.hash(headers, source));
        let t = pool.choose(hash, avoid)?;
        let guard = t.load.start();
        Some((t, guard))
    }

    /// Counts one answer of `endpoint` for outlier detection, and ejects
    /// it when it has failed too often in a row (and the upstream can
    /// spare it). Returns the ejection's length when it was ejected.
    pub fn record_outcome(&self, endpoint: &LbEndpoint, outcome: Outcome) -> Option<Duration> {
        let cfg = &self.policy.outlier;
        if !endpoint.outlier.record(outcome, cfg) {
            return None;
        }
        let all: Vec<&Outlier> = self.endpoints.iter().map(|e| &*e.outlier).collect();
        let length = outlier::eject(
            &all,
            &endpoint.outlier,
            outlier::Cause::Errors,
            cfg,
            tokio::time::Instant::now(),
        )?;
        self.metrics.ejection();
        tracing::info!(upstream = %self.name, endpoint = %endpoint.id, ?length, "endpoint ejected by outlier detection");
        Some(length)
    }

    /// An upstream with no endpoints and `policy`, for layer tests.
    #[cfg(test)]
    pub fn for_test(policy: Compiled) -> Self {
        let breaker = Arc::new(Breaker::default());
        breaker.set_limits(policy.breaker);
        let adaptive = Arc::new(Adaptive::default());
        adaptive.configure(policy.adaptive, tokio::time::Instant::now());
        UpstreamLb {
            name: Arc::from("test"),
            service_header: None,
            protocol: Protocol::Http,
            version: String::new(),
            endpoints: Vec::new(),
            panic: false,
            metrics: Metrics::new().route(Direction::Outbound, "test"),
            policy: Arc::new(policy),
            breaker,
            adaptive,
            budget: Arc::new(RetryBudget::new()),
            caller_zone: None,
            pool: Pool::new(Algorithm::RoundRobin, Vec::new(), &[], None, None),
            subsets: Vec::new(),
            hash_key: None,
        }
    }

    /// Endpoints ejected by outlier detection right now.
    pub fn ejected_now(&self) -> usize {
        self.endpoints
            .iter()
            .filter(|t| t.outlier.is_ejected())
            .count()
    }

    /// The ejection state of endpoint `id` (ejected now, times ejected).
    pub fn ejection(&self, id: &str) -> Option<(bool, u32, Option<outlier::Cause>)> {
        let t = self.endpoints.iter().find(|t| t.id == id)?;
        Some((
            t.outlier.is_ejected(),
            t.outlier.ejections(),
            t.outlier.last_cause(),
        ))
    }

    /// The load state of endpoint `id`, if it is balanced now.
    pub fn load(&self, id: &str) -> Option<Arc<EndpointLoad>> {
        let t = self.endpoints.iter().find(|t| t.id == id)?;
        Some(t.load.clone())
    }

    /// Picks a target for a TCP connection: counted in flight, but its
    /// lifetime is not a latency.
    pub fn pick_connection(&self, source: Option<IpAddr>) -> Option<(Arc<LbEndpoint>, LoadGuard)> {
        let t = self.choose(&HeaderMap::new(), source)?;
        let guard = t.load.start_untimed();
        Some((t, guard))
    }

    fn choose(&self, headers: &HeaderMap, source: Option<IpAddr>) -> Option<Arc<LbEndpoint>> {
        let hash = self.hash_key.as_ref().and_then(|k| k.hash(headers, source));
        self.pool.choose(hash, &[])
    }

    pub fn algorithm(&self) -> Algorithm {
        self.pool.algorithm()
    }

    /// The locality levels of the whole upstream and their shares now;
    /// empty when locality does not apply.
    pub fn levels(&self) -> Vec<LevelView> {
        self.pool.levels()
    }

    /// The locality level endpoint `id` is balanced in.
    pub fn level_of(&self, id: &str) -> Option<usize> {
        self.pool.level_of(id)
    }

    /// Folds outlier ejections into the locality shares.
    fn refresh_locality(&self) {
        self.pool.refresh();
        for s in &self.subsets {
            s.refresh();
        }
    }
}

/// The balancer's pick unless it is ejected or avoided; then a few more
/// picks, then the first usable one in order (a ring hash keeps answering
/// the same endpoint). Ejected endpoints are skipped like unhealthy ones;
/// `max_ejection_percent` keeps enough of them in, so panic semantics stay
/// with health. If every endpoint is out, an avoided one beats an ejected
/// one, and anything beats nothing.
pub(super) fn choose(
    targets: &[Arc<LbEndpoint>],
    balancer: &Balancer,
    hash: Option<u64>,
    avoid: &[Arc<LbEndpoint>],
) -> Option<Arc<LbEndpoint>> {
    let first = balancer.pick(hash)?;
    let usable = |t: &LbEndpoint| !t.outlier.is_ejected() && !avoid.iter().any(|a| a.id == t.id);
    if usable(&targets[first]) {
        return Some(targets[first].clone());
    }
    for _ in 1..PICK_TRIES {
        let i = balancer.pick(hash)?;
        if usable(&targets[i]) {
            return Some(targets[i].clone());
        }
    }
    let n = targets.len();
    let scan = (1..n).map(|k| &targets[(first + k) % n]);
    scan.clone()
        .find(|t| usable(t))
        .or_else(|| scan.clone().find(|t| !t.outlier.is_ejected()))
        .or(Some(&targets[first]))
        .cloned()
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
    outliers: Mutex<HashMap<String, Arc<Outlier>>>,
    breakers: HashMap<String, Arc<Breaker>>,
    adaptives: HashMap<String, Arc<Adaptive>>,
    budgets: HashMap<String, Arc<RetryBudget>>,
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
                outliers: Mutex::default(),
                breakers: configs
                    .iter()
                    .map(|u| (u.name.clone(), Arc::new(Breaker::default())))
                    .collect(),
                adaptives: configs
                    .iter()
                    .map(|u| (u.name.clone(), Arc::new(Adaptive::default())))
                    .collect(),
                budgets: configs
                    .iter()
                    .map(|u| (u.name.clone(), Arc::new(RetryBudget::new())))
                    .collect(),
            }),
        };
        let first = snapshots.borrow_and_update().clone();
        upstreams.apply(&first);
        let this = upstreams.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(sweep::TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut swept = HashMap::new();
            loop {
                tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => return,
                    _ = tick.tick() => {
                        this.sweep_latency(&mut swept);
                        this.refresh_localities();
                    }
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
                let policy = snap.traffic_policies.get(name);
                let policy_version = policy.map(|p| p.version.as_str());
                if current.get(name).is_some_and(|c| {
                    c.version == version && c.policy.version.as_deref() == policy_version
                }) {
                    continue;
                }
                let compiled = match policy {
                    Some(p) => Compiled::new(&p.value, &p.version),
                    None => Compiled::defaults(),
                };
                rebuilt.push((name.clone(), self.build(cfg, snap, version, compiled)));
            }
        }
        if rebuilt.is_empty() {
            return;
        }
        let mut current = self.shared.current.write().expect("upstreams lock");
        for (name, lb) in rebuilt {
            tracing::debug!(upstream = %name, version = %lb.version, policy = ?lb.policy.version, targets = lb.endpoints.len(), panic = lb.panic, "upstream updated");
            current.insert(name, Arc::new(lb));
        }
        drop(current);
        self.forget_gone_loads(snap);
    }

    fn build(
        &self,
        cfg: &Upstream,
        snap: &Snapshot,
        version: &str,
        policy: Compiled,
    ) -> UpstreamLb {
        let endpoints = snap
            .upstreams
            .get(&cfg.name)
            .filter(|s| s.exists)
            .map(|s| s.endpoints.as_slice())
            .unwrap_or_default();
        let locality = policy
            .locality
            .clone()
            .unwrap_or_else(|| cfg.locality.clone());
        // Unknown health is routable, as in Envoy: a new instance must not
        // wait a check interval for traffic.
        let routable = |e: &&crate::xds::Endpoint| e.health != Health::Unhealthy;
        let (mut chosen, mut panic) = candidates(endpoints, |e| routable(&e), PANIC_THRESHOLD);
        // Levels come first: when the healthy endpoints of some levels
        // (a standby priority) can take all the traffic, there is no panic
        // (see `balance::locality`).
        if panic && levels_cover(&locality, cfg.caller_zone.as_deref(), endpoints) {
            chosen = endpoints.iter().filter(routable).cloned().collect();
            panic = false;
        }
        if panic && !endpoints.is_empty() {
            tracing::warn!(upstream = %cfg.name, total = endpoints.len(), "too few healthy endpoints; spreading over all of them");
        }
        // Unroutable endpoints count against their level's health; in
        // panic mode every endpoint is routable and there are no levels, as
        // health is not to be trusted then.
        let unroutable: Vec<&crate::xds::Endpoint> = if panic {
            Vec::new()
        } else {
            endpoints.iter().filter(|e| !routable(e)).collect()
        };
        let levels = (!panic).then_some(&locality);
        let caller_zone = cfg.caller_zone.as_deref();
        let name: Arc<str> = Arc::from(cfg.name.as_str());
        let mut loads = self.shared.loads.lock().expect("loads lock");
        let mut outliers = self.shared.outliers.lock().expect("outliers lock");
        let mut metadata = Vec::with_capacity(chosen.len());
        let targets: Vec<Arc<LbEndpoint>> = chosen
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
                // Kept across pushes for its latency and in-flight figures,
                // but the weight is the one just pushed (load weights move
                // it on endpoints that stay); the balancers below are built
                // from it.
                load.set_weight(e.weight.max(1));
                let outlier = outliers
                    .entry(e.id.clone())
                    .or_insert_with(Outlier::new)
                    .clone();
                metadata.push(&e.metadata);
                Some(Arc::new(LbEndpoint {
                    outlier,
                    id: e.id.clone(),
                    dest: if via_sidecar {
                        Dest::mesh(SocketAddr::new(ip, port), name.clone())
                    } else {
                        Dest::new(SocketAddr::new(ip, port))
                    },
                    via_sidecar,
                    load,
                    zone: e.zone.clone(),
                    priority: e.priority,
                }))
            })
            .collect();
        drop(loads);
        drop(outliers);
        let (algorithm, hash_key) = match &policy.lb {
            Some((a, k)) => (*a, k.clone().or_else(|| cfg.hash_key.clone())),
            None => (cfg.lb, cfg.hash_key.clone()),
        };
        let pool_of = |ts: Vec<Arc<LbEndpoint>>, down: &[(&str, u32)]| {
            Pool::new(algorithm, ts, down, levels, caller_zone)
        };
        let subsets = policy
            .subsets
            .iter()
            .map(|(_, labels)| {
                let has = |md: &BTreeMap<String, String>| {
                    labels.iter().all(|(k, v)| md.get(k) == Some(v))
                };
                let members: Vec<Arc<LbEndpoint>> = targets
                    .iter()
                    .zip(&metadata)
                    .filter(|(_, md)| has(md))
                    .map(|(t, _)| t.clone())
                    .collect();
                let down: Vec<(&str, u32)> = unroutable
                    .iter()
                    .filter(|e| has(&e.metadata))
                    .map(|e| place(e))
                    .collect();
                pool_of(members, &down)
            })
            .collect();
        let down: Vec<(&str, u32)> = unroutable.iter().map(|e| place(e)).collect();
        self.shared.breakers[&cfg.name].set_limits(policy.breaker);
        self.shared.adaptives[&cfg.name].configure(policy.adaptive, tokio::time::Instant::now());
        UpstreamLb {
            name,
            service_header: HeaderValue::from_str(&cfg.name).ok(),
            protocol: cfg.protocol,
            version: version.to_owned(),
            pool: pool_of(targets.clone(), &down),
            subsets,
            endpoints: targets,
            caller_zone: cfg.caller_zone.clone(),
            panic,
            metrics: self.shared.metrics[&cfg.name].clone(),
            policy: Arc::new(policy),
            breaker: self.shared.breakers[&cfg.name].clone(),
            adaptive: self.shared.adaptives[&cfg.name].clone(),
            budget: self.shared.budgets[&cfg.name].clone(),
            hash_key,
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
        self.shared
            .outliers
            .lock()
            .expect("outliers lock")
            .retain(|id, _| live.contains(id.as_str()));
    }
}

/// Where an endpoint sits for locality: its zone and priority.
fn place(e: &crate::xds::Endpoint) -> (&str, u32) {
    (e.zone.as_str(), e.priority)
}

/// Whether the healthy endpoints of the upstream's levels take all of
/// its traffic between them, by the overprovisioning rule.
fn levels_cover(
    config: &LocalityConfig,
    caller_zone: Option<&str>,
    endpoints: &[crate::xds::Endpoint],
) -> bool {
    let members: Vec<Member<'_>> = endpoints
        .iter()
        .map(|e| Member {
            zone: &e.zone,
            priority: e.priority,
            healthy: e.health != Health::Unhealthy,
        })
        .collect();
    locality::covers(config, caller_zone, &members)
}

mod pool;
mod sweep;
#[cfg(test)]
mod tests;
