//! The translation checked against what gRPC's xDS client (gRFCs A27,
//! A28, A29, A31, A32, A42, A44, A50) and Envoy's validation rules accept:
//! a response with one refused resource is NACKed whole, so every rule a
//! client enforces is asserted here.

use std::collections::{BTreeSet, HashMap};

use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3::{Cluster, cluster},
            core::v3::{HealthStatus, address, config_source, socket_address},
            endpoint::v3::{ClusterLoadAssignment, lb_endpoint},
            listener::v3::{Listener, filter},
            route::v3::{RouteConfiguration, route, route_action},
        },
        extensions::{
            filters::network::http_connection_manager::v3::{
                HttpConnectionManager, http_connection_manager, http_filter,
            },
            transport_sockets::tls::v3::{UpstreamTlsContext, common_tls_context},
        },
    },
    google::protobuf::Any,
};
use isdp_proto::v1::{
    CircuitBreaker, HealthStatus as Health, Instance, LoadBalancer, OutlierDetection, RetryPolicy,
    Route, RouteMatch, Subset, Timeouts, TrafficPolicy, WeightedSubset,
};
use prost::{Message, Name};

use super::*;

fn settings() -> Settings {
    Settings {
        trust_domain: "isdp.local".into(),
        envoy_outbound: "127.0.0.1:15001".parse().unwrap(),
    }
}

fn instance(id: &str, port: u32, status: Health) -> Instance {
    Instance {
        id: id.into(),
        service: "echo".into(),
        address: "127.0.0.1".into(),
        port,
        status: status as i32,
        ..Default::default()
    }
}

fn labelled(mut i: Instance, labels: &[(&str, &str)]) -> Instance {
    i.metadata = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    i
}

fn unpack<M: Message + Name + Default>(a: &Any) -> M {
    assert_eq!(a.type_url, M::type_url());
    M::decode(a.value.as_slice()).unwrap()
}

/// Translates `instances` with their operators' weights.
fn translate_all(instances: &[Instance], policy: Option<&TrafficPolicy>) -> Translated {
    let members: Vec<Member<'_>> = instances
        .iter()
        .map(|instance| Member {
            instance,
            weight: instance.weight,
        })
        .collect();
    translate(&settings(), "echo", &members, policy)
}

fn endpoints(a: &ClusterLoadAssignment) -> Vec<(String, u32, HealthStatus)> {
    a.endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .map(|e| {
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                panic!("an endpoint")
            };
            let Some(address::Address::SocketAddress(sa)) =
                ep.address.as_ref().and_then(|a| a.address.as_ref())
            else {
                panic!("a socket address")
            };
            let Some(socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier else {
                panic!("a port")
            };
            (ep.hostname.clone(), port, e.health_status())
        })
        .collect()
}

/// What gRPC checks of a listener (A27): an API listener holding a
/// connection manager with RDS over ADS and the router as its last
/// filter.
fn assert_grpc_listener(l: &Listener, routes: &str) {
    let api = l.api_listener.as_ref().expect("api_listener");
    let hcm: HttpConnectionManager = unpack(api.api_listener.as_ref().unwrap());
    let Some(http_connection_manager::RouteSpecifier::Rds(rds)) = &hcm.route_specifier else {
        panic!("RDS")
    };
    assert_eq!(rds.route_config_name, routes);
    assert!(matches!(
        rds.config_source.as_ref().unwrap().config_source_specifier,
        Some(config_source::ConfigSourceSpecifier::Ads(_))
    ));
    let last = hcm.http_filters.last().expect("http filters");
    assert_eq!(last.name, "envoy.filters.http.router");
    let Some(http_filter::ConfigType::TypedConfig(router)) = &last.config_type else {
        panic!("typed router config")
    };
    assert_eq!(
        router.type_url,
        "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
    );
    assert!(!hcm.stat_prefix.is_empty(), "Envoy requires a stat prefix");
    assert_eq!(hcm.xff_num_trusted_hops, 0, "gRPC NACKs any other value");
}

/// What gRPC checks of a cluster (A27, A42): EDS over ADS, a balancer it
/// has.
fn assert_grpc_cluster(c: &Cluster) {
    assert_eq!(
        c.cluster_discovery_type,
        Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32
        ))
    );
    let eds = c.eds_cluster_config.as_ref().unwrap();
    assert!(matches!(
        eds.eds_config.as_ref().unwrap().config_source_specifier,
        Some(config_source::ConfigSourceSpecifier::Ads(_))
    ));
    assert_eq!(eds.service_name, c.name);
    assert!(
        [cluster::LbPolicy::RoundRobin, cluster::LbPolicy::RingHash].contains(&c.lb_policy()),
        "gRPC NACKs {:?}",
        c.lb_policy()
    );
    if let Some(list) = &c.load_balancing_policy {
        let last = list.policies.last().unwrap();
        let ext = last.typed_extension_config.as_ref().unwrap();
        assert_eq!(
            ext.typed_config.as_ref().unwrap().type_url,
            "type.googleapis.com/envoy.extensions.load_balancing_policies.wrr_locality.v3.WrrLocality",
            "gRPC must find a policy it has"
        );
    }
}

/// What gRPC checks of an assignment (A27): every locality has a locality
/// and a weight above 0, endpoint weights above 0, no address twice; and
/// what gRPC and Envoy both refuse: weights adding up past u32.
fn assert_grpc_assignment(a: &ClusterLoadAssignment) {
    let mut seen = BTreeSet::new();
    let mut localities = 0u64;
    for l in &a.endpoints {
        assert!(l.locality.is_some(), "a locality");
        assert!(
            l.load_balancing_weight.is_some_and(|w| w.value > 0),
            "gRPC drops a locality without a weight"
        );
        localities += u64::from(l.load_balancing_weight.unwrap().value);
        let mut sum = 0u64;
        for e in &l.lb_endpoints {
            assert!(e.load_balancing_weight.is_some_and(|w| w.value > 0));
            sum += u64::from(e.load_balancing_weight.unwrap().value);
        }
        assert!(
            sum <= u64::from(u32::MAX),
            "endpoint weights add up to {sum}"
        );
    }
    assert!(
        localities <= u64::from(u32::MAX),
        "locality weights add up to {localities}"
    );
    for (id, port, _) in endpoints(a) {
        assert!(seen.insert(port), "{id}: port {port} twice");
    }
    // Priorities start at 0 and have no gaps (gRPC and Envoy NACK them).
    let priorities: BTreeSet<u32> = a.endpoints.iter().map(|l| l.priority).collect();
    assert!(
        priorities.iter().copied().eq(0..priorities.len() as u32),
        "priorities with gaps: {priorities:?}"
    );
}

#[test]
fn a_service_without_a_policy_is_a_listener_routes_a_cluster_and_its_endpoints() {
    let t = translate_all(
        &[
            instance("echo-1", 9001, Health::Healthy),
            instance("echo-2", 9002, Health::Unknown),
            instance("echo-3", 9003, Health::Healthy),
        ],
        None,
    );
    assert_eq!(t.listener.name, "echo");
    assert_grpc_listener(&t.listener, "echo");

    assert_eq!(t.routes.name, "echo");
    let vh = &t.routes.virtual_hosts[..];
    assert_eq!(vh.len(), 1);
    assert_eq!(vh[0].domains, ["echo", "echo:*"]);
    let [default] = &vh[0].routes[..] else {
        panic!("one route")
    };
    let Some(route::Action::Route(action)) = &default.action else {
        panic!("a route action")
    };
    assert_eq!(
        action.cluster_specifier,
        Some(route_action::ClusterSpecifier::Cluster("echo".into()))
    );
    assert!(action.max_stream_duration.is_none(), "no timeout: no limit");
    assert!(action.retry_policy.is_none());

    let [c] = &t.clusters[..] else {
        panic!("one cluster")
    };
    assert_grpc_cluster(c);
    assert!(c.transport_socket.is_none(), "plaintext instances");
    let [a] = &t.assignments[..] else {
        panic!("one assignment")
    };
    assert_eq!(a.cluster_name, "echo");
    assert_grpc_assignment(a);
    assert_eq!(
        endpoints(a),
        [
            ("echo-1".into(), 9001, HealthStatus::Healthy),
            ("echo-2".into(), 9002, HealthStatus::Unknown),
            ("echo-3".into(), 9003, HealthStatus::Healthy),
        ]
    );
}

/// Localities come from `region` and `zone`, weighted by their endpoints;
/// a weight of 0 is sent as 1; an address registered twice is sent once.
#[test]
fn endpoints_are_grouped_by_zone_weighted_and_unique() {
    let mut heavy = labelled(instance("a", 9001, Health::Healthy), &[("zone", "z1")]);
    heavy.weight = 5;
    // The instance's own zone wins over the label.
    let mut light = labelled(instance("b", 9002, Health::Healthy), &[("zone", "z9")]);
    light.zone = "z1".into();
    let other = labelled(
        instance("c", 9003, Health::Healthy),
        &[("zone", "z2"), ("region", "r")],
    );
    let twin = labelled(instance("d", 9003, Health::Healthy), &[("zone", "z2")]);
    let t = translate_all(&[heavy, light, other, twin], None);
    let a = &t.assignments[0];
    assert_grpc_assignment(a);
    let localities: Vec<(String, String, u32, usize)> = a
        .endpoints
        .iter()
        .map(|l| {
            let loc = l.locality.as_ref().unwrap();
            (
                loc.region.clone(),
                loc.zone.clone(),
                l.load_balancing_weight.unwrap().value,
                l.lb_endpoints.len(),
            )
        })
        .collect();
    assert_eq!(
        localities,
        [
            ("".into(), "z1".into(), 6, 2),
            ("r".into(), "z2".into(), 1, 1)
        ]
    );
}

/// Below the panic threshold every endpoint goes out as UNKNOWN (gRPC has
/// no panic mode: this makes it spread over all, as sidecars do); above
/// it, health is passed on.
#[test]
fn health_is_passed_on_and_panic_mode_sends_every_endpoint_as_unknown() {
    let some_down = translate_all(
        &[
            instance("a", 9001, Health::Healthy),
            instance("b", 9002, Health::Unhealthy),
            instance("c", 9003, Health::Healthy),
        ],
        None,
    );
    let health: Vec<HealthStatus> = endpoints(&some_down.assignments[0])
        .into_iter()
        .map(|e| e.2)
        .collect();
    assert_eq!(
        health,
        [
            HealthStatus::Healthy,
            HealthStatus::Unhealthy,
            HealthStatus::Healthy
        ]
    );
    let most_down = translate_all(
        &[
            instance("a", 9001, Health::Unhealthy),
            instance("b", 9002, Health::Unhealthy),
            instance("c", 9003, Health::Healthy),
        ],
        None,
    );
    assert!(
        endpoints(&most_down.assignments[0])
            .iter()
            .all(|e| e.2 == HealthStatus::Unknown)
    );
}

/// Localities split by priority as well as zone, and the priorities
/// present are compacted to 0..n in order: {0, 3, 5} -> {0, 1, 2}.
#[test]
fn priorities_split_localities_and_are_sent_without_gaps() {
    let ranked = |id: &str, port: u32, zone: &str, priority: u32| Instance {
        zone: zone.into(),
        priority,
        ..instance(id, port, Health::Healthy)
    };
    let t = translate_all(
        &[
            ranked("a", 9001, "z1", 0),
            ranked("b", 9002, "z1", 3),
            ranked("c", 9003, "z2", 3),
            ranked("d", 9004, "z2", 5),
            ranked("e", 9005, "z1", 0),
        ],
        None,
    );
    let a = &t.assignments[0];
    assert_grpc_assignment(a);
    let localities: Vec<(String, u32, Vec<String>)> = a
        .endpoints
        .iter()
        .map(|l| {
            (
                l.locality.as_ref().unwrap().zone.clone(),
                l.priority,
                l.lb_endpoints
                    .iter()
                    .map(|e| match &e.host_identifier {
                        Some(lb_endpoint::HostIdentifier::Endpoint(ep)) => ep.hostname.clone(),
                        _ => panic!("an endpoint"),
                    })
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        localities,
        [
            ("z1".into(), 0, vec!["a".into(), "e".into()]),
            ("z1".into(), 1, vec!["b".into()]),
            ("z2".into(), 1, vec!["c".into()]),
            ("z2".into(), 2, vec!["d".into()]),
        ]
    );
    // One priority only, whatever its number: 0.
    let t = translate_all(&[ranked("a", 9001, "", 4), ranked("b", 9002, "", 4)], None);
    let a = &t.assignments[0];
    assert_grpc_assignment(a);
    assert_eq!(a.endpoints.len(), 1);
    assert_eq!(a.endpoints[0].priority, 0);
}

/// A cluster under the panic threshold whose standby priority can take
/// all of its traffic keeps its health: clients fail over rather than
/// spread back over the dead primary.
#[test]
fn a_whole_standby_priority_keeps_a_cluster_out_of_panic() {
    let ranked = |id: &str, port: u32, priority: u32, status: Health| Instance {
        priority,
        ..instance(id, port, status)
    };
    let primary_down = [
        ranked("a", 9001, 0, Health::Unhealthy),
        ranked("b", 9002, 0, Health::Unhealthy),
        ranked("c", 9003, 0, Health::Unhealthy),
        ranked("d", 9004, 1, Health::Healthy),
        ranked("e", 9005, 1, Health::Healthy),
    ];
    let t = translate_all(&primary_down, None);
    let health: Vec<HealthStatus> = endpoints(&t.assignments[0])
        .into_iter()
        .map(|e| e.2)
        .collect();
    assert_eq!(
        health,
        [
            HealthStatus::Unhealthy,
            HealthStatus::Unhealthy,
            HealthStatus::Unhealthy,
            HealthStatus::Healthy,
            HealthStatus::Healthy
        ]
    );
    // The standby half down as well (1 of 5, 70 % at most): panic.
    let mut both_down = primary_down;
    both_down[4].status = Health::Unhealthy as i32;
    let t = translate_all(&both_down, None);
    assert!(
        endpoints(&t.assignments[0])
            .iter()
            .all(|e| e.2 == HealthStatus::Unknown)
    );
}

fn split_policy() -> TrafficPolicy {
    TrafficPolicy {
        service: "echo".into(),
        subsets: vec![
            Subset {
                name: "v1".into(),
                labels: [("version".into(), "v1".into())].into(),
            },
            Subset {
                name: "v2".into(),
                labels: [("version".into(), "v2".into())].into(),
            },
        ],
        split: vec![
            WeightedSubset {
                subset: "v1".into(),
                weight: 80,
            },
            WeightedSubset {
                subset: "v2".into(),
                weight: 20,
            },
        ],
        routes: vec![Route {
            name: "canary".into(),
            r#match: Some(RouteMatch {
                path_prefix: "/echo.Echo/".into(),
                headers: [("x-canary".into(), "1".into())].into(),
                ..Default::default()
            }),
            split: vec![
                WeightedSubset {
                    subset: "v1".into(),
                    weight: 0,
                },
                WeightedSubset {
                    subset: "v2".into(),
                    weight: 100,
                },
            ],
            ..Default::default()
        }],
        retries: Some(RetryPolicy {
            attempts: 2,
            retry_on: vec!["5xx".into(), "retriable-grpc-codes".into()],
            grpc_codes: vec!["unavailable".into(), "aborted".into()],
            backoff_base_ms: 25,
            backoff_max_ms: 250,
            ..Default::default()
        }),
        timeouts: Some(Timeouts {
            request_ms: 1500,
            ..Default::default()
        }),
        load_balancer: Some(LoadBalancer {
            algorithm: "ring_hash".into(),
            hash_key: "header:x-user".into(),
        }),
        circuit_breaker: Some(CircuitBreaker {
            max_requests: 100,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Subsets become clusters of their own; a split becomes weighted
/// clusters without its zero weights; a header route comes before the
/// default; the request timeout is `max_stream_duration`; retries name
/// the gRPC codes both clients retry; the hash key is a hash policy.
#[test]
fn a_policy_becomes_routes_splits_subset_clusters_and_settings() {
    let v1 = labelled(instance("a", 9001, Health::Healthy), &[("version", "v1")]);
    let v2 = labelled(instance("b", 9002, Health::Healthy), &[("version", "v2")]);
    let v1b = labelled(instance("c", 9003, Health::Healthy), &[("version", "v1")]);
    let t = translate_all(&[v1, v2, v1b], Some(&split_policy()));

    let names: Vec<&str> = t.clusters.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["echo", "echo/v1", "echo/v2"]);
    for c in &t.clusters {
        assert_grpc_cluster(c);
        assert_eq!(c.lb_policy(), cluster::LbPolicy::RingHash);
        let limits = &c.circuit_breakers.as_ref().unwrap().thresholds[0];
        assert_eq!(limits.priority, 0, "gRPC reads DEFAULT only");
        assert_eq!(limits.max_requests.unwrap().value, 100);
    }
    let ids = |a: &ClusterLoadAssignment| -> Vec<String> {
        endpoints(a).into_iter().map(|e| e.0).collect()
    };
    assert_eq!(ids(&t.assignments[0]), ["a", "b", "c"]);
    assert_eq!(ids(&t.assignments[1]), ["a", "c"]);
    assert_eq!(ids(&t.assignments[2]), ["b"]);

    let routes = &t.routes.virtual_hosts[0].routes;
    assert_eq!(routes.len(), 2);
    assert_eq!(routes[0].name, "canary");
    let m = routes[0].r#match.as_ref().unwrap();
    assert_eq!(
        m.path_specifier,
        Some(
            envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier::Prefix(
                "/echo.Echo/".into()
            )
        )
    );
    assert_eq!(m.headers.len(), 1);
    assert_eq!(m.headers[0].name, "x-canary");
    let action = |r: &envoy_types::pb::envoy::config::route::v3::Route| match &r.action {
        Some(route::Action::Route(a)) => a.clone(),
        _ => panic!("a route action"),
    };
    let weights = |r| match action(r).cluster_specifier {
        Some(route_action::ClusterSpecifier::WeightedClusters(w)) => w
            .clusters
            .iter()
            .map(|c| (c.name.clone(), c.weight.unwrap().value))
            .collect::<Vec<_>>(),
        other => panic!("weighted clusters, not {other:?}"),
    };
    assert_eq!(weights(&routes[0]), [("echo/v2".to_string(), 100)]);
    assert_eq!(
        weights(&routes[1]),
        [("echo/v1".to_string(), 80), ("echo/v2".to_string(), 20)]
    );
    let default = action(&routes[1]);
    let msd = default
        .max_stream_duration
        .unwrap()
        .max_stream_duration
        .unwrap();
    assert_eq!((msd.seconds, msd.nanos), (1, 500_000_000));
    let retry = default.retry_policy.unwrap();
    assert_eq!(
        retry.retry_on, "5xx,unavailable",
        "aborted: neither client retries it"
    );
    assert_eq!(retry.num_retries.unwrap().value, 2);
    let back_off = retry.retry_back_off.unwrap();
    assert!(back_off.max_interval.unwrap().nanos >= back_off.base_interval.unwrap().nanos);
    assert_eq!(default.hash_policy.len(), 1);
}

/// Instances behind a sidecar are reached at its inbound port over mTLS
/// checking the service's SPIFFE ID, with the certificates of the
/// bootstrap's provider; instances without one are left out of such a
/// cluster.
#[test]
fn sidecar_instances_are_reached_over_mtls_at_their_inbound_port() {
    let mut behind = instance("node-1.echo", 9001, Health::Healthy);
    behind.inbound_port = 15006;
    let plain = instance("echo-x", 9002, Health::Healthy);
    let t = translate_all(&[behind, plain], None);
    assert_eq!(
        endpoints(&t.assignments[0]),
        [("node-1.echo".into(), 15006, HealthStatus::Healthy)]
    );
    let socket = t.clusters[0].transport_socket.as_ref().expect("tls");
    assert_eq!(socket.name, "envoy.transport_sockets.tls");
    let Some(envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(
        any,
    )) = &socket.config_type
    else {
        panic!("typed config")
    };
    let tls: UpstreamTlsContext = unpack(any);
    assert_eq!(tls.sni, "echo.svc.isdp.local");
    let common = tls.common_tls_context.unwrap();
    assert_eq!(
        common
            .tls_certificate_provider_instance
            .unwrap()
            .instance_name,
        CERTIFICATE_PROVIDER
    );
    let Some(common_tls_context::ValidationContextType::ValidationContext(v)) =
        common.validation_context_type
    else {
        panic!("a validation context")
    };
    assert_eq!(
        v.ca_certificate_provider_instance.unwrap().instance_name,
        CERTIFICATE_PROVIDER
    );
    #[allow(deprecated)]
    let sans = v.match_subject_alt_names;
    assert_eq!(sans.len(), 1);
    assert_eq!(
        sans[0].match_pattern,
        Some(
            envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern::Exact(
                "spiffe://isdp.local/svc/echo".into()
            )
        )
    );
}

/// Balancers gRPC lacks are offered as a list whose first entry Envoy has
/// and whose last (round robin per locality) gRPC has.
#[test]
fn balancers_map_to_the_nearest_each_client_has() {
    let with = |algorithm: &str| TrafficPolicy {
        load_balancer: Some(LoadBalancer {
            algorithm: algorithm.into(),
            hash_key: String::new(),
        }),
        ..Default::default()
    };
    let first = |c: &Cluster| {
        c.load_balancing_policy.as_ref().map(|l| {
            l.policies[0]
                .typed_extension_config
                .as_ref()
                .unwrap()
                .name
                .clone()
        })
    };
    for (algorithm, lb, listed) in [
        ("round_robin", cluster::LbPolicy::RoundRobin, None),
        ("weighted_round_robin", cluster::LbPolicy::RoundRobin, None),
        ("maglev", cluster::LbPolicy::RingHash, None),
        (
            "least_request",
            cluster::LbPolicy::RoundRobin,
            Some("envoy.load_balancing_policies.least_request"),
        ),
        (
            "peak_ewma",
            cluster::LbPolicy::RoundRobin,
            Some("envoy.load_balancing_policies.least_request"),
        ),
        (
            "load_aware",
            cluster::LbPolicy::RoundRobin,
            Some("envoy.load_balancing_policies.least_request"),
        ),
        (
            "random",
            cluster::LbPolicy::RoundRobin,
            Some("envoy.load_balancing_policies.random"),
        ),
    ] {
        let t = translate_all(&[], Some(&with(algorithm)));
        let c = &t.clusters[0];
        assert_grpc_cluster(c);
        assert_eq!(c.lb_policy(), lb, "{algorithm}");
        assert_eq!(first(c).as_deref(), listed, "{algorithm}");
    }
}

/// Outlier detection is the consecutive-error form with success-rate
/// ejection off, which both clients would otherwise turn on.
#[test]
fn outlier_detection_keeps_success_rate_ejection_off() {
    let policy = TrafficPolicy {
        outlier_detection: Some(OutlierDetection {
            consecutive_5xx: 3,
            consecutive_gateway_errors: 2,
            interval_ms: 1000,
            base_ejection_ms: 30_000,
            max_ejection_percent: 50,
            ..Default::default()
        }),
        ..Default::default()
    };
    let t = translate_all(&[], Some(&policy));
    let od = t.clusters[0].outlier_detection.as_ref().unwrap();
    assert_eq!(od.consecutive_5xx.unwrap().value, 3);
    assert_eq!(od.consecutive_gateway_failure.unwrap().value, 2);
    assert_eq!(od.enforcing_consecutive_gateway_failure.unwrap().value, 100);
    assert_eq!(od.enforcing_success_rate.unwrap().value, 0);
    assert!(od.failure_percentage_threshold.is_none());
    assert_eq!(od.max_ejection_percent.unwrap().value, 50);
}

/// Envoy's listener is address-bound (Envoy skips API listeners from
/// LDS), routes over ADS by `Host` through every service's virtual host.
#[test]
fn envoy_gets_an_address_bound_listener_routing_every_service_by_host() {
    let l = listener::envoy_outbound("127.0.0.1:15001".parse().unwrap());
    assert_eq!(l.name, ENVOY_OUTBOUND);
    assert!(l.api_listener.is_none());
    let Some(address::Address::SocketAddress(sa)) =
        l.address.as_ref().and_then(|a| a.address.as_ref())
    else {
        panic!("an address")
    };
    assert_eq!(sa.address, "127.0.0.1");
    assert_eq!(
        sa.port_specifier,
        Some(socket_address::PortSpecifier::PortValue(15001))
    );
    let filter = &l.filter_chains[0].filters[0];
    assert_eq!(filter.name, "envoy.filters.network.http_connection_manager");
    let Some(filter::ConfigType::TypedConfig(any)) = &filter.config_type else {
        panic!("typed config")
    };
    let hcm: HttpConnectionManager = unpack(any);
    assert!(!hcm.stat_prefix.is_empty());
    let Some(http_connection_manager::RouteSpecifier::Rds(rds)) = &hcm.route_specifier else {
        panic!("RDS")
    };
    assert_eq!(rds.route_config_name, ENVOY_OUTBOUND);

    let echo = translate_all(&[instance("a", 9001, Health::Healthy)], None);
    let other = super::route::virtual_host("billing", &TrafficPolicy::default());
    let routes: RouteConfiguration = super::route::envoy_outbound([&echo.host, &other]);
    assert_eq!(routes.name, ENVOY_OUTBOUND);
    let domains: Vec<&[String]> = routes
        .virtual_hosts
        .iter()
        .map(|v| v.domains.as_slice())
        .collect();
    assert_eq!(
        domains,
        [
            &["echo".to_string(), "echo:*".into()][..],
            &["billing".to_string(), "billing:*".into()][..]
        ]
    );
    // Assembled from hosts already encoded, as the publisher does, it is
    // the same message, byte for byte.
    let encoded = [
        bytes::Bytes::from(echo.host.encode_to_vec()),
        bytes::Bytes::from(other.encode_to_vec()),
    ];
    assert_eq!(
        super::route::envoy_outbound_encoded(&encoded),
        routes.encode_to_vec()
    );
    assert_eq!(
        super::route::envoy_outbound_encoded(&[]),
        super::route::envoy_outbound([]).encode_to_vec()
    );
}

/// Versions are content hashes: the same input translates to the same
/// bytes every time (no map order leaks into the encoding).
#[test]
fn the_same_input_encodes_to_the_same_bytes() {
    let instances = [
        labelled(
            instance("a", 9001, Health::Healthy),
            &[("version", "v1"), ("zone", "z1")],
        ),
        labelled(
            instance("b", 9002, Health::Healthy),
            &[("version", "v2"), ("zone", "z2")],
        ),
    ];
    let bytes = |t: &Translated| -> Vec<Vec<u8>> {
        let mut all = vec![t.listener.encode_to_vec(), t.routes.encode_to_vec()];
        all.extend(t.clusters.iter().map(Message::encode_to_vec));
        all.extend(t.assignments.iter().map(Message::encode_to_vec));
        all
    };
    let first = bytes(&translate_all(&instances, Some(&split_policy())));
    for _ in 0..20 {
        assert_eq!(
            bytes(&translate_all(&instances, Some(&split_policy()))),
            first
        );
    }
}

#[test]
fn names_map_back_to_their_service() {
    assert_eq!(service_of("echo"), Some("echo"));
    assert_eq!(service_of("echo/v1"), Some("echo"));
    assert_eq!(service_of(ENVOY_OUTBOUND), None);
    let urls: HashMap<&str, String> = HashMap::from([
        (LISTENER, Listener::type_url()),
        (ROUTE_CONFIGURATION, RouteConfiguration::type_url()),
        (CLUSTER, Cluster::type_url()),
        (CLUSTER_LOAD_ASSIGNMENT, ClusterLoadAssignment::type_url()),
    ]);
    for (constant, generated) in urls {
        assert_eq!(constant, generated);
    }
}

mod publisher;

/// Load-scaled weights can add up past what Envoy and gRPC take (u32 per
/// locality and per cluster): they are scaled down in proportion, none
/// to 0.
#[test]
fn weights_past_u32_are_scaled_down_in_proportion() {
    let instances: Vec<Instance> = (0..500)
        .map(|n| instance(&format!("echo-{n}"), 9000 + n, Health::Healthy))
        .collect();
    let members: Vec<Member<'_>> = instances
        .iter()
        .enumerate()
        .map(|(n, instance)| Member {
            instance,
            // The heaviest a weight gets (operator 10,000 × factor 10 ×
            // 100), but one endpoint at the lightest.
            weight: if n == 0 { 1 } else { 10_000_000 },
        })
        .collect();
    let t = translate(&settings(), "echo", &members, None);
    let a = &t.assignments[0];
    assert_grpc_assignment(a);
    let weights: Vec<u64> = a
        .endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .map(|e| u64::from(e.load_balancing_weight.unwrap().value))
        .collect();
    assert!(weights.iter().sum::<u64>() <= u64::from(u32::MAX));
    assert_eq!(
        weights.iter().filter(|w| **w == 1).count(),
        1,
        "the light one"
    );
    let heavy: BTreeSet<u64> = weights.iter().copied().filter(|w| *w > 1).collect();
    assert_eq!(heavy.len(), 1, "equal weights stay equal: {heavy:?}");
    assert!(heavy.into_iter().next().unwrap() > 1_000_000);
}

/// Region and zone labels are free-form; only DNS labels name a
/// locality, which Envoy shows in its admin output and logs.
#[test]
fn labels_that_are_not_dns_labels_name_no_locality() {
    let odd = labelled(
        instance("echo-1", 9001, Health::Healthy),
        &[("zone", "za\u{1b}[2J"), ("region", "r\nx")],
    );
    let fine = labelled(
        instance("echo-2", 9002, Health::Healthy),
        &[("zone", "zb"), ("region", "eu")],
    );
    let t = translate_all(&[odd, fine], None);
    let mut localities: Vec<(String, String)> = t.assignments[0]
        .endpoints
        .iter()
        .map(|l| {
            let loc = l.locality.as_ref().unwrap();
            (loc.region.clone(), loc.zone.clone())
        })
        .collect();
    localities.sort();
    assert_eq!(
        localities,
        [
            (String::new(), String::new()),
            ("eu".to_owned(), "zb".to_owned())
        ]
    );
}
