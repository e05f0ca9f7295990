//! Registry + traffic policies -> the standard Envoy v3 resources, so
//! proxyless gRPC clients (`xds:///<service>`) and Envoy read the same
//! mesh, from the same ADS server and under the same authentication, as
//! ISDP's sidecars.
//!
//! Per service `S` (service names are DNS labels, so the names below
//! never collide with one another):
//! - `Listener` `S`: an API listener (what a gRPC client asks for);
//! - `RouteConfiguration` `S`: one virtual host, the policy's routes;
//! - `Cluster` `S` and `S/<subset>` for each policy subset;
//! - `ClusterLoadAssignment` `S` and `S/<subset>`.
//!
//! And for Envoy nodes, which subscribe to every listener and skip API
//! listeners: `Listener` [`ENVOY_OUTBOUND`], bound to
//! `--envoy-outbound-listen`, whose `RouteConfiguration` of the same name
//! holds every service's virtual host.
//!
//! A service is translated while it has instances or a policy. Each
//! change is rebuilt for the services it touched only, after the same
//! short debounce as `endpoints`, and published as one batch.
//!
//! # Layout
//! - `listener`: API listeners and Envoy's outbound listener.
//! - `route`: virtual hosts and routes from a policy.
//! - `cluster`: clusters, their balancer, limits and mTLS.
//! - `assignment`: endpoints by locality, health and weight (the load
//!   weights ISDP's sidecars get, followed as `endpoints` follows them).

mod assignment;
mod cluster;
mod listener;
mod route;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::Arc,
    time::Instant,
};

use bytes::Bytes;
use envoy_types::pb::{
    envoy::config::{
        cluster::v3::Cluster,
        core::v3::{AggregatedConfigSource, ApiVersion, ConfigSource, config_source},
        endpoint::v3::ClusterLoadAssignment,
        listener::v3::Listener,
        route::v3::{RouteConfiguration, VirtualHost},
    },
    google::protobuf::{Any, Duration},
};
use isdp_proto::v1::{Instance, TrafficPolicy};
use isdp_xds::{Batch, Cache};
use prost::{Message, Name};
use tokio::sync::{broadcast, watch};

pub use self::assignment::Member;
pub use self::cluster::Transport;
use crate::{
    load::{LoadFollow, LoadWeights},
    policy::{Policies, decode_all},
    registry::{Change, Registry},
};

/// The listener and route configuration Envoy nodes receive. Not a DNS
/// label, so no service can take the name.
pub const ENVOY_OUTBOUND: &str = "isdp_outbound";

/// The certificate provider instance clusters reach sidecars with: the
/// bootstrap `isdpctl bootstrap grpc` writes defines it (gRPC's
/// `file_watcher` plugin over the client's mesh certificate and roots).
pub const CERTIFICATE_PROVIDER: &str = "isdp";

pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE_CONFIGURATION: &str =
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const CLUSTER_LOAD_ASSIGNMENT: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// The type URLs of the standard resources, for the cache and for access
/// rules.
pub fn type_urls() -> [&'static str; 4] {
    [
        LISTENER,
        ROUTE_CONFIGURATION,
        CLUSTER,
        CLUSTER_LOAD_ASSIGNMENT,
    ]
}

/// The service a standard resource's name belongs to (`S` for `S` and
/// `S/<subset>`), or None for resources of no one service
/// ([`ENVOY_OUTBOUND`]).
pub fn service_of(name: &str) -> Option<&str> {
    let service = name.split_once('/').map_or(name, |(s, _)| s);
    (service != ENVOY_OUTBOUND).then_some(service)
}

/// What the translation needs beyond the registry and the policies.
#[derive(Clone, Debug)]
pub struct Settings {
    pub trust_domain: String,
    /// Where Envoy nodes listen for the mesh's services.
    pub envoy_outbound: SocketAddr,
}

/// One service's standard resources.
#[derive(Clone, Debug, PartialEq)]
pub struct Translated {
    pub listener: Listener,
    pub routes: RouteConfiguration,
    /// Its virtual host, for Envoy's route configuration too.
    pub host: VirtualHost,
    /// The service's cluster first, then one per subset.
    pub clusters: Vec<Cluster>,
    pub assignments: Vec<ClusterLoadAssignment>,
}

/// The cluster of `subset` of `service`.
pub fn subset_cluster(service: &str, subset: &str) -> String {
    format!("{service}/{subset}")
}

/// Translates one service: its instances, with their weights, under its
/// policy (the defaults without one). Instances behind a sidecar are
/// reached over mTLS at its inbound port; when a service has any, those
/// without a sidecar are left out (one cluster has one transport, and the
/// mesh's traffic goes through sidecars).
pub fn translate(
    settings: &Settings,
    service: &str,
    instances: &[Member<'_>],
    policy: Option<&TrafficPolicy>,
) -> Translated {
    let default = TrafficPolicy::default();
    let policy = policy.unwrap_or(&default);
    let transport = if instances.iter().any(|m| m.instance.inbound_port != 0) {
        Transport::Mesh
    } else {
        Transport::Plaintext
    };
    let mut clusters = vec![(service.to_owned(), instances.to_vec())];
    for subset in &policy.subsets {
        let members = instances
            .iter()
            .copied()
            .filter(|m| {
                subset
                    .labels
                    .iter()
                    .all(|(k, v)| m.instance.metadata.get(k) == Some(v))
            })
            .collect();
        clusters.push((subset_cluster(service, &subset.name), members));
    }
    let host = route::virtual_host(service, policy);
    Translated {
        listener: listener::api(service),
        routes: route::configuration(service, policy),
        host,
        assignments: clusters
            .iter()
            .map(|(name, members)| assignment::assignment(name, members, transport))
            .collect(),
        clusters: clusters
            .iter()
            .map(|(name, _)| {
                cluster::cluster(name, service, policy, transport, &settings.trust_domain)
            })
            .collect(),
    }
}

/// Packs a message for a typed field.
fn any<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

/// "Over the ADS stream this resource came on", in v3.
fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

fn duration(ms: u64) -> Duration {
    Duration {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// Services translated into one batch when many change at once (startup,
/// a registry resync): the cache takes them a part at a time, so the
/// encoded resources of the whole mesh are never held twice over.
const REBUILD_CHUNK: usize = 256;

/// The running translation: what is published per service, so a dropped
/// subset or service is removed, and Envoy's routes are rebuilt from
/// virtual hosts already made.
struct Publisher {
    settings: Settings,
    registry: Registry,
    /// The endpoints' weights, the same ISDP's sidecars get.
    weights: LoadWeights,
    cache: Cache,
    /// Per service: its cluster names and its virtual host, encoded (the
    /// form Envoy's route configuration is assembled from, and a tenth of
    /// the decoded message's size).
    published: BTreeMap<String, (Vec<String>, Bytes)>,
    policies: BTreeMap<String, TrafficPolicy>,
}

impl Publisher {
    fn rebuild<'a>(&mut self, services: impl IntoIterator<Item = &'a str>, changed_at: Instant) {
        let mut batch = Batch::new();
        let mut hosts_changed = false;
        for (n, service) in services.into_iter().enumerate() {
            if n > 0 && n % REBUILD_CHUNK == 0 {
                self.cache.apply_at(std::mem::take(&mut batch), changed_at);
            }
            hosts_changed |= self.service(&mut batch, service);
        }
        // Envoy's route configuration holds every service's virtual host:
        // most changes (endpoints, health, weights) leave the hosts as they
        // are, and with thousands of services rebuilding it for each would
        // cost more than the change itself.
        if hosts_changed {
            let routes = route::envoy_outbound_encoded(self.published.values().map(|(_, h)| h));
            batch.set_raw(&RouteConfiguration::type_url(), ENVOY_OUTBOUND, routes);
        }
        self.cache.apply_at(batch, changed_at);
    }

    /// Translates one service into `batch`; true when its virtual host
    /// (Envoy's outbound routes) changed, appeared or went.
    fn service(&mut self, batch: &mut Batch, service: &str) -> bool {
        let stored = self.registry.instances(service);
        let instances: Vec<&Instance> = stored.iter().map(|s| &s.instance).collect();
        let members: Vec<Member<'_>> = instances
            .iter()
            .zip(self.weights.weigh(&instances))
            .map(|(instance, w)| Member {
                instance,
                weight: w.weight,
            })
            .collect();
        let policy = self.policies.get(service);
        let (before, host_before) = match self.published.remove(service) {
            Some((c, h)) => (c, Some(h)),
            None => (Vec::new(), None),
        };
        if instances.is_empty() && policy.is_none() {
            batch.remove::<Listener>(service);
            batch.remove::<RouteConfiguration>(service);
            for c in &before {
                batch.remove::<Cluster>(c);
                batch.remove::<ClusterLoadAssignment>(c);
            }
            return host_before.is_some();
        }
        let t = translate(&self.settings, service, &members, policy);
        batch.set(service, &t.listener);
        batch.set(service, &t.routes);
        let names: Vec<String> = t.clusters.iter().map(|c| c.name.clone()).collect();
        for c in &t.clusters {
            batch.set(&c.name, c);
        }
        for a in &t.assignments {
            batch.set(&a.cluster_name, a);
        }
        for gone in before.iter().filter(|c| !names.contains(c)) {
            batch.remove::<Cluster>(gone);
            batch.remove::<ClusterLoadAssignment>(gone);
        }
        let host = Bytes::from(t.host.encode_to_vec());
        let changed = host_before.as_ref() != Some(&host);
        self.published.insert(service.to_owned(), (names, host));
        changed
    }

    /// Every service registered, with a policy, or published.
    fn everything(&self) -> BTreeSet<String> {
        let mut all: BTreeSet<String> = self.registry.services().into_keys().collect();
        all.extend(self.policies.keys().cloned());
        all.extend(self.published.keys().cloned());
        all
    }

    /// Takes the current policies; returns the services whose policy
    /// changed.
    fn take_policies(&mut self, current: BTreeMap<String, TrafficPolicy>) -> BTreeSet<String> {
        let mut changed: BTreeSet<String> = BTreeSet::new();
        for (s, p) in &current {
            if self.policies.get(s) != Some(p) {
                changed.insert(s.clone());
            }
        }
        changed.extend(
            self.policies
                .keys()
                .filter(|s| !current.contains_key(*s))
                .cloned(),
        );
        self.policies = current;
        changed
    }
}

fn policies_of(
    policies: &watch::Receiver<Arc<crate::store::follow::Entries>>,
) -> BTreeMap<String, TrafficPolicy> {
    decode_all(&policies.borrow())
        .into_iter()
        .map(|(s, p)| (s, p.policy.unwrap_or_default()))
        .collect()
}

/// Publishes every service now, then follows the registry, the policies
/// and the load summaries until shutdown.
pub fn spawn(
    settings: Settings,
    registry: Registry,
    policies: Policies,
    weights: LoadWeights,
    cache: Cache,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let mut changes = registry.subscribe();
    let mut policy_changes = policies.subscribe();
    let mut loads = LoadFollow::new(&weights);
    cache.set(
        ENVOY_OUTBOUND,
        &listener::envoy_outbound(settings.envoy_outbound),
    );
    // Envoy's routes exist from the start, empty in an empty mesh;
    // `rebuild` replaces them as virtual hosts change.
    cache.set(ENVOY_OUTBOUND, &route::envoy_outbound(std::iter::empty()));
    let mut p = Publisher {
        settings,
        registry,
        weights,
        cache,
        published: BTreeMap::new(),
        policies: BTreeMap::new(),
    };
    p.take_policies(policies_of(&policy_changes));
    policy_changes.mark_unchanged();
    let all = p.everything();
    p.rebuild(all.iter().map(String::as_str), Instant::now());
    tokio::spawn(async move {
        loop {
            let mut dirty: BTreeSet<String> = BTreeSet::new();
            let mut all = false;
            let mut note = |c: Result<Change, broadcast::error::RecvError>,
                            dirty: &mut BTreeSet<String>| match c {
                Ok(Change::Service(s)) => {
                    dirty.insert(s.to_string());
                    true
                }
                Ok(Change::All) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    all = true;
                    true
                }
                Err(broadcast::error::RecvError::Closed) => false,
            };
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                c = changes.recv() => if !note(c, &mut dirty) { return },
                r = policy_changes.changed() => {
                    if r.is_err() { return }
                    dirty.extend(p.take_policies(policies_of(&policy_changes)));
                }
                ids = LoadFollow::next(&mut loads) => {
                    // Weights change only with a summary, at most every
                    // few seconds per instance: no debounce needed.
                    let services: BTreeSet<String> = ids
                        .iter()
                        .filter_map(|id| p.registry.get(id).map(|s| s.instance.service.clone()))
                        .collect();
                    if !services.is_empty() {
                        p.rebuild(services.iter().map(String::as_str), Instant::now());
                    }
                    continue;
                }
            }
            let changed_at = Instant::now();
            let deadline = tokio::time::sleep(super::endpoints::DEBOUNCE);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    _ = &mut deadline => break,
                    c = changes.recv() => if !note(c, &mut dirty) { return },
                    r = policy_changes.changed() => {
                        if r.is_err() { return }
                        dirty.extend(p.take_policies(policies_of(&policy_changes)));
                    }
                }
            }
            if all {
                dirty = p.everything();
            }
            p.rebuild(dirty.iter().map(String::as_str), changed_at);
        }
    })
}
