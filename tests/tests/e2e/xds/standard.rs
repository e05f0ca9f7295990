//! The standard Envoy resources over the same ADS server: what a proxyless
//! gRPC client asks for (listener, then routes, cluster and endpoints, each
//! by name, state of the world), what Envoy asks for (listeners and
//! clusters by wildcard), and what a scoped join token may read of them.
//! Real gRPC clients run against the same resources: Python grpcio in
//! `tests/python/`, Node's grpc-js-xds (`tests/node/`) in `grpc_js`.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::{
    config::{
        cluster::v3::Cluster,
        endpoint::v3::{ClusterLoadAssignment, lb_endpoint},
        listener::v3::Listener,
        route::v3::RouteConfiguration,
    },
    service::discovery::v3::{DiscoveryRequest, DiscoveryResponse},
};
use isdp_control_plane::publish::standard::{
    CLUSTER, CLUSTER_LOAD_ASSIGNMENT, ENVOY_OUTBOUND, LISTENER, ROUTE_CONFIGURATION,
};
use isdp_proto::v1::{CreateTokenRequest, Role, tokens_client::TokensClient};
use prost::{Message, Name};

use super::*;

fn request(type_url: &str, names: &[&str], last: Option<&DiscoveryResponse>) -> DiscoveryRequest {
    DiscoveryRequest {
        node: node(),
        type_url: type_url.into(),
        resource_names: strings(names),
        version_info: last.map(|r| r.version_info.clone()).unwrap_or_default(),
        response_nonce: last.map(|r| r.nonce.clone()).unwrap_or_default(),
        ..Default::default()
    }
}

fn named<M: Message + Name + Default>(r: &DiscoveryResponse) -> BTreeMap<String, M> {
    r.resources
        .iter()
        .map(|a| {
            assert_eq!(a.type_url, M::type_url());
            M::decode(a.value.as_slice()).expect("decode")
        })
        .map(|m| (name_of(&m), m))
        .collect()
}

fn name_of<M: Message + Name>(m: &M) -> String {
    // Every standard resource has its name in field 1 (Listener, Route
    // Configuration, Cluster, ClusterLoadAssignment's cluster_name).
    let bytes = m.encode_to_vec();
    assert_eq!(bytes[0], 0x0a, "{} has a name first", M::full_name());
    let len = bytes[1] as usize;
    String::from_utf8(bytes[2..2 + len].to_vec()).unwrap()
}

fn ports(a: &ClusterLoadAssignment) -> Vec<u32> {
    use envoy_types::pb::envoy::config::core::v3::{address, socket_address};
    let mut ports: Vec<u32> = a
        .endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .filter_map(|e| match &e.host_identifier {
            Some(lb_endpoint::HostIdentifier::Endpoint(ep)) => {
                match ep.address.as_ref()?.address.as_ref()? {
                    address::Address::SocketAddress(sa) => match sa.port_specifier {
                        Some(socket_address::PortSpecifier::PortValue(p)) => Some(p),
                        _ => None,
                    },
                    _ => None,
                }
            }
            _ => None,
        })
        .collect();
    ports.sort();
    ports
}

/// Reads responses of `type_url` (acknowledging each) until `done` holds
/// for one, within the propagation budget per response.
async fn until(
    ads: &mut SotwAds,
    type_url: &str,
    names: &[&str],
    what: &str,
    done: impl Fn(&DiscoveryResponse) -> bool,
) -> DiscoveryResponse {
    let deadline = tokio::time::Instant::now() + SETUP;
    loop {
        let r = match tokio::time::timeout_at(deadline, ads.rx.message()).await {
            Ok(Ok(Some(r))) => r,
            other => panic!("waiting for {what}: {other:?}"),
        };
        assert_eq!(r.type_url, type_url, "one type per stream in these tests");
        ads.send(request(type_url, names, Some(&r))).await;
        if done(&r) {
            return r;
        }
    }
}

/// A proxyless client's walk: the listener names its routes, the routes
/// name the cluster, the cluster names its assignment; endpoint changes
/// follow, and a service's last instance leaving removes its listener.
#[tokio::test]
async fn a_proxyless_client_walks_from_the_listener_to_the_endpoints() {
    let cp = ControlPlane::start().await;
    cp.register("echo", "echo-1", 9001).await;
    cp.register("echo", "echo-2", 9002).await;
    cp.published("echo", &["echo-1", "echo-2"]).await;

    let mut lds = open_sotw(&cp.channel, request(LISTENER, &["echo"], None)).await;
    let r = until(&mut lds, LISTENER, &["echo"], "listener echo", |r| {
        !r.resources.is_empty()
    })
    .await;
    let listeners = named::<Listener>(&r);
    assert!(listeners["echo"].api_listener.is_some());

    let mut rds = open_sotw(&cp.channel, request(ROUTE_CONFIGURATION, &["echo"], None)).await;
    let r = until(&mut rds, ROUTE_CONFIGURATION, &["echo"], "routes", |r| {
        !r.resources.is_empty()
    })
    .await;
    let routes = named::<RouteConfiguration>(&r);
    assert_eq!(routes["echo"].virtual_hosts[0].domains, ["echo", "echo:*"]);

    let mut cds = open_sotw(&cp.channel, request(CLUSTER, &["echo"], None)).await;
    let r = until(&mut cds, CLUSTER, &["echo"], "cluster", |r| {
        !r.resources.is_empty()
    })
    .await;
    assert_eq!(
        named::<Cluster>(&r)["echo"]
            .eds_cluster_config
            .as_ref()
            .unwrap()
            .service_name,
        "echo"
    );

    let mut eds = open_sotw(
        &cp.channel,
        request(CLUSTER_LOAD_ASSIGNMENT, &["echo"], None),
    )
    .await;
    until(
        &mut eds,
        CLUSTER_LOAD_ASSIGNMENT,
        &["echo"],
        "two endpoints",
        |r| {
            named::<ClusterLoadAssignment>(r)
                .get("echo")
                .is_some_and(|a| ports(a) == [9001, 9002])
        },
    )
    .await;
    cp.register("echo", "echo-3", 9003).await;
    until(
        &mut eds,
        CLUSTER_LOAD_ASSIGNMENT,
        &["echo"],
        "three endpoints",
        |r| {
            named::<ClusterLoadAssignment>(r)
                .get("echo")
                .is_some_and(|a| ports(a) == [9001, 9002, 9003])
        },
    )
    .await;

    for id in ["echo-1", "echo-2", "echo-3"] {
        cp.deregister(id).await;
    }
    until(
        &mut lds,
        LISTENER,
        &["echo"],
        "the listener's removal",
        |r| r.resources.is_empty(),
    )
    .await;
    cp.stop().await;
}

/// gRPC declares a resource absent 15 s after asking for it: a name asked
/// for before its service exists is answered as soon as it does.
#[tokio::test]
async fn a_listener_asked_for_before_its_service_exists_arrives_with_it() {
    let cp = ControlPlane::start().await;
    let mut lds = open_sotw(&cp.channel, request(LISTENER, &["later"], None)).await;
    let first = until(&mut lds, LISTENER, &["later"], "the first answer", |_| true).await;
    assert!(first.resources.is_empty(), "nothing yet");
    cp.register("later", "later-1", 9100).await;
    let r = until(&mut lds, LISTENER, &["later"], "listener later", |r| {
        !r.resources.is_empty()
    })
    .await;
    assert!(named::<Listener>(&r).contains_key("later"));
    cp.stop().await;
}

/// Envoy subscribes to listeners and clusters by wildcard: it gets its
/// address-bound outbound listener (not the API listeners, which it would
/// skip) and every cluster, subsets' included.
#[tokio::test]
async fn envoy_wildcards_get_the_outbound_listener_and_every_cluster() {
    let cp = ControlPlane::start().await;
    cp.register("echo", "echo-1", 9001).await;
    cp.register("billing", "billing-1", 9201).await;
    cp.published("billing", &["billing-1"]).await;

    let mut lds = open_sotw(&cp.channel, request(LISTENER, &[], None)).await;
    let r = until(&mut lds, LISTENER, &[], "the outbound listener", |r| {
        !r.resources.is_empty()
    })
    .await;
    let listeners = named::<Listener>(&r);
    assert_eq!(listeners.keys().collect::<Vec<_>>(), [ENVOY_OUTBOUND]);
    assert!(listeners[ENVOY_OUTBOUND].address.is_some());

    let mut cds = open_sotw(&cp.channel, request(CLUSTER, &["*"], None)).await;
    let r = until(&mut cds, CLUSTER, &["*"], "both clusters", |r| {
        r.resources.len() == 2
    })
    .await;
    assert_eq!(
        named::<Cluster>(&r).keys().collect::<Vec<_>>(),
        ["billing", "echo"]
    );

    let mut rds = open_sotw(
        &cp.channel,
        request(ROUTE_CONFIGURATION, &[ENVOY_OUTBOUND], None),
    )
    .await;
    let r = until(
        &mut rds,
        ROUTE_CONFIGURATION,
        &[ENVOY_OUTBOUND],
        "routes",
        |r| {
            named::<RouteConfiguration>(r)
                .get(ENVOY_OUTBOUND)
                .is_some_and(|rc| rc.virtual_hosts.len() == 2)
        },
    )
    .await;
    let hosts: Vec<String> = named::<RouteConfiguration>(&r)[ENVOY_OUTBOUND]
        .virtual_hosts
        .iter()
        .map(|v| v.name.clone())
        .collect();
    assert_eq!(hosts, ["billing", "echo"]);
    cp.stop().await;
}

/// A join token minted with `--upstream` reads the standard resources of
/// its own services and upstreams only: another service's read as absent,
/// by name and by wildcard, and Envoy's outbound listener and routes,
/// which name every service, not at all.
#[tokio::test]
async fn a_scoped_token_reads_only_its_services_standard_resources() {
    let cp = ControlPlane::start().await;
    cp.register("echo", "echo-1", 9001).await;
    cp.register("billing", "billing-1", 9201).await;
    cp.published("billing", &["billing-1"]).await;
    let mut tokens = TokensClient::new(cp.channel.clone());
    let secret = tokens
        .create(CreateTokenRequest {
            role: Role::Join as i32,
            services: vec!["web".into()],
            upstreams: vec!["echo".into()],
            ..Default::default()
        })
        .await
        .expect("create a join token")
        .into_inner()
        .secret;
    let auth = ControlAuth {
        token: Some(secret),
        ..cp.auth.clone()
    };
    let scoped = connect(cp.grpc, &auth).await;

    let mut cds = open_sotw(&scoped, request(CLUSTER, &[], None)).await;
    let r = until(&mut cds, CLUSTER, &[], "its clusters", |r| {
        !r.resources.is_empty()
    })
    .await;
    assert_eq!(named::<Cluster>(&r).keys().collect::<Vec<_>>(), ["echo"]);

    let names = ["echo", "billing", ENVOY_OUTBOUND];
    let mut lds = open_sotw(&scoped, request(LISTENER, &names, None)).await;
    let r = until(&mut lds, LISTENER, &names, "its listener", |r| {
        !r.resources.is_empty()
    })
    .await;
    assert_eq!(named::<Listener>(&r).keys().collect::<Vec<_>>(), ["echo"]);

    let mut wildcard = open_sotw(&scoped, request(LISTENER, &[], None)).await;
    let r = until(&mut wildcard, LISTENER, &[], "the first answer", |_| true).await;
    assert!(
        r.resources.is_empty(),
        "no listener names only its services"
    );
    cp.stop().await;
}

/// `isdp_xds_nacks_total` for `type_url`, from the admin `/metrics`.
async fn nacks_of(cp: &ControlPlane, type_url: &str) -> u64 {
    let resp = isdp_tests::http::get(&cp.admin.to_string(), "/metrics")
        .await
        .expect("GET /metrics");
    resp.body
        .lines()
        .filter(|l| {
            l.starts_with("isdp_xds_nacks_total{") && l.contains(&format!("\"{type_url}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// A cluster a client refuses is counted under its type and not resent;
/// the next change to it produces a new version. Meanwhile a stream
/// reading ISDP's own types (a sidecar's) carries on as before.
#[tokio::test]
async fn a_nacked_cluster_is_counted_not_resent_and_sidecar_streams_carry_on() {
    use isdp_proto::v1::{PutPolicyRequest, policies_client::PoliciesClient};
    let cp = ControlPlane::start().await;
    cp.register("echo", "echo-1", 9001).await;
    cp.published("echo", &["echo-1"]).await;
    let mut sidecar = open_delta(&cp.channel, subscribe(&["echo"])).await;
    let first = sidecar.next("the sidecar's endpoints").await;
    sidecar.send(ack(&first)).await;

    let mut cds = open_sotw(&cp.channel, request(CLUSTER, &["echo"], None)).await;
    let r = until(&mut cds, CLUSTER, &["echo"], "cluster echo", |r| {
        !r.resources.is_empty()
    })
    .await;
    // `until` acknowledged it; refuse the next version instead.
    let before = nacks_of(&cp, CLUSTER).await;
    let put = |doc: &str| PutPolicyRequest {
        document_json: doc.into(),
        ..Default::default()
    };
    let mut policies = PoliciesClient::new(cp.channel.clone());
    policies
        .put(put(
            r#"{"service": "echo", "load_balancer": {"algorithm": "least_request"}}"#,
        ))
        .await
        .expect("put a policy");
    let changed = cds.next("the cluster after the policy").await;
    assert_ne!(changed.version_info, r.version_info);
    // A NACK: the version held (the previous one), the refused
    // response's nonce, and why.
    cds.send(DiscoveryRequest {
        response_nonce: changed.nonce.clone(),
        error_detail: Some(RpcStatus {
            code: 3,
            message: "test: cluster refused".into(),
            ..Default::default()
        }),
        ..request(CLUSTER, &["echo"], Some(&r))
    })
    .await;
    cds.quiet("a NACKed version is not resent").await;
    let deadline = tokio::time::Instant::now() + SETUP;
    while nacks_of(&cp, CLUSTER).await <= before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the NACK was never counted under {CLUSTER}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The sidecar's stream still follows its endpoints.
    cp.register("echo", "echo-2", 9002).await;
    let update = sidecar.next("the sidecar's endpoint update").await;
    assert_eq!(
        instance_ids(&delta_resources(&update)["echo"].1),
        ["echo-1", "echo-2"]
    );
    // And the next change to the cluster is a new version, sent.
    policies
        .put(put(
            r#"{"service": "echo", "load_balancer": {"algorithm": "random"}}"#,
        ))
        .await
        .expect("put a policy");
    let next = cds.next("the cluster after the next change").await;
    assert!(!next.resources.is_empty());
    assert_ne!(next.version_info, changed.version_info);
    cp.stop().await;
}

/// What a client may send wrong, with standard types: a type the server
/// does not serve is refused naming the served ones (the standard ones
/// included); names that cannot be a service's read as absent and break
/// nothing for the names beside them.
#[tokio::test]
async fn unknown_types_and_malformed_names_get_documented_answers() {
    let cp = ControlPlane::start().await;
    cp.register("echo", "echo-1", 9001).await;
    cp.published("echo", &["echo-1"]).await;

    let secret = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
    let status = try_open_sotw(&cp.channel, request(secret, &["x"], None))
        .await
        .map(|mut s| async move { s.rx.message().await })
        .expect("the stream opens; the refusal is its first answer")
        .await
        .expect_err("an unserved type ends the stream");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    for served in [
        LISTENER,
        CLUSTER,
        CLUSTER_LOAD_ASSIGNMENT,
        ROUTE_CONFIGURATION,
    ] {
        assert!(status.message().contains(served), "{status:?}");
    }

    let names = [
        "echo",
        "ECHO",
        "echo/",
        "/echo",
        "echo/../billing",
        "",
        "echo/v1/x",
    ];
    let mut cds = open_sotw(&cp.channel, request(CLUSTER, &names, None)).await;
    let r = until(&mut cds, CLUSTER, &names, "cluster echo", |r| {
        !r.resources.is_empty()
    })
    .await;
    assert_eq!(named::<Cluster>(&r).keys().collect::<Vec<_>>(), ["echo"]);
    cp.stop().await;
}
