//! Clusters: one per service and one per policy subset, each of type EDS
//! with its endpoints over ADS under its own name.
//!
//! Every setting is one both gRPC and Envoy accept (a client NACKs a
//! whole response over one field it refuses): the balancer is
//! `lb_policy` ROUND_ROBIN or RING_HASH, or a `load_balancing_policy`
//! list whose first entry Envoy has and whose last gRPC has; circuit
//! breaking is the DEFAULT-priority thresholds (gRPC reads
//! `max_requests`); outlier detection is the consecutive-error form,
//! which Envoy applies and gRPC (success-rate and failure-percentage only,
//! gRFC A50) leaves alone, with success-rate ejection switched off
//! explicitly since both would otherwise turn it on by default.

use std::collections::HashMap;

use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3::{
                CircuitBreakers, Cluster, LoadBalancingPolicy, OutlierDetection,
                circuit_breakers::Thresholds, cluster, load_balancing_policy,
            },
            core::v3::{TransportSocket, TypedExtensionConfig, transport_socket},
        },
        extensions::{
            load_balancing_policies::{
                least_request::v3::LeastRequest, random::v3::Random, round_robin::v3::RoundRobin,
                wrr_locality::v3::WrrLocality,
            },
            transport_sockets::tls::v3::{
                CertificateProviderPluginInstance, CertificateValidationContext, CommonTlsContext,
                UpstreamTlsContext, common_tls_context,
            },
            upstreams::http::v3::{HttpProtocolOptions, http_protocol_options},
        },
        r#type::matcher::v3::{StringMatcher, string_matcher},
    },
    google::protobuf::{Any, UInt32Value},
};
use isdp_proto::v1::TrafficPolicy;

use super::{CERTIFICATE_PROVIDER, ads, any, duration};

/// How a cluster's endpoints are reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Instances without a sidecar, at their own port.
    Plaintext,
    /// Instances behind a sidecar, at its inbound port, over mTLS
    /// presenting the client's mesh certificate and checking the
    /// service's SPIFFE ID (gRFC A29).
    Mesh,
}

/// The cluster `name` (the service's, or one of its subsets') of
/// `service` under `policy`.
pub fn cluster(
    name: &str,
    service: &str,
    policy: &TrafficPolicy,
    transport: Transport,
    trust_domain: &str,
) -> Cluster {
    let (lb_policy, load_balancing_policy) = balancer(policy);
    let mut c = Cluster {
        name: name.to_owned(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: name.to_owned(),
        }),
        lb_policy: lb_policy as i32,
        load_balancing_policy,
        connect_timeout: policy
            .timeouts
            .as_ref()
            .map(|t| t.connect_ms)
            .filter(|ms| *ms > 0)
            .map(duration),
        circuit_breakers: policy.circuit_breaker.as_ref().map(circuit_breakers),
        outlier_detection: policy.outlier_detection.as_ref().map(outlier_detection),
        ..Default::default()
    };
    if transport == Transport::Mesh {
        c.transport_socket = Some(mesh_tls(service, trust_domain));
    }
    c.typed_extension_protocol_options = protocol_options(transport);
    c
}

/// ISDP's balancer as the nearest each client has: gRPC has only round
/// robin and ring hash; Maglev becomes ring hash (both hash consistently);
/// least request, peak EWMA, load aware and random become Envoy's least request or
/// random and gRPC's round robin, through a `load_balancing_policy` list
/// (each client takes the first entry it knows).
fn balancer(policy: &TrafficPolicy) -> (cluster::LbPolicy, Option<LoadBalancingPolicy>) {
    let algorithm = policy
        .load_balancer
        .as_ref()
        .map_or("", |l| l.algorithm.as_str());
    let preferred = match algorithm {
        "ring_hash" | "maglev" => return (cluster::LbPolicy::RingHash, None),
        "least_request" | "peak_ewma" | "load_aware" => extension(
            "envoy.load_balancing_policies.least_request",
            &LeastRequest::default(),
        ),
        "random" => extension("envoy.load_balancing_policies.random", &Random::default()),
        _ => return (cluster::LbPolicy::RoundRobin, None),
    };
    let round_robin = WrrLocality {
        endpoint_picking_policy: Some(LoadBalancingPolicy {
            policies: vec![extension(
                "envoy.load_balancing_policies.round_robin",
                &RoundRobin::default(),
            )],
        }),
    };
    let list = LoadBalancingPolicy {
        policies: vec![
            preferred,
            extension("envoy.load_balancing_policies.wrr_locality", &round_robin),
        ],
    };
    (cluster::LbPolicy::RoundRobin, Some(list))
}

fn extension<M: prost::Name>(name: &str, config: &M) -> load_balancing_policy::Policy {
    load_balancing_policy::Policy {
        typed_extension_config: Some(TypedExtensionConfig {
            name: name.to_owned(),
            typed_config: Some(any(config)),
        }),
    }
}

fn circuit_breakers(cb: &isdp_proto::v1::CircuitBreaker) -> CircuitBreakers {
    let limit = |n: u32| (n > 0).then_some(UInt32Value { value: n });
    CircuitBreakers {
        thresholds: vec![Thresholds {
            priority: 0, // DEFAULT
            max_connections: limit(cb.max_connections),
            max_pending_requests: limit(cb.max_pending_requests),
            max_requests: limit(cb.max_requests),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn outlier_detection(od: &isdp_proto::v1::OutlierDetection) -> OutlierDetection {
    let n = |v: u32| (v > 0).then_some(UInt32Value { value: v });
    let gateway = n(od.consecutive_gateway_errors);
    OutlierDetection {
        consecutive_5xx: n(od.consecutive_5xx),
        consecutive_gateway_failure: gateway,
        // Envoy enforces gateway failures only when told to.
        enforcing_consecutive_gateway_failure: gateway.map(|_| UInt32Value { value: 100 }),
        // Both default to success-rate ejection, which ISDP's policies do
        // not ask for.
        enforcing_success_rate: Some(UInt32Value { value: 0 }),
        interval: (od.interval_ms > 0).then(|| duration(od.interval_ms)),
        base_ejection_time: (od.base_ejection_ms > 0).then(|| duration(od.base_ejection_ms)),
        max_ejection_percent: (od.max_ejection_percent > 0).then_some(UInt32Value {
            value: od.max_ejection_percent.min(100),
        }),
        ..Default::default()
    }
}

/// mTLS to a sidecar's inbound port: the client's certificate and the
/// mesh roots from the bootstrap's certificate provider
/// ([`CERTIFICATE_PROVIDER`], written by `isdpctl bootstrap grpc`), the
/// server's SPIFFE ID checked, and the SNI the sidecar picks the
/// service's certificate by.
fn mesh_tls(service: &str, trust_domain: &str) -> TransportSocket {
    let provider = || CertificateProviderPluginInstance {
        instance_name: CERTIFICATE_PROVIDER.to_owned(),
        certificate_name: String::new(),
    };
    let spiffe = isdp_core::names::service_spiffe_id(trust_domain, service);
    // The untyped SAN matchers are the form gRPC reads (gRFC A29); Envoy
    // reads them too, against every SAN.
    #[allow(deprecated)]
    let validation = CertificateValidationContext {
        ca_certificate_provider_instance: Some(provider()),
        match_subject_alt_names: vec![StringMatcher {
            match_pattern: Some(string_matcher::MatchPattern::Exact(spiffe)),
            ignore_case: false,
        }],
        ..Default::default()
    };
    let tls = UpstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_provider_instance: Some(provider()),
            validation_context_type: Some(
                common_tls_context::ValidationContextType::ValidationContext(validation),
            ),
            ..Default::default()
        }),
        sni: isdp_core::names::server_name(trust_domain, service),
        ..Default::default()
    };
    TransportSocket {
        name: "envoy.transport_sockets.tls".to_owned(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(any(&tls))),
    }
}

/// Which HTTP version Envoy speaks upstream (gRPC ignores this): over mTLS
/// the one ALPN agrees with the sidecar, in plaintext the caller's, so
/// gRPC through Envoy stays HTTP/2.
fn protocol_options(transport: Transport) -> HashMap<String, Any> {
    let choice = match transport {
        Transport::Mesh => {
            http_protocol_options::UpstreamProtocolOptions::AutoConfig(Default::default())
        }
        Transport::Plaintext => {
            http_protocol_options::UpstreamProtocolOptions::UseDownstreamProtocolConfig(
                Default::default(),
            )
        }
    };
    let options = HttpProtocolOptions {
        upstream_protocol_options: Some(choice),
        ..Default::default()
    };
    HashMap::from([(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_owned(),
        any(&options),
    )])
}
