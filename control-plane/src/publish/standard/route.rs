//! Routes: one virtual host per service (domains `<service>` and
//! `<service>:*`), holding the traffic policy's routes in order and then
//! the policy's defaults for everything else.
//!
//! Where gRPC and Envoy read a setting differently, both are written:
//! the request timeout is `max_stream_duration` (gRPC ignores
//! `RouteAction.timeout`) and `timeout` (Envoy's per-request timer, set to
//! 0, which disables Envoy's 15 s default, when the policy sets none, as
//! ISDP's sidecars apply none). Retries name gRPC status codes (all gRPC
//! reads) beside the HTTP conditions Envoy reads. Fault injection is not
//! translated: it needs the fault filter in every connection manager.

use bytes::Bytes;
use envoy_types::pb::{
    envoy::{
        config::route::v3::{
            HeaderMatcher, RetryPolicy, Route, RouteAction, RouteConfiguration, RouteMatch,
            VirtualHost, WeightedCluster, header_matcher,
            retry_policy::RetryBackOff,
            route, route_action,
            route_action::{HashPolicy, MaxStreamDuration, hash_policy},
            route_match, weighted_cluster,
        },
        r#type::matcher::v3::{StringMatcher, string_matcher},
    },
    google::protobuf::UInt32Value,
};
use isdp_proto::v1::{self as isdp, TrafficPolicy, WeightedSubset};

use super::{duration, subset_cluster};

/// The routes a gRPC client of `service` follows.
pub fn configuration(service: &str, policy: &TrafficPolicy) -> RouteConfiguration {
    RouteConfiguration {
        name: service.to_owned(),
        virtual_hosts: vec![virtual_host(service, policy)],
        ..Default::default()
    }
}

/// Envoy's routes: every service's virtual host, chosen by `Host`.
pub fn envoy_outbound<'a>(hosts: impl IntoIterator<Item = &'a VirtualHost>) -> RouteConfiguration {
    RouteConfiguration {
        name: super::ENVOY_OUTBOUND.to_owned(),
        virtual_hosts: hosts.into_iter().cloned().collect(),
        ..Default::default()
    }
}

/// [`envoy_outbound`] assembled from virtual hosts already encoded, as
/// the publisher keeps them: the same bytes prost would write (field 1 the
/// name, field 2 each host), without decoding a host again.
pub fn envoy_outbound_encoded<'a>(hosts: impl IntoIterator<Item = &'a Bytes>) -> Bytes {
    use prost::encoding::{WireType, encode_key, encode_varint, string};
    let mut out = Vec::new();
    string::encode(1, &super::ENVOY_OUTBOUND.to_owned(), &mut out);
    for host in hosts {
        encode_key(2, WireType::LengthDelimited, &mut out);
        encode_varint(host.len() as u64, &mut out);
        out.extend_from_slice(host);
    }
    Bytes::from(out)
}

/// The service's virtual host: its policy's routes, then the default.
pub fn virtual_host(service: &str, policy: &TrafficPolicy) -> VirtualHost {
    let hash = hash_policy(policy);
    let mut routes: Vec<Route> = policy
        .routes
        .iter()
        .map(|r| Route {
            name: r.name.clone(),
            r#match: Some(matcher(r.r#match.as_ref())),
            action: Some(route::Action::Route(action(
                service,
                if r.split.is_empty() {
                    &policy.split
                } else {
                    &r.split
                },
                r.retries.as_ref().or(policy.retries.as_ref()),
                r.timeouts.as_ref().or(policy.timeouts.as_ref()),
                &hash,
            ))),
            ..Default::default()
        })
        .collect();
    routes.push(Route {
        name: "default".to_owned(),
        r#match: Some(matcher(None)),
        action: Some(route::Action::Route(action(
            service,
            &policy.split,
            policy.retries.as_ref(),
            policy.timeouts.as_ref(),
            &hash,
        ))),
        ..Default::default()
    });
    VirtualHost {
        name: service.to_owned(),
        domains: vec![service.to_owned(), format!("{service}:*")],
        routes,
        ..Default::default()
    }
}

/// A policy route's match: its path prefix (`/` when empty), its headers
/// exactly, and its method as the `:method` header (Envoy matches it;
/// gRPC matches no pseudo-header, so a route naming a method never takes
/// a proxyless call, every gRPC call being a POST anyway).
fn matcher(m: Option<&isdp::RouteMatch>) -> RouteMatch {
    let exact = |name: &str, value: &str| HeaderMatcher {
        name: name.to_owned(),
        header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(
            StringMatcher {
                match_pattern: Some(string_matcher::MatchPattern::Exact(value.to_owned())),
                ignore_case: false,
            },
        )),
        ..Default::default()
    };
    let prefix = m
        .map(|m| m.path_prefix.as_str())
        .filter(|p| !p.is_empty())
        .unwrap_or("/");
    let mut headers: Vec<HeaderMatcher> = m
        .map(|m| {
            let mut h: Vec<_> = m.headers.iter().collect();
            h.sort();
            h.into_iter().map(|(k, v)| exact(k, v)).collect()
        })
        .unwrap_or_default();
    if let Some(method) = m.map(|m| m.method.as_str()).filter(|m| !m.is_empty()) {
        headers.push(exact(":method", method));
    }
    RouteMatch {
        path_specifier: Some(route_match::PathSpecifier::Prefix(prefix.to_owned())),
        headers,
        ..Default::default()
    }
}

fn action(
    service: &str,
    split: &[WeightedSubset],
    retries: Option<&isdp::RetryPolicy>,
    timeouts: Option<&isdp::Timeouts>,
    hash: &[HashPolicy],
) -> RouteAction {
    // A weight of 0 is left out: gRPC refuses a split whose weights sum
    // to 0, and an entry that takes nothing changes nothing.
    let weighted: Vec<weighted_cluster::ClusterWeight> = split
        .iter()
        .filter(|w| w.weight > 0)
        .map(|w| weighted_cluster::ClusterWeight {
            name: subset_cluster(service, &w.subset),
            weight: Some(UInt32Value { value: w.weight }),
            ..Default::default()
        })
        .collect();
    let cluster_specifier = if weighted.is_empty() {
        route_action::ClusterSpecifier::Cluster(service.to_owned())
    } else {
        route_action::ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: weighted,
            ..Default::default()
        })
    };
    let request_ms = timeouts.map_or(0, |t| t.request_ms);
    RouteAction {
        cluster_specifier: Some(cluster_specifier),
        timeout: Some(duration(request_ms)),
        max_stream_duration: (request_ms > 0).then(|| MaxStreamDuration {
            max_stream_duration: Some(duration(request_ms)),
            ..Default::default()
        }),
        retry_policy: retries
            .filter(|r| r.attempts > 0)
            .map(|r| retry_policy(r, timeouts)),
        hash_policy: hash.to_vec(),
        ..Default::default()
    }
}

/// gRPC status codes both gRPC (gRFC A44) and Envoy retry on, spelled as
/// ISDP's policies and both clients spell them. ISDP's sidecars also
/// retry `unknown` and `aborted`; these clients cannot.
const GRPC_RETRY_CODES: [&str; 5] = [
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

fn retry_policy(r: &isdp::RetryPolicy, timeouts: Option<&isdp::Timeouts>) -> RetryPolicy {
    let mut on: Vec<String> = r
        .retry_on
        .iter()
        .filter(|c| *c != "retriable-grpc-codes")
        .cloned()
        .collect();
    if r.retry_on.iter().any(|c| c == "retriable-grpc-codes") {
        on.extend(
            r.grpc_codes
                .iter()
                .filter(|c| GRPC_RETRY_CODES.contains(&c.as_str()))
                .cloned(),
        );
    }
    let back_off = (r.backoff_base_ms > 0).then(|| RetryBackOff {
        base_interval: Some(duration(r.backoff_base_ms)),
        // gRPC refuses a maximum below the base.
        max_interval: (r.backoff_max_ms >= r.backoff_base_ms).then(|| duration(r.backoff_max_ms)),
    });
    RetryPolicy {
        retry_on: on.join(","),
        num_retries: Some(UInt32Value { value: r.attempts }),
        per_try_timeout: timeouts
            .map(|t| t.per_try_ms)
            .filter(|ms| *ms > 0)
            .map(duration),
        retry_back_off: back_off,
        retriable_status_codes: r.status_codes.clone(),
        ..Default::default()
    }
}

/// The policy's hash key for ring hash and Maglev: a header (gRPC and
/// Envoy), a cookie or the source address (Envoy only; gRPC skips hash
/// policies it cannot apply).
fn hash_policy(policy: &TrafficPolicy) -> Vec<HashPolicy> {
    let Some(key) = policy.load_balancer.as_ref().map(|l| l.hash_key.as_str()) else {
        return Vec::new();
    };
    let specifier = if let Some(name) = key.strip_prefix("header:") {
        hash_policy::PolicySpecifier::Header(hash_policy::Header {
            header_name: name.to_owned(),
            ..Default::default()
        })
    } else if let Some(name) = key.strip_prefix("cookie:") {
        hash_policy::PolicySpecifier::Cookie(hash_policy::Cookie {
            name: name.to_owned(),
            ..Default::default()
        })
    } else if key == "source_ip" {
        hash_policy::PolicySpecifier::ConnectionProperties(hash_policy::ConnectionProperties {
            source_ip: true,
        })
    } else {
        return Vec::new();
    };
    vec![HashPolicy {
        policy_specifier: Some(specifier),
        terminal: false,
    }]
}
