//! The client against an in-process fake ADS server driven by the test.

use std::pin::Pin;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use futures::Stream;
use isdp_proto::v1::{SERVICE_ENDPOINTS_TYPE_URL, ServiceEndpoints};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

use super::*;

type Outbound = mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>;

/// Hands every new delta stream to the test.
struct FakeAds {
    streams: mpsc::UnboundedSender<(Streaming<DeltaDiscoveryRequest>, Outbound)>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for FakeAds {
    type StreamAggregatedResourcesStream =
        Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        _: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented("delta only"))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        let _ = self.streams.send((request.into_inner(), tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

async fn fake_server() -> (
    String,
    mpsc::UnboundedReceiver<(Streaming<DeltaDiscoveryRequest>, Outbound)>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (streams, rx) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(FakeAds { streams }))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (url, rx)
}

fn payments(version: &str, body_service: &str) -> Resource {
    let body = ServiceEndpoints {
        service: body_service.into(),
        endpoints: vec![isdp_proto::v1::Endpoint {
            instance_id: "n1.payments".into(),
            address: "127.0.0.1".into(),
            port: 8081,
            weight: 1,
            metadata: Default::default(),
            status: 1,
            inbound_port: 0,
            zone: String::new(),
            priority: 0,
            ..Default::default()
        }],
    };
    Resource {
        name: "payments".into(),
        version: version.into(),
        resource: Some(Any {
            type_url: SERVICE_ENDPOINTS_TYPE_URL.into(),
            value: body.encode_to_vec(),
        }),
        ..Default::default()
    }
}

async fn next_any(inbound: &mut Streaming<DeltaDiscoveryRequest>) -> DeltaDiscoveryRequest {
    tokio::time::timeout(Duration::from_secs(5), inbound.message())
        .await
        .expect("request in time")
        .unwrap()
        .unwrap()
}

/// The next request about endpoints, skipping the other types'.
async fn next(inbound: &mut Streaming<DeltaDiscoveryRequest>) -> DeltaDiscoveryRequest {
    loop {
        let r = next_any(inbound).await;
        if r.type_url == SERVICE_ENDPOINTS_TYPE_URL {
            return r;
        }
    }
}

#[tokio::test]
async fn subscribes_acks_nacks_and_resumes() {
    let (url, mut streams) = fake_server().await;
    let (stop, shutdown) = watch::channel(false);
    let settings = XdsSettings {
        node_id: "web-1".into(),
        // A dead URL first: the client must rotate to the live one.
        control_plane: vec!["http://127.0.0.1:1".into(), url.clone()],
        upstreams: vec!["payments".into(), "orders".into()],
        local_services: vec![],
        auth: Default::default(),
    };
    let (mut snapshots, task) = spawn(settings, shutdown);

    let (mut inbound, outbound) = streams.recv().await.unwrap();
    let first = next(&mut inbound).await;
    // The node names the sidecar and its kind of client.
    let node = first.node.clone().unwrap();
    assert_eq!(node.id, "web-1");
    assert_eq!(
        (node.user_agent_name.as_str(), node.user_agent_version_type),
        (
            "isdp-sidecar",
            Some(
                envoy_types::pb::envoy::config::core::v3::node::UserAgentVersionType::UserAgentVersion(
                    env!("CARGO_PKG_VERSION").into()
                )
            )
        )
    );
    assert_eq!(first.type_url, SERVICE_ENDPOINTS_TYPE_URL);
    let mut names = first.resource_names_subscribe.clone();
    names.sort();
    assert_eq!(names, ["orders", "payments"]);
    assert!(first.initial_resource_versions.is_empty());

    let response = |resources, removed: &[&str], nonce: &str| DeltaDiscoveryResponse {
        type_url: SERVICE_ENDPOINTS_TYPE_URL.into(),
        resources,
        removed_resources: removed.iter().map(|s| s.to_string()).collect(),
        nonce: nonce.into(),
        ..Default::default()
    };
    outbound
        .send(Ok(response(
            vec![payments("v1", "payments")],
            &["orders"],
            "n1",
        )))
        .await
        .unwrap();
    let ack = next(&mut inbound).await;
    assert_eq!(ack.response_nonce, "n1");
    assert!(ack.error_detail.is_none());
    let snap = snapshots.wait_for(|s| s.acks == 1).await.unwrap().clone();
    assert!(snap.ready && snap.connected);
    assert_eq!(snap.control_plane.as_deref(), Some(url.as_str()));
    assert_eq!(snap.reconnects, 1);
    assert_eq!(
        snap.acked,
        [("payments".to_string(), "v1".to_string())].into()
    );
    assert_eq!(snap.upstreams["payments"].endpoints[0].port, 8081);
    assert!(!snap.upstreams["orders"].exists);

    // A resource whose body names another service: NACK, state kept.
    outbound
        .send(Ok(response(vec![payments("v2", "orders")], &[], "n2")))
        .await
        .unwrap();
    let nack = next(&mut inbound).await;
    assert_eq!(nack.response_nonce, "n2");
    assert_eq!(nack.error_detail.unwrap().code, 3);
    let snap = snapshots.wait_for(|s| s.nacks == 1).await.unwrap().clone();
    assert_eq!(snap.upstreams["payments"].version, "v1");
    assert_eq!(snap.acks, 1);

    // The server goes away; the client resumes with what it holds.
    drop((inbound, outbound));
    let (mut inbound, _outbound) = tokio::time::timeout(Duration::from_secs(10), streams.recv())
        .await
        .unwrap()
        .unwrap();
    let resumed = next(&mut inbound).await;
    assert_eq!(
        resumed.initial_resource_versions,
        [("payments".to_string(), "v1".to_string())].into()
    );
    let snap = snapshots.wait_for(|s| s.connected).await.unwrap().clone();
    assert!(snap.ready, "stays ready across reconnects");
    assert_eq!(snap.upstreams["payments"].version, "v1");

    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .unwrap()
        .unwrap();
    assert!(!snapshots.borrow().connected);
}

#[tokio::test]
async fn follows_the_trust_bundle_and_policies_without_upstreams() {
    use isdp_proto::v1::{
        AUTHORIZATION_POLICY_TYPE_URL, AuthorizationPolicy, TRUST_BUNDLE_TYPE_URL, TrustBundle,
    };
    let (url, mut streams) = fake_server().await;
    let (_stop, shutdown) = watch::channel(false);
    let settings = XdsSettings {
        node_id: "web-1".into(),
        control_plane: vec![url],
        upstreams: vec![],
        local_services: vec!["web".into()],
        auth: Default::default(),
    };
    let (mut snapshots, _task) = spawn(settings, shutdown);
    assert!(snapshots.borrow().ready, "ready at once without upstreams");
    let (mut inbound, outbound) = streams.recv().await.unwrap();
    let bundle_sub = next_any(&mut inbound).await;
    assert_eq!(bundle_sub.type_url, TRUST_BUNDLE_TYPE_URL);
    assert_eq!(bundle_sub.resource_names_subscribe, ["mesh"]);
    let policy_sub = next_any(&mut inbound).await;
    assert_eq!(policy_sub.type_url, AUTHORIZATION_POLICY_TYPE_URL);
    assert_eq!(policy_sub.resource_names_subscribe, ["web"]);

    let ca = crate::tls::test_pki::TestCa::new("mesh");
    let bundle = TrustBundle {
        trust_domain: "mesh.test".into(),
        roots_der: vec![ca.root.to_vec()],
        ..Default::default()
    };
    let policy = AuthorizationPolicy {
        destination: "web".into(),
        trust_domain: "mesh.test".into(),
        ..Default::default()
    };
    let one = |type_url: &str, name: &str, body: Vec<u8>, nonce: &str| DeltaDiscoveryResponse {
        type_url: type_url.into(),
        resources: vec![Resource {
            name: name.into(),
            version: "v1".into(),
            resource: Some(Any {
                type_url: type_url.into(),
                value: body,
            }),
            ..Default::default()
        }],
        nonce: nonce.into(),
        ..Default::default()
    };
    outbound
        .send(Ok(one(
            TRUST_BUNDLE_TYPE_URL,
            "mesh",
            bundle.encode_to_vec(),
            "b1",
        )))
        .await
        .unwrap();
    let ack = next_any(&mut inbound).await;
    assert_eq!(
        (ack.type_url.as_str(), ack.response_nonce.as_str()),
        (TRUST_BUNDLE_TYPE_URL, "b1")
    );
    outbound
        .send(Ok(one(
            AUTHORIZATION_POLICY_TYPE_URL,
            "web",
            policy.encode_to_vec(),
            "p1",
        )))
        .await
        .unwrap();
    let ack = next_any(&mut inbound).await;
    assert_eq!(ack.type_url, AUTHORIZATION_POLICY_TYPE_URL);
    assert!(ack.error_detail.is_none());
    let snap = snapshots.wait_for(|s| s.acks == 2).await.unwrap().clone();
    assert_eq!(snap.trust_bundle, Some(bundle));
    assert_eq!(snap.authz_policies["web"], policy);
    assert_eq!(snap.acked_by_type["TrustBundle/mesh"], "v1");
    assert_eq!(snap.acked_by_type["AuthorizationPolicy/web"], "v1");

    // A bundle with a broken root is NACKed and the old one kept.
    outbound
        .send(Ok(one(
            TRUST_BUNDLE_TYPE_URL,
            "mesh",
            TrustBundle {
                trust_domain: "mesh.test".into(),
                roots_der: vec![vec![1, 2, 3]],
                ..Default::default()
            }
            .encode_to_vec(),
            "b2",
        )))
        .await
        .unwrap();
    let nack = next_any(&mut inbound).await;
    assert_eq!(nack.error_detail.unwrap().code, 3);
    let snap = snapshots.wait_for(|s| s.nacks == 1).await.unwrap().clone();
    assert!(snap.trust_bundle.is_some());
}

#[tokio::test]
async fn no_upstreams_is_ready_at_once() {
    let (stop, shutdown) = watch::channel(false);
    let settings = XdsSettings {
        node_id: "n".into(),
        control_plane: vec!["http://127.0.0.1:1".into()],
        upstreams: vec![],
        local_services: vec![],
        auth: Default::default(),
    };
    let (snapshots, task) = spawn(settings, shutdown);
    assert!(snapshots.borrow().ready);
    stop.send(true).unwrap();
    task.await.unwrap();
}

async fn next_stream(
    streams: &mut mpsc::UnboundedReceiver<(Streaming<DeltaDiscoveryRequest>, Outbound)>,
) -> (Streaming<DeltaDiscoveryRequest>, Outbound) {
    tokio::time::timeout(Duration::from_secs(10), streams.recv())
        .await
        .expect("the client reconnects")
        .unwrap()
}

/// The first snapshot satisfying `f`, within 10 s.
async fn until(
    snapshots: &mut watch::Receiver<Arc<Snapshot>>,
    f: impl FnMut(&Arc<Snapshot>) -> bool,
) -> Arc<Snapshot> {
    tokio::time::timeout(Duration::from_secs(10), snapshots.wait_for(f))
        .await
        .expect("in time")
        .unwrap()
        .clone()
}

/// A stream the control plane ends with UNAUTHENTICATED (the sidecar's
/// token was revoked) is reported as a refusal until a stream opens again;
/// one that merely fails is not.
#[tokio::test]
async fn a_refusal_is_reported_until_a_stream_opens() {
    let (url, mut streams) = fake_server().await;
    let (_stop, shutdown) = watch::channel(false);
    let settings = XdsSettings {
        node_id: "web-1".into(),
        control_plane: vec![url],
        upstreams: vec![],
        local_services: vec![],
        auth: Default::default(),
    };
    let (mut snapshots, _task) = spawn(settings, shutdown);
    let (_inbound, outbound) = next_stream(&mut streams).await;
    until(&mut snapshots, |s| s.connected).await;
    outbound
        .send(Err(Status::unauthenticated(
            "token 0123456789abcdef was revoked",
        )))
        .await
        .unwrap();
    let snap = until(&mut snapshots, |s| s.refused.is_some()).await;
    assert_eq!(
        snap.refused.as_deref(),
        Some("token 0123456789abcdef was revoked")
    );

    // Accepted again: no longer refused.
    let (_inbound, outbound) = next_stream(&mut streams).await;
    until(&mut snapshots, |s| s.refused.is_none()).await;
    // An outage is not a refusal.
    outbound
        .send(Err(Status::unavailable("going away")))
        .await
        .unwrap();
    until(&mut snapshots, |s| !s.connected).await;
    assert_eq!(snapshots.borrow().refused, None);
}
