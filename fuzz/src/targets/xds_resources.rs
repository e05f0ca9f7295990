//! What the sidecar's xDS client does with a delta response: decode each
//! `Any` into its resource type, check it, and apply the response to what
//! it holds (`xds::apply` for endpoints, `xds::security::apply` for the
//! trust bundle, authorization and traffic policies), then compile what
//! the data plane reads (authorization and traffic policies).
//!
//! The first byte picks the shape: a typed resource whose body is the
//! rest (named after what it holds, so the checks past the name run), or
//! the rest as a whole `DeltaDiscoveryResponse`.

use std::collections::BTreeSet;

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
use envoy_types::pb::google::protobuf::Any;
use isdp_proto::v1::{
    AUTHORIZATION_POLICY_TYPE_URL, AuthorizationPolicy, SERVICE_ENDPOINTS_TYPE_URL,
    ServiceEndpoints, TRAFFIC_POLICY_TYPE_URL, TRUST_BUNDLE_NAME, TRUST_BUNDLE_TYPE_URL,
    TrafficPolicy, TrustBundle,
};
use isdp_sidecar::authz::{Call, Policy};
use isdp_sidecar::proxy::policy::Compiled;
use isdp_sidecar::xds::{self, security};
use prost::Message;

use super::Target;

pub const TARGET: Target = Target {
    name: "xds_resources",
    run,
    dictionary: &[
        b"\x08", b"\x0a", b"\x10", b"\x12", b"\x18", b"\x1a", b"\x20", b"\x22",
    ],
    seeds,
};

const TYPES: [&str; 4] = [
    SERVICE_ENDPOINTS_TYPE_URL,
    TRUST_BUNDLE_TYPE_URL,
    AUTHORIZATION_POLICY_TYPE_URL,
    TRAFFIC_POLICY_TYPE_URL,
];

pub fn run(data: &[u8]) {
    let Some((&shape, rest)) = data.split_first() else {
        return;
    };
    let response = match TYPES.get(usize::from(shape % 8)) {
        Some(type_url) => typed(type_url, rest),
        None => match DeltaDiscoveryResponse::decode(rest) {
            Ok(r) => r,
            Err(_) => return,
        },
    };
    let names: BTreeSet<String> = response
        .resources
        .iter()
        .map(|r| r.name.clone())
        .chain(response.removed_resources.iter().cloned())
        .collect();
    apply(&response, &names);
}

/// A response of one resource of `type_url` whose body is `body`.
fn typed(type_url: &str, body: &[u8]) -> DeltaDiscoveryResponse {
    let name = match type_url {
        SERVICE_ENDPOINTS_TYPE_URL => ServiceEndpoints::decode(body).map(|e| e.service),
        AUTHORIZATION_POLICY_TYPE_URL => AuthorizationPolicy::decode(body).map(|p| p.destination),
        TRAFFIC_POLICY_TYPE_URL => TrafficPolicy::decode(body).map(|p| p.service),
        _ => Ok(TRUST_BUNDLE_NAME.to_owned()),
    }
    .unwrap_or_default();
    DeltaDiscoveryResponse {
        type_url: type_url.to_owned(),
        nonce: "1".into(),
        resources: vec![Resource {
            name,
            version: "1".into(),
            resource: Some(Any {
                type_url: type_url.to_owned(),
                value: body.to_vec(),
            }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Every applier, as the client picks by type URL (endpoints take the
/// rest), then what the data plane compiles from the result.
fn apply(response: &DeltaDiscoveryResponse, names: &BTreeSet<String>) {
    match response.type_url.as_str() {
        TRUST_BUNDLE_TYPE_URL => {
            let _ = security::apply::<TrustBundle>(&Default::default(), names, response);
        }
        AUTHORIZATION_POLICY_TYPE_URL => {
            let held = security::apply::<AuthorizationPolicy>(&Default::default(), names, response);
            for p in held.ok().flatten().unwrap_or_default().values() {
                let policy = Policy::compile(&p.value);
                let call = Call {
                    source: Some("spiffe://mesh.test/svc/web"),
                    method: Some("GET"),
                    path: Some("/a/b"),
                };
                let _ = policy.decide(call);
            }
        }
        TRAFFIC_POLICY_TYPE_URL => {
            let held = security::apply::<TrafficPolicy>(&Default::default(), names, response);
            for p in held.ok().flatten().unwrap_or_default().values() {
                let _ = Compiled::new(&p.value, &p.version);
            }
        }
        _ => {
            let _ = xds::apply(&Default::default(), names, response);
        }
    }
}

/// One valid resource of each type, as the control plane sends them.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use isdp_proto::v1::{
        AuthzRule, CircuitBreaker, Endpoint, FaultInjection, LoadBalancer, RetryPolicy, Route,
        RouteMatch, Subset, WeightedSubset,
    };
    let endpoints = ServiceEndpoints {
        service: "payments".into(),
        endpoints: vec![Endpoint {
            instance_id: "node-1.payments".into(),
            address: "10.0.0.7".into(),
            port: 8080,
            inbound_port: 15006,
            weight: 10,
            metadata: [("version".to_string(), "v1".to_string())].into(),
            ..Default::default()
        }],
    };
    let authz = AuthorizationPolicy {
        destination: "payments".into(),
        default_action: 2,
        rules: vec![AuthzRule {
            name: "web-reads".into(),
            sources: vec!["web".into()],
            methods: vec!["GET".into()],
            action: 1,
            path_prefix: "/api".into(),
            ..Default::default()
        }],
        trust_domain: "mesh.test".into(),
    };
    let traffic = TrafficPolicy {
        service: "payments".into(),
        retries: Some(RetryPolicy {
            attempts: 2,
            ..Default::default()
        }),
        circuit_breaker: Some(CircuitBreaker {
            max_requests: 100,
            ..Default::default()
        }),
        load_balancer: Some(LoadBalancer {
            algorithm: "ring_hash".into(),
            hash_key: "header:x-user".into(),
        }),
        subsets: vec![Subset {
            name: "v1".into(),
            labels: [("version".to_string(), "v1".to_string())].into(),
        }],
        split: vec![WeightedSubset {
            subset: "v1".into(),
            weight: 100,
        }],
        routes: vec![Route {
            name: "api".into(),
            r#match: Some(RouteMatch {
                path_prefix: "/api".into(),
                ..Default::default()
            }),
            fault: Some(FaultInjection {
                abort_percent: 1.0,
                abort_status: 503,
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    let bundle = TrustBundle {
        trust_domain: "mesh.test".into(),
        roots_der: vec![self_signed_der()],
        ..Default::default()
    };
    let tagged = |shape: u8, body: Vec<u8>| [vec![shape], body].concat();
    let whole = typed(SERVICE_ENDPOINTS_TYPE_URL, &endpoints.encode_to_vec());
    vec![
        ("endpoints", tagged(0, endpoints.encode_to_vec())),
        ("trust_bundle", tagged(1, bundle.encode_to_vec())),
        ("authorization_policy", tagged(2, authz.encode_to_vec())),
        ("traffic_policy", tagged(3, traffic.encode_to_vec())),
        ("delta_response", tagged(4, whole.encode_to_vec())),
    ]
}

/// A CA certificate as a trust bundle root.
fn self_signed_der() -> Vec<u8> {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.self_signed(&key).expect("certificate").der().to_vec()
}
