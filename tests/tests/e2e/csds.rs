//! Proxy status for every kind of xDS client, and the Client Status
//! Discovery Service, against the real binary: a proxyless gRPC node
//! (state of the world, user agent "gRPC Python") and an Envoy node
//! (delta, user agent "envoy", a structured build version) open standard
//! ADS streams with the `envoy-types` client; `isdpctl proxy-status`
//! shows both with their kinds, and `FetchClientStatus` /
//! `StreamClientStatus` report per resource what each acknowledged,
//! rejected or was told does not exist, filtered by node id.
//!
//! The resources are the ones the cache serves (`isdp.v1.ServiceEndpoints`);
//! the status does not depend on the type.

use std::time::Duration;

use envoy_types::pb::{
    envoy::{
        admin::v3::ClientResourceStatus,
        config::core::v3::{BuildVersion, Locality, Node, node::UserAgentVersionType},
        service::{
            discovery::v3::{
                DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
                aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
            },
            status::v3::{
                ClientConfig, ClientStatusRequest, ClientStatusResponse, ConfigStatus,
                client_status_discovery_service_client::ClientStatusDiscoveryServiceClient,
            },
        },
        r#type::{
            matcher::v3::{NodeMatcher, StringMatcher, string_matcher::MatchPattern},
            v3::SemanticVersion,
        },
    },
    google::rpc::Status as RpcStatus,
};
use isdp_proto::v1::SERVICE_ENDPOINTS_TYPE_URL as EPS;
use isdp_tests::{ControlPlane, ControlPlaneOpts, bearer, eventually};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};

const WAIT: Duration = Duration::from_secs(10);

/// One ADS stream: requests in through a channel, responses out.
struct Ads<Req, Resp> {
    tx: mpsc::Sender<Req>,
    rx: Streaming<Resp>,
}

impl<Req, Resp> Ads<Req, Resp> {
    async fn send(&self, req: Req) {
        self.tx.send(req).await.expect("the request stream is open");
    }

    async fn next(&mut self, what: &str) -> Resp {
        match tokio::time::timeout(WAIT, self.rx.message()).await {
            Ok(Ok(Some(r))) => r,
            other => panic!("{what}: no response: {:?}", other.map(|r| r.map(drop))),
        }
    }

    /// The status the stream ends with; a response first is a failure.
    async fn error(&mut self, what: &str) -> tonic::Status {
        match tokio::time::timeout(WAIT, self.rx.message()).await {
            Ok(Err(s)) => s,
            other => panic!(
                "{what}: expected an error: {:?}",
                other.map(|r| r.map(drop))
            ),
        }
    }
}

/// A proxyless gRPC client's node, as its bootstrap and library fill it.
fn grpc_node() -> Node {
    Node {
        id: "py-1".into(),
        cluster: "checkout".into(),
        locality: Some(Locality {
            zone: "eu-1a".into(),
            ..Default::default()
        }),
        user_agent_name: "gRPC Python".into(),
        user_agent_version_type: Some(UserAgentVersionType::UserAgentVersion("1.85.0".into())),
        ..Default::default()
    }
}

/// Envoy's node: its build version is structured.
fn envoy_node() -> Node {
    Node {
        id: "envoy-1".into(),
        cluster: "edge".into(),
        user_agent_name: "envoy".into(),
        user_agent_version_type: Some(UserAgentVersionType::UserAgentBuildVersion(BuildVersion {
            version: Some(SemanticVersion {
                major_number: 1,
                minor_number: 34,
                patch: 2,
            }),
            metadata: None,
        })),
        ..Default::default()
    }
}

async fn sotw(
    cp: &ControlPlane,
    first: DiscoveryRequest,
) -> Ads<DiscoveryRequest, DiscoveryResponse> {
    let (tx, rx) = mpsc::channel(16);
    tx.send(first).await.expect("queue the first request");
    let mut client = AggregatedDiscoveryServiceClient::with_interceptor(
        cp.channel().await,
        bearer(cp.admin_token()),
    );
    let rx = tokio::time::timeout(
        WAIT,
        client.stream_aggregated_resources(ReceiverStream::new(rx)),
    )
    .await
    .expect("StreamAggregatedResources answered")
    .expect("StreamAggregatedResources opened")
    .into_inner();
    Ads { tx, rx }
}

async fn delta(
    cp: &ControlPlane,
    first: DeltaDiscoveryRequest,
) -> Ads<DeltaDiscoveryRequest, DeltaDiscoveryResponse> {
    let (tx, rx) = mpsc::channel(16);
    tx.send(first).await.expect("queue the first request");
    let mut client = AggregatedDiscoveryServiceClient::with_interceptor(
        cp.channel().await,
        bearer(cp.admin_token()),
    );
    let rx = tokio::time::timeout(
        WAIT,
        client.delta_aggregated_resources(ReceiverStream::new(rx)),
    )
    .await
    .expect("DeltaAggregatedResources answered")
    .expect("DeltaAggregatedResources opened")
    .into_inner();
    Ads { tx, rx }
}

/// The gRPC node's request for `payments` and a service that does not
/// exist, answering `r` (or first, without one).
fn grpc_request(r: Option<&DiscoveryResponse>, error: Option<&str>) -> DiscoveryRequest {
    DiscoveryRequest {
        node: r.is_none().then(grpc_node),
        type_url: EPS.into(),
        resource_names: vec!["payments".into(), "missing".into()],
        version_info: r.map_or_else(String::new, |r| r.version_info.clone()),
        response_nonce: r.map_or_else(String::new, |r| r.nonce.clone()),
        error_detail: error.map(|m| RpcStatus {
            code: Code::InvalidArgument as i32,
            message: m.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn delta_ack(r: &DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: r.type_url.clone(),
        response_nonce: r.nonce.clone(),
        ..Default::default()
    }
}

async fn fetch(
    cp: &ControlPlane,
    token: &str,
    matchers: Vec<NodeMatcher>,
) -> Result<ClientStatusResponse, tonic::Status> {
    let mut client =
        ClientStatusDiscoveryServiceClient::with_interceptor(cp.channel().await, bearer(token));
    client
        .fetch_client_status(ClientStatusRequest {
            node_matchers: matchers,
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

fn node_id(pattern: MatchPattern) -> NodeMatcher {
    NodeMatcher {
        node_id: Some(StringMatcher {
            match_pattern: Some(pattern),
            ignore_case: false,
        }),
        node_metadatas: vec![],
    }
}

fn ids(resp: &ClientStatusResponse) -> Vec<&str> {
    resp.config
        .iter()
        .map(|c| c.node.as_ref().map_or("", |n| n.id.as_str()))
        .collect()
}

fn client<'a>(resp: &'a ClientStatusResponse, id: &str) -> &'a ClientConfig {
    resp.config
        .iter()
        .find(|c| c.node.as_ref().is_some_and(|n| n.id == id))
        .unwrap_or_else(|| panic!("no {id} in {:?}", ids(resp)))
}

/// (name, client status, version) of each `ServiceEndpoints` of a client.
fn resources(c: &ClientConfig) -> Vec<(String, ClientResourceStatus, String)> {
    c.generic_xds_configs
        .iter()
        .filter(|g| g.type_url == EPS)
        .map(|g| (g.name.clone(), g.client_status(), g.version_info.clone()))
        .collect()
}

/// Both kinds of client in `isdpctl proxy-status` and in CSDS, through an
/// ACK, then a NACK on the gRPC stream (kept, with its text and the
/// rejected version, beside the version still held) and an ACK on
/// Envoy's; node matchers filter; a stream that closes leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_and_envoy_clients_in_proxy_status_and_csds() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    cp.register("payments", "127.0.0.1", 9001, &[]).await;
    let mut grpc = sotw(&cp, grpc_request(None, None)).await;
    let mut envoy = delta(
        &cp,
        DeltaDiscoveryRequest {
            node: Some(envoy_node()),
            type_url: EPS.into(),
            resource_names_subscribe: vec!["payments".into()],
            ..Default::default()
        },
    )
    .await;
    // Until both see `payments`: registration reaches the cache
    // asynchronously, and each response is acknowledged.
    let mut first = grpc.next("gRPC's first set").await;
    // Whether an empty set is acknowledged below, before `payments`.
    let answered_before = first.resources.is_empty();
    while first.resources.is_empty() {
        grpc.send(grpc_request(Some(&first), None)).await;
        first = grpc.next("gRPC's set with payments").await;
    }
    let mut e1 = envoy.next("Envoy's first response").await;
    while e1.resources.is_empty() {
        envoy.send(delta_ack(&e1)).await;
        e1 = envoy.next("Envoy's payments").await;
    }
    let admin = cp.admin_token();

    // Before the answer: sent and unanswered (STALE), and requested if
    // no earlier (empty) set was acknowledged.
    let resp = fetch(&cp, admin, vec![]).await.expect("FetchClientStatus");
    let py = client(&resp, "py-1");
    assert_eq!(py.generic_xds_configs.len(), 2, "{py:?}");
    assert!(
        py.generic_xds_configs
            .iter()
            .all(|g| g.config_status() == ConfigStatus::Stale
                && (answered_before || g.client_status() == ClientResourceStatus::Requested)),
        "{py:?}"
    );

    grpc.send(grpc_request(Some(&first), None)).await;
    envoy.send(delta_ack(&e1)).await;
    let v1 = first.version_info.clone();
    let e1_version = e1.resources[0].version.clone();
    eventually(WAIT, "both ACKs in CSDS", || async {
        let resp = fetch(&cp, admin, vec![]).await?;
        anyhow::ensure!(ids(&resp) == ["envoy-1", "py-1"], "{:?}", ids(&resp));
        let py = resources(client(&resp, "py-1"));
        anyhow::ensure!(
            py == [
                (
                    "missing".into(),
                    ClientResourceStatus::DoesNotExist,
                    v1.clone()
                ),
                ("payments".into(), ClientResourceStatus::Acked, v1.clone()),
            ],
            "{py:?}"
        );
        let envoy = resources(client(&resp, "envoy-1"));
        anyhow::ensure!(
            envoy
                == [(
                    "payments".into(),
                    ClientResourceStatus::Acked,
                    e1_version.clone()
                )],
            "{envoy:?}"
        );
        Ok(())
    })
    .await;
    let resp = fetch(&cp, admin, vec![]).await.unwrap();
    let py = client(&resp, "py-1");
    let node = py.node.as_ref().unwrap();
    assert_eq!(
        (
            node.user_agent_name.as_str(),
            node.user_agent_version_type.clone(),
            node.cluster.as_str(),
            node.locality.as_ref().map(|l| l.zone.as_str()),
        ),
        (
            "gRPC Python",
            Some(UserAgentVersionType::UserAgentVersion("1.85.0".into())),
            "checkout",
            Some("eu-1a"),
        )
    );
    assert!(
        py.generic_xds_configs
            .iter()
            .all(|g| g.config_status() == ConfigStatus::Synced && g.last_updated.is_some())
    );
    let envoy_version = client(&resp, "envoy-1")
        .node
        .as_ref()
        .unwrap()
        .user_agent_version_type
        .clone();
    assert_eq!(
        envoy_version,
        Some(UserAgentVersionType::UserAgentVersion("1.34.2".into())),
        "Envoy's build version, as major.minor.patch"
    );

    // proxy-status: both kinds, by their user agents.
    let out = cp.ctl_ok(&["-o", "json", "proxy-status"]).await;
    let list: Vec<serde_json::Value> = serde_json::from_str(&out).expect("proxy-status JSON");
    let kinds: Vec<(&str, &str, &str)> = list
        .iter()
        .map(|p| {
            (
                p["node_id"].as_str().unwrap_or_default(),
                p["kind"].as_str().unwrap_or_default(),
                p["user_agent_name"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("envoy-1", "envoy", "envoy"),
            ("py-1", "grpc", "gRPC Python")
        ],
        "{out}"
    );
    assert_eq!(list[1]["types"][0]["acked"][""], v1.as_str(), "{out}");
    let table = cp.ctl_ok(&["proxy-status"]).await;
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header[..3], ["NODE", "KIND", "PEER"], "{table}");
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert_eq!(rows[0][..2], ["envoy-1", "envoy"], "{table}");
    assert_eq!(rows[1][..2], ["py-1", "grpc"], "{table}");
    assert!(
        rows.iter().all(|r| r.contains(&"ServiceEndpoints")),
        "short type names: {table}"
    );

    // A new instance: gRPC rejects the set, Envoy accepts its update.
    cp.register("payments", "127.0.0.1", 9002, &[]).await;
    let second = grpc.next("the set with two instances").await;
    grpc.send(grpc_request(Some(&second), Some("bad endpoint: 9002")))
        .await;
    let e2 = envoy.next("Envoy's update").await;
    envoy.send(delta_ack(&e2)).await;
    let e2_version = e2.resources[0].version.clone();
    eventually(WAIT, "the NACK and the ACK in CSDS", || async {
        let resp = fetch(&cp, admin, vec![]).await?;
        let py = client(&resp, "py-1");
        let payments = py
            .generic_xds_configs
            .iter()
            .find(|g| g.name == "payments")
            .ok_or_else(|| anyhow::anyhow!("no payments: {py:?}"))?;
        anyhow::ensure!(
            payments.client_status() == ClientResourceStatus::Nacked,
            "{payments:?}"
        );
        anyhow::ensure!(payments.config_status() == ConfigStatus::Error);
        anyhow::ensure!(payments.version_info == v1, "the set still held");
        let error = payments.error_state.as_ref().expect("error_state");
        anyhow::ensure!(error.details == "bad endpoint: 9002", "{error:?}");
        anyhow::ensure!(error.version_info == second.version_info, "{error:?}");
        anyhow::ensure!(error.last_update_attempt.is_some());
        let envoy = resources(client(&resp, "envoy-1"));
        anyhow::ensure!(
            envoy
                == [(
                    "payments".into(),
                    ClientResourceStatus::Acked,
                    e2_version.clone()
                )],
            "{envoy:?}"
        );
        Ok(())
    })
    .await;

    // Node matchers: by prefix, exactly, several; others refused by field.
    let prefix = fetch(&cp, admin, vec![node_id(MatchPattern::Prefix("py".into()))])
        .await
        .unwrap();
    assert_eq!(ids(&prefix), ["py-1"]);
    let exact = fetch(
        &cp,
        admin,
        vec![node_id(MatchPattern::Exact("envoy-1".into()))],
    )
    .await
    .unwrap();
    assert_eq!(ids(&exact), ["envoy-1"]);
    let none = fetch(
        &cp,
        admin,
        vec![node_id(MatchPattern::Exact("envoy".into()))],
    )
    .await
    .unwrap();
    assert!(none.config.is_empty(), "exact is exact");
    let both = fetch(
        &cp,
        admin,
        vec![
            node_id(MatchPattern::Exact("envoy-1".into())),
            node_id(MatchPattern::Prefix("py-".into())),
        ],
    )
    .await
    .unwrap();
    assert_eq!(ids(&both), ["envoy-1", "py-1"]);
    for (pattern, field) in [
        (
            MatchPattern::Suffix("-1".into()),
            "node_matchers[0].node_id.suffix",
        ),
        (
            MatchPattern::Contains("y".into()),
            "node_matchers[0].node_id.contains",
        ),
    ] {
        let e = fetch(&cp, admin, vec![node_id(pattern)]).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        assert!(e.message().starts_with(field), "{e}");
    }
    let metadata = NodeMatcher {
        node_metadatas: vec![Default::default()],
        ..Default::default()
    };
    let e = fetch(&cp, admin, vec![metadata]).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(
        e.message().starts_with("node_matchers[0].node_metadatas"),
        "{e}"
    );

    // A closed stream leaves both views.
    drop(grpc);
    eventually(WAIT, "py-1 leaves", || async {
        let resp = fetch(&cp, admin, vec![]).await?;
        anyhow::ensure!(ids(&resp) == ["envoy-1"], "{:?}", ids(&resp));
        Ok(())
    })
    .await;
    drop(envoy);
}

/// `StreamClientStatus` answers each request on one stream, and a request
/// it cannot apply ends the stream with INVALID_ARGUMENT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_client_status_answers_each_request() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let mut grpc = sotw(&cp, grpc_request(None, None)).await;
    let first = grpc.next("gRPC's first set").await;
    grpc.send(grpc_request(Some(&first), None)).await;

    let (tx, rx) = mpsc::channel(4);
    let mut client = ClientStatusDiscoveryServiceClient::with_interceptor(
        cp.channel().await,
        bearer(cp.admin_token()),
    );
    tx.send(ClientStatusRequest::default()).await.unwrap();
    let mut answers = client
        .stream_client_status(ReceiverStream::new(rx))
        .await
        .expect("StreamClientStatus opened")
        .into_inner();
    let all = next(&mut answers).await.unwrap().expect("an answer");
    assert_eq!(ids(&all), ["py-1"]);
    tx.send(ClientStatusRequest {
        node_matchers: vec![node_id(MatchPattern::Prefix("envoy".into()))],
        ..Default::default()
    })
    .await
    .unwrap();
    let none = next(&mut answers).await.unwrap().expect("a second answer");
    assert!(none.config.is_empty());
    tx.send(ClientStatusRequest {
        node_matchers: vec![node_id(MatchPattern::Suffix("1".into()))],
        ..Default::default()
    })
    .await
    .unwrap();
    let e = next(&mut answers).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(
        e.message().starts_with("node_matchers[0].node_id.suffix"),
        "{e}"
    );
}

async fn next(
    answers: &mut Streaming<ClientStatusResponse>,
) -> Result<Option<ClientStatusResponse>, tonic::Status> {
    tokio::time::timeout(WAIT, answers.message())
        .await
        .expect("an answer in time")
}

/// CSDS is an operator view like `ProxyStatus/ListProxies`: a read token
/// gets it; a join token (a sidecar's, or a gRPC client's) is refused,
/// since every node's status would be its to read; no token is
/// unauthenticated. Both methods alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csds_needs_the_read_role() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let read = cp.create_token(&["--role", "read"]).await.secret;
    let join = cp
        .create_token(&["--role", "join", "--service", "web"])
        .await
        .secret;
    assert!(fetch(&cp, &read, vec![]).await.is_ok());
    let e = fetch(&cp, &join, vec![]).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(e.message().contains("read"), "names the role: {e}");

    let mut anonymous = ClientStatusDiscoveryServiceClient::new(cp.channel().await);
    let e = anonymous
        .fetch_client_status(ClientStatusRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    let e = anonymous
        .stream_client_status(tokio_stream::iter(vec![ClientStatusRequest::default()]))
        .await
        .map(drop)
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    let mut joined =
        ClientStatusDiscoveryServiceClient::with_interceptor(cp.channel().await, bearer(&join));
    let e = joined
        .stream_client_status(tokio_stream::iter(vec![ClientStatusRequest::default()]))
        .await
        .map(drop)
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
}

/// The node's other fields are the client's word, shown in tables and
/// CSDS: one too long or holding control characters ends the stream with
/// INVALID_ARGUMENT naming the field, for both protocols, and the stream
/// is never listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_node_fields_end_the_stream_naming_the_field() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let cases: [(&str, Node); 4] = [
        (
            "node.user_agent_name: \"gRPC\\nforged\" holds control characters",
            Node {
                user_agent_name: "gRPC\nforged".into(),
                ..grpc_node()
            },
        ),
        (
            "node.cluster: 257 bytes, at most 256",
            Node {
                cluster: "c".repeat(257),
                ..grpc_node()
            },
        ),
        (
            "node.locality.zone: \"eu\\u{1b}[31m\" holds control characters",
            Node {
                locality: Some(Locality {
                    zone: "eu\x1b[31m".into(),
                    ..Default::default()
                }),
                ..grpc_node()
            },
        ),
        (
            "node.user_agent_version: 257 bytes, at most 256",
            Node {
                user_agent_version_type: Some(UserAgentVersionType::UserAgentVersion(
                    "1".repeat(257),
                )),
                ..envoy_node()
            },
        ),
    ];
    for (message, node) in cases {
        let mut s = sotw(
            &cp,
            DiscoveryRequest {
                node: Some(node.clone()),
                ..grpc_request(None, None)
            },
        )
        .await;
        let e = s.error(message).await;
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        assert_eq!(e.message(), message);
        let mut d = delta(
            &cp,
            DeltaDiscoveryRequest {
                node: Some(node),
                type_url: EPS.into(),
                resource_names_subscribe: vec!["payments".into()],
                ..Default::default()
            },
        )
        .await;
        let e = d.error(message).await;
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        assert_eq!(e.message(), message);
    }
    let resp = fetch(&cp, cp.admin_token(), vec![]).await.unwrap();
    assert!(resp.config.is_empty(), "{:?}", ids(&resp));
    let out = cp.ctl_ok(&["-o", "json", "proxy-status"]).await;
    assert_eq!(out.trim(), "[]");
}
