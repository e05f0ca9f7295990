//! Endpoint assignments: the instances of one cluster, grouped into
//! localities by their `region` metadata, their zone (`Instance.zone`,
//! else the `zone` metadata) and their priority (`Instance.priority`),
//! each endpoint with the weight ISDP's sidecars get: the operator's,
//! scaled by the instance's load when load weights are on (Envoy's round
//! robin and least request honour endpoint weights; gRPC's round robin
//! honours only the locality weights they add up to).
//!
//! Priorities are compacted to 0..n in order (the ones present {0, 3}
//! become {0, 1}): gRPC and Envoy refuse an assignment whose priorities
//! have gaps. Envoy spills between them by its overprovisioning rule, as
//! ISDP's sidecars do; gRPC's priority policy moves to the next priority
//! only once one has no reachable endpoint.
//!
//! The rules are gRPC's, which Envoy shares: a locality needs a weight
//! (gRPC drops one whose weight is unset or 0), here the sum of its
//! endpoints'; an endpoint's weight is never 0 (a NACK); one address
//! appears once in a cluster (a NACK otherwise); only HEALTHY and UNKNOWN
//! endpoints take traffic. gRPC has no panic threshold: when fewer than
//! [`PANIC_THRESHOLD`] of a cluster's endpoints are routable, every
//! endpoint is sent as UNKNOWN, so a proxyless client spreads over all of
//! them as ISDP's sidecars do in panic mode; and, as for the sidecars, not
//! while its priorities' healthy endpoints can take all of its traffic
//! between them (a whole standby priority), since that would send traffic
//! back to a dead primary.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::{
    envoy::config::{
        core::v3::{Address, HealthStatus, Locality, SocketAddress, address, socket_address},
        endpoint::v3::{ClusterLoadAssignment, LbEndpoint, LocalityLbEndpoints, lb_endpoint},
    },
    google::protobuf::UInt32Value,
};
use isdp_proto::v1::{HealthStatus as Health, Instance};

use super::cluster::Transport;

use isdp_core::probe::DEFAULT_OVERPROVISIONING;
/// Below this share of routable endpoints ISDP's sidecars spread over all
/// of them; assignments say the same to clients without a panic mode.
pub use isdp_core::probe::PANIC_THRESHOLD;

/// An instance and the weight it is published with.
#[derive(Clone, Copy, Debug)]
pub struct Member<'a> {
    pub instance: &'a Instance,
    /// The operator's weight, scaled by the instance's load when load
    /// weights are on (`crate::load`): what ISDP's sidecars get too.
    pub weight: u32,
}

/// The assignment of cluster `name`: `members` (already the cluster's:
/// the service's or one subset's), reached as `transport` says.
pub fn assignment(
    name: &str,
    members: &[Member<'_>],
    transport: Transport,
) -> ClusterLoadAssignment {
    // One entry per address, the first instance (by id) holding it; a
    // duplicate is a registration mistake, and a NACK would cost the
    // client every other endpoint.
    let mut seen = BTreeSet::new();
    let mut endpoints: Vec<(&Instance, u32, u32)> = Vec::new();
    for m in members {
        let i = m.instance;
        let port = match transport {
            Transport::Mesh => i.inbound_port,
            Transport::Plaintext => i.port,
        };
        if port == 0 || !seen.insert((i.address.as_str(), port)) {
            continue;
        }
        endpoints.push((i, port, m.weight.max(1)));
    }
    fit_u32(&mut endpoints);
    let routable = endpoints
        .iter()
        .filter(|(i, ..)| i.status() != Health::Unhealthy)
        .count();
    // The priorities present, in order, each to its place: no gaps.
    let priorities: BTreeMap<u32, u32> = endpoints
        .iter()
        .map(|(i, ..)| i.priority)
        .collect::<BTreeSet<u32>>()
        .into_iter()
        .zip(0..)
        .collect();
    let panic = !endpoints.is_empty()
        && (routable as f64) < PANIC_THRESHOLD * endpoints.len() as f64
        && !priorities_cover(&endpoints);

    let mut localities: BTreeMap<(&str, &str, u32), Vec<LbEndpoint>> = BTreeMap::new();
    for (i, port, weight) in endpoints {
        // Labels are free-form; a locality is shown in Envoy's admin
        // output and logs, so only DNS labels (what `Instance.zone` must
        // be) name one.
        let meta = |k: &str| {
            i.metadata
                .get(k)
                .map(String::as_str)
                .filter(|v| isdp_core::names::check_dns_label(v).is_ok())
                .unwrap_or("")
        };
        let health = match (panic, i.status()) {
            (true, _) | (_, Health::Unknown) => HealthStatus::Unknown,
            (_, Health::Healthy) => HealthStatus::Healthy,
            (_, Health::Unhealthy) => HealthStatus::Unhealthy,
        };
        localities
            // The instance's own zone, else the older `zone` label.
            .entry((
                meta("region"),
                if i.zone.is_empty() {
                    meta("zone")
                } else {
                    i.zone.as_str()
                },
                priorities[&i.priority],
            ))
            .or_default()
            .push(LbEndpoint {
                host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(
                    envoy_types::pb::envoy::config::endpoint::v3::Endpoint {
                        address: Some(socket(&i.address, port)),
                        hostname: i.id.clone(),
                        ..Default::default()
                    },
                )),
                health_status: health as i32,
                load_balancing_weight: Some(UInt32Value { value: weight }),
                ..Default::default()
            });
    }
    ClusterLoadAssignment {
        cluster_name: name.to_owned(),
        endpoints: localities
            .into_iter()
            .map(|((region, zone, priority), lb_endpoints)| {
                let weight: u32 = lb_endpoints
                    .iter()
                    .filter_map(|e| e.load_balancing_weight.map(|w| w.value))
                    .fold(0u32, u32::saturating_add);
                LocalityLbEndpoints {
                    locality: Some(Locality {
                        region: region.to_owned(),
                        zone: zone.to_owned(),
                        ..Default::default()
                    }),
                    lb_endpoints,
                    load_balancing_weight: Some(UInt32Value {
                        value: weight.max(1),
                    }),
                    priority,
                    ..Default::default()
                }
            })
            .collect(),
        ..Default::default()
    }
}

/// Scales the weights (the last of each) down, in proportion, when their
/// sum passes `u32::MAX`: Envoy refuses a locality whose endpoint weights
/// add up to more, and gRPC one whose localities do. Load-scaled weights
/// reach 10^7 each, so a few hundred heavy endpoints could.
fn fit_u32<T>(endpoints: &mut [(T, u32, u32)]) {
    let total: u64 = endpoints.iter().map(|e| u64::from(e.2)).sum();
    let max = u64::from(u32::MAX);
    if total <= max {
        return;
    }
    for e in endpoints.iter_mut() {
        // To half the room, so raising the smallest to 1 (a weight of 0 is
        // a NACK) cannot push the sum back over.
        let scaled = u64::from(e.2) * (max / 2) / total;
        e.2 = u32::try_from(scaled).unwrap_or(u32::MAX).max(1);
    }
}

/// Whether the routable endpoints of the priorities take all the traffic
/// between them by Envoy's overprovisioning rule (each priority keeps its
/// routable share × 1.4 of what the ones before it left): then a cluster
/// under the panic threshold has a standby to fail over to, and does not
/// panic. False with one priority, where panic is as it always was.
fn priorities_cover(endpoints: &[(&Instance, u32, u32)]) -> bool {
    let mut counts: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
    for (i, ..) in endpoints {
        let (total, routable) = counts.entry(i.priority).or_default();
        *total += 1;
        *routable += u64::from(i.status() != Health::Unhealthy);
    }
    // Percent points, as Envoy counts them.
    let taken: u64 = counts
        .values()
        .map(|&(total, routable)| (routable * u64::from(DEFAULT_OVERPROVISIONING) / total).min(100))
        .sum();
    counts.len() > 1 && taken >= 100
}

fn socket(ip: &str, port: u32) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            protocol: socket_address::Protocol::Tcp as i32,
            address: ip.to_owned(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}
