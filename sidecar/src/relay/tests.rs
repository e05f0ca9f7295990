//! The relay between a real tonic ADS client and an in-process fake
//! control plane driven by the test: bytes both ways, the sidecar's
//! credentials, the cap, the relay's own answers, shutdown, idle
//! connections and the unix socket.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Streaming};

use super::*;
use crate::config::RelayListen;

const WAIT: Duration = Duration::from_secs(5);

// === The fake control plane ===

/// One call as the fake control plane received it.
struct Call<Req, Resp> {
    metadata: MetadataMap,
    inbound: Streaming<Req>,
    outbound: mpsc::Sender<Result<Resp, Status>>,
}

type DeltaCall = Call<DeltaDiscoveryRequest, DeltaDiscoveryResponse>;
type SotwCall = Call<DiscoveryRequest, DiscoveryResponse>;

/// Hands every call to the test.
struct FakeAds {
    delta: mpsc::UnboundedSender<DeltaCall>,
    sotw: mpsc::UnboundedSender<SotwCall>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for FakeAds {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let (outbound, rx) = mpsc::channel(16);
        let metadata = request.metadata().clone();
        let inbound = request.into_inner();
        let _ = self.sotw.send(Call {
            metadata,
            inbound,
            outbound,
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let (outbound, rx) = mpsc::channel(16);
        let metadata = request.metadata().clone();
        let inbound = request.into_inner();
        let _ = self.delta.send(Call {
            metadata,
            inbound,
            outbound,
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A fake control plane on a runtime of its own, so a test can kill it
/// as a crash would: every socket closed at once, nothing said.
struct FakeCp {
    url: String,
    delta: mpsc::UnboundedReceiver<DeltaCall>,
    sotw: mpsc::UnboundedReceiver<SotwCall>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FakeCp {
    fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (delta_tx, delta) = mpsc::unbounded_channel();
        let (sotw_tx, sotw) = mpsc::unbounded_channel();
        let fake = FakeAds {
            delta: delta_tx,
            sotw: sotw_tx,
        };
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            tonic::transport::Server::builder()
                .add_service(AggregatedDiscoveryServiceServer::new(fake))
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
        });
        FakeCp {
            url,
            delta,
            sotw,
            runtime: Some(runtime),
        }
    }

    async fn delta_call(&mut self) -> DeltaCall {
        tokio::time::timeout(WAIT, self.delta.recv())
            .await
            .expect("the relay opened a delta call")
            .unwrap()
    }

    async fn sotw_call(&mut self) -> SotwCall {
        tokio::time::timeout(WAIT, self.sotw.recv())
            .await
            .expect("the relay opened a state-of-the-world call")
            .unwrap()
    }

    fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for FakeCp {
    fn drop(&mut self) {
        self.kill();
    }
}

// === The relay and its clients ===

struct Running {
    relay: Relay,
    addr: String,
    metrics: Metrics,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

async fn start(listen: RelayListen, urls: Vec<String>, max_streams: usize) -> Running {
    let listener = Listener::bind(&listen).await.unwrap();
    let addr = listener.local();
    let metrics = Metrics::new();
    let (stop, shutdown) = watch::channel(false);
    let settings = RelaySettings {
        control_plane: urls,
        auth: ControlAuth {
            token: Some("sidecar-token".into()),
            ..Default::default()
        },
        max_streams,
        drain: Duration::from_secs(2),
    };
    let (relay, task) = spawn(listener, settings, &metrics, shutdown);
    Running {
        relay,
        addr,
        metrics,
        stop,
        task,
    }
}

async fn start_tcp(urls: Vec<String>, max_streams: usize) -> Running {
    start(
        RelayListen::Tcp("127.0.0.1:0".parse().unwrap()),
        urls,
        max_streams,
    )
    .await
}

async fn client(addr: &str) -> AggregatedDiscoveryServiceClient<Channel> {
    AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect to the relay")
}

/// A client stream: requests in, responses (or the refusal) out.
struct Ads<Req, Resp> {
    tx: Option<mpsc::Sender<Req>>,
    rx: Result<Streaming<Resp>, Status>,
}

impl<Req, Resp> Ads<Req, Resp> {
    async fn send(&self, req: Req) {
        self.tx.as_ref().unwrap().send(req).await.unwrap();
    }

    async fn next(&mut self) -> Option<Resp> {
        let rx = self.rx.as_mut().expect("the stream was refused");
        tokio::time::timeout(WAIT, rx.message())
            .await
            .expect("an answer in time")
            .unwrap()
    }

    /// The status the stream fails with, on opening or after.
    async fn error(&mut self) -> Status {
        match &mut self.rx {
            Err(s) => s.clone(),
            Ok(rx) => match tokio::time::timeout(WAIT, rx.message()).await {
                Ok(Err(s)) => s,
                Ok(Ok(r)) => panic!("expected the stream to fail, got {}", r.is_some()),
                Err(_) => panic!("expected the stream to fail in time"),
            },
        }
    }
}

async fn delta(
    client: &mut AggregatedDiscoveryServiceClient<Channel>,
    first: DeltaDiscoveryRequest,
) -> Ads<DeltaDiscoveryRequest, DeltaDiscoveryResponse> {
    let (tx, rx) = mpsc::channel(4);
    tx.send(first).await.unwrap();
    let mut request = Request::new(ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("authorization", "Bearer client-secret".parse().unwrap());
    request
        .metadata_mut()
        .insert("x-client", "1".parse().unwrap());
    let rx = tokio::time::timeout(WAIT, client.delta_aggregated_resources(request))
        .await
        .expect("the relay answered")
        .map(Response::into_inner);
    Ads { tx: Some(tx), rx }
}

fn subscribe(node: &str, names: &[&str]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: Some(Node {
            id: node.into(),
            ..Default::default()
        }),
        type_url: "type.googleapis.com/isdp.v1.ServiceEndpoints".into(),
        resource_names_subscribe: names.iter().map(|n| n.to_string()).collect(),
        ..Default::default()
    }
}

fn response(nonce: &str) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: "type.googleapis.com/isdp.v1.ServiceEndpoints".into(),
        nonce: nonce.into(),
        resources: vec![Resource {
            name: "echo".into(),
            version: "v1".into(),
            resource: Some(Any {
                type_url: "type.googleapis.com/isdp.v1.ServiceEndpoints".into(),
                value: vec![10, 4, b'e', b'c', b'h', b'o'],
            }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

async fn received<Req>(call: &mut Streaming<Req>) -> Option<Req>
where
    Req: prost::Message + Default + 'static,
{
    tokio::time::timeout(WAIT, call.message())
        .await
        .expect("a request in time")
        .unwrap()
}

fn metric(m: &Metrics, line: &str) -> bool {
    m.render().lines().any(|l| l == line)
}

// === Tests ===

/// A delta stream is carried both ways message by message, unchanged; the
/// control plane sees the sidecar's token, never the client's metadata;
/// `open_streams` shows the node id, the peer and the control plane; a
/// client's half-close reaches the control plane, whose clean end reaches
/// the client, and frees the stream's place.
#[tokio::test]
async fn relays_delta_unchanged_with_the_sidecars_credentials() {
    let mut cp = FakeCp::start();
    let r = start_tcp(vec![cp.url.clone()], 4).await;
    let mut c = client(&r.addr).await;
    let first = subscribe("grpc-js-1", &["echo"]);
    let mut ads = delta(&mut c, first.clone()).await;
    let mut call = cp.delta_call().await;
    assert_eq!(
        call.metadata.get("authorization").unwrap(),
        "Bearer sidecar-token"
    );
    assert!(
        call.metadata.get("x-client").is_none(),
        "client metadata passed on"
    );
    assert_eq!(received(&mut call.inbound).await, Some(first));

    call.outbound.send(Ok(response("n1"))).await.unwrap();
    assert_eq!(ads.next().await, Some(response("n1")));
    let ack = DeltaDiscoveryRequest {
        type_url: "type.googleapis.com/isdp.v1.ServiceEndpoints".into(),
        response_nonce: "n1".into(),
        ..Default::default()
    };
    ads.send(ack.clone()).await;
    assert_eq!(received(&mut call.inbound).await, Some(ack));

    let open = r.relay.open_streams();
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(open[0].node_id, "grpc-js-1");
    assert!(open[0].delta);
    assert_eq!(open[0].control_plane.as_deref(), Some(cp.url.as_str()));
    assert!(open[0].peer.starts_with("127.0.0.1:"), "{}", open[0].peer);
    assert!(metric(&r.metrics, "isdp_xds_relay_streams_open 1"));
    assert!(metric(&r.metrics, "isdp_xds_relay_streams_total 1"));

    ads.tx = None;
    assert_eq!(
        received(&mut call.inbound).await,
        None,
        "half-close relayed"
    );
    drop(call.outbound);
    assert_eq!(ads.next().await, None, "the clean end relayed");
    tokio::time::timeout(WAIT, async {
        while !r.relay.open_streams().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the stream's place is freed");
    assert!(metric(&r.metrics, "isdp_xds_relay_streams_open 0"));
}

/// State of the world is relayed too, and a status the control plane ends
/// a stream with reaches the client unchanged: code, message, details.
#[tokio::test]
async fn relays_state_of_the_world_and_the_control_planes_status() {
    let mut cp = FakeCp::start();
    let r = start_tcp(vec![cp.url.clone()], 4).await;
    let mut c = client(&r.addr).await;
    let first = DiscoveryRequest {
        node: Some(Node {
            id: "grpcio-1".into(),
            ..Default::default()
        }),
        type_url: "type.googleapis.com/envoy.config.listener.v3.Listener".into(),
        resource_names: vec!["echo".into()],
        ..Default::default()
    };
    let (tx, rx) = mpsc::channel(4);
    tx.send(first.clone()).await.unwrap();
    let mut ads = Ads {
        tx: Some(tx),
        rx: c
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .map(Response::into_inner),
    };
    let mut call = cp.sotw_call().await;
    assert_eq!(received(&mut call.inbound).await, Some(first));
    assert_eq!(r.relay.open_streams()[0].node_id, "grpcio-1");
    assert!(!r.relay.open_streams()[0].delta);
    let answer = DiscoveryResponse {
        version_info: "1".into(),
        nonce: "a".into(),
        ..Default::default()
    };
    call.outbound.send(Ok(answer.clone())).await.unwrap();
    assert_eq!(ads.next().await, Some(answer));

    let refusal = Status::with_details(
        Code::PermissionDenied,
        "token 0123 may not read echo",
        bytes::Bytes::from_static(b"details"),
    );
    call.outbound.send(Err(refusal)).await.unwrap();
    let got = ads.error().await;
    assert_eq!(got.code(), Code::PermissionDenied);
    assert_eq!(got.message(), "token 0123 may not read echo");
    assert_eq!(got.details(), b"details");
}

/// Past `xds_relay_max_streams` a stream is RESOURCE_EXHAUSTED naming the
/// key and the limit (before any dialling), counted; a stream that ends
/// frees its place.
#[tokio::test]
async fn streams_past_the_cap_are_resource_exhausted() {
    let mut cp = FakeCp::start();
    let r = start_tcp(vec![cp.url.clone()], 2).await;
    let mut c = client(&r.addr).await;
    let mut held = Vec::new();
    for i in 0..2 {
        let ads = delta(&mut c, subscribe(&format!("n{i}"), &["echo"])).await;
        let call = cp.delta_call().await;
        held.push((ads, call));
    }
    let mut over = delta(&mut c, subscribe("n2", &["echo"])).await;
    let status = over.error().await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status
            .message()
            .contains("xds_relay_max_streams (2) reached"),
        "{status:?}"
    );
    assert!(
        cp.delta.try_recv().is_err(),
        "the refused stream was relayed"
    );
    assert!(metric(
        &r.metrics,
        r#"isdp_xds_relay_errors_total{reason="max-streams"} 1"#
    ));
    assert!(metric(&r.metrics, "isdp_xds_relay_streams_open 2"));

    drop(held.pop());
    tokio::time::timeout(WAIT, async {
        loop {
            let mut again = delta(&mut c, subscribe("n3", &["echo"])).await;
            if again.rx.is_ok() {
                return again.tx.take();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a place frees when a stream ends");
}

/// A stream that sends nothing holds no place under the cap and no call on
/// the control plane, and ends DEADLINE_EXCEEDED once
/// `FIRST_REQUEST_TIMEOUT` has passed, counted.
#[tokio::test]
async fn a_stream_without_a_request_holds_nothing_and_times_out() {
    let mut cp = FakeCp::start();
    let r = start_tcp(vec![cp.url.clone()], 1).await;
    let mut silent_client = client(&r.addr).await;
    let (_silent_tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(1);
    let silent = tokio::spawn(async move {
        silent_client
            .delta_aggregated_resources(Request::new(ReceiverStream::new(rx)))
            .await
    });

    // The one place is free for a stream that asks.
    let mut c = client(&r.addr).await;
    let mut ads = delta(&mut c, subscribe("n", &["echo"])).await;
    let mut call = cp.delta_call().await;
    let relayed = tokio::time::timeout(WAIT, call.inbound.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(relayed.node.unwrap().id, "n");
    assert!(
        cp.delta.try_recv().is_err(),
        "the silent stream was relayed"
    );
    drop(ads.tx.take());

    tokio::time::pause();
    tokio::time::advance(FIRST_REQUEST_TIMEOUT + Duration::from_secs(1)).await;
    tokio::time::resume();
    let status = tokio::time::timeout(WAIT, silent)
        .await
        .expect("the silent stream ended in time")
        .unwrap()
        .expect_err("the silent stream was refused");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("no request within 10 s"),
        "{status:?}"
    );
    assert!(metric(
        &r.metrics,
        r#"isdp_xds_relay_errors_total{reason="no-first-request"} 1"#
    ));
    assert!(
        cp.delta.try_recv().is_err(),
        "the silent stream was relayed"
    );
}

/// No control plane answering: UNAVAILABLE naming each URL tried, counted,
/// nothing held. With a live one among the URLs, a stream dials past the
/// dead ones.
#[tokio::test]
async fn an_unreachable_control_plane_is_unavailable_and_the_next_url_is_tried() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let r = start_tcp(vec![dead.clone()], 4).await;
    let mut c = client(&r.addr).await;
    let status = delta(&mut c, subscribe("n", &["echo"])).await.error().await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("control plane is unreachable")
            && status.message().contains(&format!("connect {dead}")),
        "{status:?}"
    );
    assert!(r.relay.open_streams().is_empty());
    assert!(metric(
        &r.metrics,
        r#"isdp_xds_relay_errors_total{reason="control-plane-unreachable"} 1"#
    ));

    let mut cp = FakeCp::start();
    let r = start_tcp(vec![dead.clone(), cp.url.clone()], 4).await;
    let mut c = client(&r.addr).await;
    for i in 0..2 {
        let mut ads = delta(&mut c, subscribe(&format!("n{i}"), &["echo"])).await;
        let mut call = cp.delta_call().await;
        received(&mut call.inbound).await.unwrap();
        call.outbound.send(Ok(response("x"))).await.unwrap();
        assert!(ads.next().await.is_some(), "stream {i} relayed");
    }
}

/// A control plane lost mid-stream (killed: its sockets close, no status)
/// ends the relayed stream with UNAVAILABLE naming it, so the client
/// reconnects with its own backoff; the next stream is UNAVAILABLE too
/// while it is down.
#[tokio::test]
async fn losing_the_control_plane_ends_the_stream_unavailable() {
    let mut cp = FakeCp::start();
    let r = start_tcp(vec![cp.url.clone()], 4).await;
    let mut c = client(&r.addr).await;
    let mut ads = delta(&mut c, subscribe("n", &["echo"])).await;
    let mut call = cp.delta_call().await;
    received(&mut call.inbound).await.unwrap();
    call.outbound.send(Ok(response("x"))).await.unwrap();
    ads.next().await.unwrap();

    cp.kill();
    let status = ads.error().await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status
            .message()
            .starts_with(&format!("xds relay: lost the control plane {}", cp.url)),
        "{status:?}"
    );
    let status = delta(&mut c, subscribe("n", &["echo"])).await.error().await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(metric(
        &r.metrics,
        r#"isdp_xds_relay_errors_total{reason="control-plane-unreachable"} 2"#
    ));
}

/// A request over 4 MiB is RESOURCE_EXHAUSTED, as the control plane would
/// answer it, and is not passed on; the relayed call is cancelled.
#[tokio::test]
async fn an_oversized_request_is_resource_exhausted() {
    let mut cp = FakeCp::start();
    let r = start_tcp(vec![cp.url.clone()], 4).await;
    let mut c = client(&r.addr).await;
    let mut ads = delta(&mut c, subscribe("n", &["echo"])).await;
    let mut call = cp.delta_call().await;
    received(&mut call.inbound).await.unwrap();
    let name = "x".repeat(MAX_REQUEST_BYTES);
    ads.send(subscribe("n", &[&name])).await;
    let status = ads.error().await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().starts_with("xds relay: "), "{status:?}");
    let after = tokio::time::timeout(WAIT, call.inbound.message()).await;
    assert!(
        !matches!(after, Ok(Ok(Some(_)))),
        "the oversized request was passed on"
    );
    assert!(metric(
        &r.metrics,
        r#"isdp_xds_relay_errors_total{reason="request-too-large"} 1"#
    ));
}

/// Shutdown ends every relayed stream with UNAVAILABLE (the client
/// reconnects once the sidecar is back) and the relay stops.
#[tokio::test]
async fn shutdown_ends_relayed_streams_unavailable() {
    let mut cp = FakeCp::start();
    let r = start_tcp(vec![cp.url.clone()], 4).await;
    let mut c = client(&r.addr).await;
    let mut ads = delta(&mut c, subscribe("n", &["echo"])).await;
    let _call = cp.delta_call().await;
    r.stop.send_replace(true);
    let status = ads.error().await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "xds relay: the sidecar is shutting down");
    tokio::time::timeout(WAIT, r.task)
        .await
        .expect("the relay stops")
        .unwrap();
}

/// Only the two ADS methods are served.
#[tokio::test]
async fn other_methods_are_unimplemented() {
    let cp = FakeCp::start();
    let r = start_tcp(vec![cp.url.clone()], 4).await;
    let channel = Channel::from_shared(format!("http://{}", r.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let status = grpc
        .unary(
            Request::new(bytes::Bytes::new()),
            http::uri::PathAndQuery::from_static("/isdp.v1.Registry/Register"),
            codec::RawCodec,
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    assert!(r.relay.open_streams().is_empty());
}

/// A connection that never opens a stream (not even the HTTP/2 preface)
/// is closed once idle for `IDLE_TIMEOUT`, not before.
#[tokio::test(start_paused = true)]
async fn a_connection_without_a_stream_is_closed_when_idle() {
    let r = start_tcp(vec!["http://127.0.0.1:1".into()], 4).await;
    let mut conn = tokio::net::TcpStream::connect(&r.addr).await.unwrap();
    let opened = tokio::time::Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(n.is_ok(), "the idle connection was never closed");
    let idle = opened.elapsed();
    assert!(
        idle >= IDLE_TIMEOUT && idle < IDLE_TIMEOUT + Duration::from_secs(3),
        "closed after {idle:?}"
    );
}

/// While a stream is open its connection is not idle, however long.
#[tokio::test(start_paused = true)]
async fn a_connection_holding_a_stream_is_not_idle() {
    let activity = activity::Activity::new();
    let held = activity.stream();
    let idle = activity.idle_for(IDLE_TIMEOUT);
    tokio::pin!(idle);
    assert!(
        tokio::time::timeout(IDLE_TIMEOUT * 10, &mut idle)
            .await
            .is_err(),
        "idle while a stream is open"
    );
    drop(held);
    let start = tokio::time::Instant::now();
    idle.await;
    assert_eq!(start.elapsed(), IDLE_TIMEOUT);
}

/// A unix socket is 0660 at its path, relays like the port (the peer
/// shown by uid), refuses a second relay while served, replaces a stale
/// socket, refuses a file that is not a socket, and is removed at
/// shutdown.
#[tokio::test]
async fn a_unix_socket_is_0660_relays_and_is_removed_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("xds.sock");
    let listen = RelayListen::Unix(path.clone());
    // A stale socket from a sidecar that died: replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let mut cp = FakeCp::start();
    let r = start(listen.clone(), vec![cp.url.clone()], 4).await;
    assert_eq!(r.addr, format!("unix:{}", path.display()));
    let meta = std::fs::metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, UNIX_SOCKET_MODE);

    let err = Listener::bind(&listen).await.err().expect("refused");
    assert!(
        err.to_string()
            .ends_with("another process is serving on this socket"),
        "{err}"
    );

    let connect_path = path.clone();
    let channel = tonic::transport::Endpoint::from_static("http://relay")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = connect_path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .unwrap();
    let mut c = AggregatedDiscoveryServiceClient::new(channel);
    let mut ads = delta(&mut c, subscribe("uds-1", &["echo"])).await;
    let mut call = cp.delta_call().await;
    received(&mut call.inbound).await.unwrap();
    call.outbound.send(Ok(response("u"))).await.unwrap();
    assert_eq!(ads.next().await, Some(response("u")));
    let peer = r.relay.open_streams()[0].peer.clone();
    assert!(peer.starts_with("unix uid "), "{peer}");

    r.stop.send_replace(true);
    tokio::time::timeout(WAIT, r.task).await.unwrap().unwrap();
    assert!(!path.exists(), "the socket is removed at shutdown");

    std::fs::write(&path, "not a socket").unwrap();
    let err = Listener::bind(&listen).await.err().expect("refused");
    assert!(err.to_string().contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a socket");
}

/// How the control plane's side failing reads to the client.
#[test]
fn control_plane_failures_read_as_unavailable_its_statuses_pass() {
    let url = "https://cp:15010";
    let (s, e) = stream::from_control_plane(&Status::unavailable("connection refused"), url);
    assert_eq!(
        (s.code(), s.message(), e),
        (
            Code::Unavailable,
            "xds relay: lost the control plane https://cp:15010: connection refused",
            Some(RelayError::ControlPlaneUnreachable)
        )
    );
    let transport = Status::from_error(Box::new(std::io::Error::other("reset")));
    let (s, e) = stream::from_control_plane(&transport, url);
    assert_eq!(
        (s.code(), e),
        (Code::Unavailable, Some(RelayError::ControlPlaneUnreachable))
    );
    for code in [
        Code::Unauthenticated,
        Code::PermissionDenied,
        Code::InvalidArgument,
        Code::ResourceExhausted,
    ] {
        let (s, e) = stream::from_control_plane(&Status::new(code, "cp says"), url);
        assert_eq!((s.code(), s.message(), e), (code, "cp says", None));
    }
    let (s, e) = stream::from_control_plane(&Status::out_of_range("too long"), url);
    assert_eq!(
        (s.code(), e),
        (Code::ResourceExhausted, Some(RelayError::ResponseTooLarge))
    );
    assert!(stream::from_client(&Status::cancelled("gone")).is_none());
}
