//! The xDS protocol end to end: a real control plane in-process, real gRPC
//! on loopback, and the standard `envoy-types` ADS client.
//!
//! Each test starts its own control plane (port 0, its own temp dir),
//! registers instances through the `Registry` API and watches what reaches
//! the ADS stream. Every wait is bounded: a response must arrive within
//! [`PROPAGATION`], and "nothing arrives" is watched for [`QUIET`].
//!
//! "Nothing arrived" is only meaningful if the stream is still alive and the
//! server has already read what we sent, so silent stretches are closed by a
//! [`DeltaAds::round_trip`]: a subscription to a name that does not exist,
//! whose answer (requests are handled in order) must name only that marker.
//!
//! # Layout
//! - [`ControlPlane`]: start/stop, register/deregister, `/metrics`.
//! - [`Ads`]: one ADS stream, its request sender and `next`/`quiet` waits.
//! - request builders and decoders for delta and state of the world.
//! - the tests, one per protocol behaviour.
//! - `standard`: the standard Envoy resources (listeners, routes,
//!   clusters, endpoint assignments) over the same streams.

mod standard;

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    time::{Duration, Instant},
};

use clap::Parser;
use envoy_types::pb::{
    envoy::{
        config::core::v3::Node,
        service::discovery::v3::{
            DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        },
    },
    google::{protobuf::Any, rpc::Status as RpcStatus},
};
use isdp_core::dial::{ControlAuth, ControlChannel as Channel};
use isdp_proto::v1::{
    DeregisterRequest, Instance, RegisterRequest, SERVICE_ENDPOINTS_TYPE_URL, ServiceEndpoints,
    registry_client::RegistryClient,
};
use prost::Message;
use tokio::{sync::mpsc, sync::watch, task::JoinHandle, time::timeout};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};

const TYPE_URL: &str = SERVICE_ENDPOINTS_TYPE_URL;
/// A change must reach a subscribed stream within this (the mesh's budget).
const PROPAGATION: Duration = Duration::from_secs(1);
/// How long a stream is watched to show that nothing is sent.
const QUIET: Duration = Duration::from_millis(300);
/// Budget for setup steps: connecting, registering, first publication.
const SETUP: Duration = Duration::from_secs(10);
const NODE_ID: &str = "xds-test-node";

// === ControlPlane ===

/// A control plane served in-process on loopback port 0.
struct ControlPlane {
    grpc: SocketAddr,
    admin: SocketAddr,
    /// One HTTP/2 connection, shared by the registry client and ADS streams.
    channel: Channel,
    /// The CA file's contents and the admin token.
    auth: ControlAuth,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), isdp_control_plane::Error>>,
    _dir: tempfile::TempDir,
}

impl ControlPlane {
    async fn start() -> Self {
        // Private, as the control plane wants its data dir.
        let dir = tempfile::Builder::new()
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .tempdir()
            .expect("temp dir");
        let config = isdp_control_plane::Config::parse_from([
            "isdp-control-plane",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--data-dir",
            dir.path().to_str().expect("utf-8 temp dir"),
        ]);
        let server = isdp_control_plane::Server::bind(config)
            .await
            .expect("bind control plane");
        let (grpc, admin) = (server.grpc_addr, server.admin_addr);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(server.serve(stop_rx));
        let read = |f: &str| {
            std::fs::read_to_string(dir.path().join(f)).unwrap_or_else(|e| panic!("{f}: {e}"))
        };
        let auth = ControlAuth {
            ca_pem: Some(read("ca.pem")),
            token: Some(read("admin.token").trim().to_owned()),
            identity: Default::default(),
            learned: Default::default(),
        };
        let channel = connect(grpc, &auth).await;
        ControlPlane {
            grpc,
            admin,
            channel,
            auth,
            stop,
            task,
            _dir: dir,
        }
    }

    /// Signals shutdown and checks the server stops cleanly.
    async fn stop(self) {
        drop(self.channel);
        self.stop.send_replace(true);
        let result = timeout(SETUP, self.task)
            .await
            .expect("control plane did not stop within 10 s")
            .expect("control plane task panicked");
        result.expect("control plane stopped with an error");
    }

    async fn register(&self, service: &str, id: &str, port: u32) {
        let instance = Instance {
            id: id.into(),
            service: service.into(),
            address: "127.0.0.1".into(),
            port,
            ..Default::default()
        };
        let mut client = RegistryClient::new(self.channel.clone());
        let call = client.register(RegisterRequest {
            instance: Some(instance),
        });
        timeout(SETUP, call)
            .await
            .unwrap_or_else(|_| panic!("Register {id} did not answer"))
            .unwrap_or_else(|s| panic!("Register {id}: {s}"));
    }

    async fn deregister(&self, id: &str) {
        let mut client = RegistryClient::new(self.channel.clone());
        timeout(
            SETUP,
            client.deregister(DeregisterRequest { id: id.into() }),
        )
        .await
        .unwrap_or_else(|_| panic!("Deregister {id} did not answer"))
        .unwrap_or_else(|s| panic!("Deregister {id}: {s}"));
    }

    /// Waits until the xDS cache serves `service` with exactly the instances
    /// `ids`, watched through a throwaway delta stream. Registration is
    /// asynchronous (store watch, debounce), so tests that assert on a
    /// *first* response call this before subscribing.
    async fn published(&self, service: &str, ids: &[&str]) {
        let mut ads = open_delta(&self.channel, subscribe(&[service])).await;
        let deadline = tokio::time::Instant::now() + SETUP;
        loop {
            let r = match tokio::time::timeout_at(deadline, ads.rx.message()).await {
                Ok(Ok(Some(r))) => r,
                other => panic!("{service} never published with {ids:?}: {other:?}"),
            };
            ads.send(ack(&r)).await;
            if let Some((_, se)) = delta_resources(&r).get(service)
                && instance_ids(se) == ids
            {
                return;
            }
        }
    }

    /// `isdp_xds_nacks_total` for our type, from the admin `/metrics`.
    async fn nacks(&self) -> u64 {
        let resp = isdp_tests::http::get(&self.admin.to_string(), "/metrics")
            .await
            .expect("GET /metrics");
        assert_eq!(resp.status, 200, "GET /metrics: {}", resp.body);
        resp.body
            .lines()
            .filter(|l| l.starts_with("isdp_xds_nacks_total{") && l.contains(TYPE_URL))
            .map(|l| {
                let value = l.rsplit(' ').next().unwrap_or_default();
                value
                    .parse::<f64>()
                    .unwrap_or_else(|_| panic!("bad metric line {l:?}")) as u64
            })
            .sum()
    }
}

/// A TLS channel trusting the control plane's CA, the admin token on every
/// call.
async fn connect(addr: SocketAddr, auth: &ControlAuth) -> Channel {
    timeout(
        SETUP,
        isdp_core::dial::connect(&format!("https://{addr}"), auth),
    )
    .await
    .expect("connecting timed out")
    .expect("connect to the control plane")
}

// === Ads ===

/// One ADS stream: requests go in through a channel, responses come out of
/// the gRPC stream.
struct Ads<Req, Resp> {
    tx: mpsc::Sender<Req>,
    rx: Streaming<Resp>,
}

type DeltaAds = Ads<DeltaDiscoveryRequest, DeltaDiscoveryResponse>;
type SotwAds = Ads<DiscoveryRequest, DiscoveryResponse>;

/// A one-line account of a response for failure messages: names with
/// versions, removals and nonce (the `Debug` form dumps encoded bytes).
trait Brief {
    fn brief(&self) -> String;
}

impl Brief for DeltaDiscoveryResponse {
    fn brief(&self) -> String {
        let resources: Vec<_> = self
            .resources
            .iter()
            .map(|r| format!("{}@{}", r.name, r.version))
            .collect();
        format!(
            "delta response nonce={:?} resources={resources:?} removed={:?}",
            self.nonce, self.removed_resources
        )
    }
}

impl Brief for DiscoveryResponse {
    fn brief(&self) -> String {
        let names: Vec<_> = sotw_resources(self).into_keys().collect();
        format!(
            "response nonce={:?} version_info={:?} resources={names:?}",
            self.nonce, self.version_info
        )
    }
}

impl<Req, Resp: Brief> Ads<Req, Resp> {
    async fn send(&self, req: Req) {
        self.tx
            .send(req)
            .await
            .expect("the request stream is closed");
    }

    /// The next response, which must come within [`PROPAGATION`].
    async fn next(&mut self, what: &str) -> Resp {
        match timeout(PROPAGATION, self.rx.message()).await {
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) => panic!("stream ended while waiting for {what}"),
            Ok(Err(s)) => panic!("stream failed while waiting for {what}: {s}"),
            Err(_) => panic!("no response within {PROPAGATION:?}: expected {what}"),
        }
    }

    /// Asserts that nothing arrives for [`QUIET`].
    async fn quiet(&mut self, why: &str) {
        match timeout(QUIET, self.rx.message()).await {
            Err(_) => {}
            Ok(Ok(Some(r))) => panic!("expected no response ({why}), got {}", r.brief()),
            Ok(Ok(None)) => panic!("stream ended while expecting silence ({why})"),
            Ok(Err(s)) => panic!("stream failed while expecting silence ({why}): {s}"),
        }
    }

    /// The error that ends the stream; any response first is a failure.
    async fn error(&mut self) -> tonic::Status {
        match timeout(SETUP, self.rx.message()).await {
            Ok(Err(s)) => s,
            Ok(Ok(Some(r))) => panic!("expected the stream to fail, got {}", r.brief()),
            Ok(Ok(None)) => panic!("expected the stream to fail, it ended cleanly"),
            Err(_) => panic!("expected the stream to fail within {SETUP:?}"),
        }
    }
}

impl DeltaAds {
    /// Proves the server has handled every request sent so far and has
    /// nothing else queued: subscribing to a name that does not exist must
    /// be answered by a response naming only it in `removed_resources`.
    /// ACKs that response.
    async fn round_trip(&mut self, marker: &str) {
        self.send(subscribe(&[marker])).await;
        let r = self
            .next(&format!("the removal of marker {marker:?}"))
            .await;
        assert_eq!(
            (delta_names(&r), r.removed_resources.clone()),
            (vec![], vec![marker.to_owned()]),
            "the marker's response carried something else queued on the stream"
        );
        self.send(ack(&r)).await;
    }
}

async fn try_open_delta(
    channel: &Channel,
    first: DeltaDiscoveryRequest,
) -> Result<DeltaAds, tonic::Status> {
    let (tx, rx) = mpsc::channel(16);
    tx.send(first).await.expect("queue the first request");
    let mut client = AggregatedDiscoveryServiceClient::new(channel.clone());
    let call = client.delta_aggregated_resources(ReceiverStream::new(rx));
    let resp = timeout(SETUP, call)
        .await
        .expect("DeltaAggregatedResources did not open")?;
    Ok(Ads {
        tx,
        rx: resp.into_inner(),
    })
}

async fn open_delta(channel: &Channel, first: DeltaDiscoveryRequest) -> DeltaAds {
    try_open_delta(channel, first)
        .await
        .expect("open a delta stream")
}

async fn try_open_sotw(
    channel: &Channel,
    first: DiscoveryRequest,
) -> Result<SotwAds, tonic::Status> {
    let (tx, rx) = mpsc::channel(16);
    tx.send(first).await.expect("queue the first request");
    let mut client = AggregatedDiscoveryServiceClient::new(channel.clone());
    let call = client.stream_aggregated_resources(ReceiverStream::new(rx));
    let resp = timeout(SETUP, call)
        .await
        .expect("StreamAggregatedResources did not open")?;
    Ok(Ads {
        tx,
        rx: resp.into_inner(),
    })
}

async fn open_sotw(channel: &Channel, first: DiscoveryRequest) -> SotwAds {
    try_open_sotw(channel, first)
        .await
        .expect("open a state-of-the-world stream")
}

// === Requests ===

fn node() -> Option<Node> {
    Some(Node {
        id: NODE_ID.into(),
        ..Default::default()
    })
}

fn strings(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

fn subscribe(names: &[&str]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: node(),
        type_url: TYPE_URL.into(),
        resource_names_subscribe: strings(names),
        ..Default::default()
    }
}

fn unsubscribe(names: &[&str]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: TYPE_URL.into(),
        resource_names_unsubscribe: strings(names),
        ..Default::default()
    }
}

/// A first request on a new stream, declaring the versions already held.
fn resume(names: &[&str], held: &HashMap<String, String>) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        initial_resource_versions: held.clone(),
        ..subscribe(names)
    }
}

fn ack(r: &DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: r.type_url.clone(),
        response_nonce: r.nonce.clone(),
        ..Default::default()
    }
}

fn nack(r: &DeltaDiscoveryResponse, message: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        error_detail: Some(RpcStatus {
            code: Code::InvalidArgument as i32,
            message: message.into(),
            ..Default::default()
        }),
        ..ack(r)
    }
}

/// A state-of-the-world request: the names wanted, the version last
/// accepted and the nonce of the latest response received.
fn sotw(names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        node: node(),
        type_url: TYPE_URL.into(),
        resource_names: strings(names),
        version_info: version.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

// === Decoding ===

fn decode(any: &Any) -> ServiceEndpoints {
    assert_eq!(
        any.type_url, TYPE_URL,
        "resource packed under the wrong type URL"
    );
    ServiceEndpoints::decode(any.value.as_slice()).expect("decode ServiceEndpoints")
}

/// The resources of a delta response: name -> (version, endpoints).
fn delta_resources(r: &DeltaDiscoveryResponse) -> BTreeMap<String, (String, ServiceEndpoints)> {
    r.resources
        .iter()
        .map(|res| {
            let se = decode(res.resource.as_ref().expect("a resource without its Any"));
            assert_eq!(
                se.service, res.name,
                "resource name is not the service name"
            );
            assert!(
                !res.version.is_empty(),
                "resource {} without a version",
                res.name
            );
            (res.name.clone(), (res.version.clone(), se))
        })
        .collect()
}

fn delta_names(r: &DeltaDiscoveryResponse) -> Vec<String> {
    delta_resources(r).into_keys().collect()
}

/// The resources of a state-of-the-world response, by service name.
fn sotw_resources(r: &DiscoveryResponse) -> BTreeMap<String, ServiceEndpoints> {
    r.resources
        .iter()
        .map(|any| {
            let se = decode(any);
            (se.service.clone(), se)
        })
        .collect()
}

fn instance_ids(se: &ServiceEndpoints) -> Vec<&str> {
    se.endpoints
        .iter()
        .map(|e| e.instance_id.as_str())
        .collect()
}

/// (id, address, port) of each endpoint, in the order sent.
fn endpoints(se: &ServiceEndpoints) -> Vec<(&str, &str, u32)> {
    se.endpoints
        .iter()
        .map(|e| (e.instance_id.as_str(), e.address.as_str(), e.port))
        .collect()
}

fn versions(r: &DeltaDiscoveryResponse) -> HashMap<String, String> {
    delta_resources(r)
        .into_iter()
        .map(|(n, (v, _))| (n, v))
        .collect()
}

// === Tests ===

/// Delta: the first response carries the subscribed resource that exists
/// (with its endpoints) and names the one that does not in
/// `removed_resources`. After the ACK, a new instance of either service
/// arrives within a second, and versions follow content: returning to the
/// earlier content returns the earlier version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_sends_changes_and_names_missing_resources() {
    let cp = ControlPlane::start().await;
    cp.register("pay", "pay-1", 8001).await;
    cp.published("pay", &["pay-1"]).await;

    let mut ads = open_delta(&cp.channel, subscribe(&["pay", "missing"])).await;
    let first = ads.next("pay, and missing as removed").await;
    assert_eq!(first.type_url, TYPE_URL);
    assert!(!first.nonce.is_empty(), "response without a nonce");
    assert_eq!(first.removed_resources, ["missing"]);
    let got = delta_resources(&first);
    assert_eq!(got.keys().collect::<Vec<_>>(), ["pay"]);
    let (v1, pay) = &got["pay"];
    assert_eq!(endpoints(pay), [("pay-1", "127.0.0.1", 8001)]);
    ads.send(ack(&first)).await;

    let t = Instant::now();
    cp.register("pay", "pay-2", 8002).await;
    let r = ads.next("pay with a second instance").await;
    let got = delta_resources(&r);
    assert_eq!(got.keys().collect::<Vec<_>>(), ["pay"], "{}", r.brief());
    assert!(r.removed_resources.is_empty(), "{}", r.brief());
    assert_ne!(&got["pay"].0, v1, "new content under the old version");
    assert_eq!(
        endpoints(&got["pay"].1),
        [("pay-1", "127.0.0.1", 8001), ("pay-2", "127.0.0.1", 8002)]
    );
    assert_ne!(r.nonce, first.nonce, "nonce reused");
    println!(
        "pay-2 reached the stream {:?} after Register was called",
        t.elapsed()
    );
    ads.send(ack(&r)).await;

    cp.register("missing", "missing-1", 8003).await;
    let r = ads.next("missing, now that it has an instance").await;
    let got = delta_resources(&r);
    assert_eq!(got.keys().collect::<Vec<_>>(), ["missing"], "{}", r.brief());
    assert_eq!(
        endpoints(&got["missing"].1),
        [("missing-1", "127.0.0.1", 8003)]
    );
    assert!(r.removed_resources.is_empty(), "{}", r.brief());
    ads.send(ack(&r)).await;

    cp.deregister("pay-2").await;
    let r = ads.next("pay back to one instance").await;
    assert_eq!(
        versions(&r).get("pay"),
        Some(v1),
        "same content must have the same version: {}",
        r.brief()
    );

    drop(ads);
    cp.stop().await;
}

/// Delta NACK: a rejected response is counted in `isdp_xds_nacks_total`,
/// is not resent, and does not stall the stream: the next change to the
/// subscribed service arrives with a new version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_nack_is_counted_and_not_resent() {
    let cp = ControlPlane::start().await;
    cp.register("pay", "pay-1", 8001).await;
    cp.published("pay", &["pay-1"]).await;
    let before = cp.nacks().await;

    let mut ads = open_delta(&cp.channel, subscribe(&["pay"])).await;
    let first = ads.next("pay").await;
    let nacked = versions(&first)["pay"].clone();
    ads.send(nack(&first, "rejected by the test")).await;

    cp.register("other", "other-1", 9001).await;
    ads.quiet("only an unsubscribed service changed after the NACK")
        .await;
    ads.round_trip("marker-after-nack").await;
    assert_eq!(
        cp.nacks().await,
        before + 1,
        "isdp_xds_nacks_total must rise by exactly one"
    );

    cp.register("pay", "pay-2", 8002).await;
    let r = ads.next("pay's next version after the NACK").await;
    let got = delta_resources(&r);
    assert_eq!(got.keys().collect::<Vec<_>>(), ["pay"], "{}", r.brief());
    assert_ne!(got["pay"].0, nacked, "the NACKed version was resent");
    assert_eq!(instance_ids(&got["pay"].1), ["pay-1", "pay-2"]);
    ads.send(ack(&r)).await;
    ads.quiet("the ACK of the new version").await;
    assert_eq!(cp.nacks().await, before + 1, "an ACK was counted as a NACK");

    drop(ads);
    cp.stop().await;
}

/// Delta unsubscribe: changes to an unsubscribed name are not sent; the
/// removal of the last instance of a still-subscribed service arrives as
/// its name in `removed_resources`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_unsubscribe_and_removal() {
    let cp = ControlPlane::start().await;
    cp.register("pay", "pay-1", 8001).await;
    cp.register("cart", "cart-1", 8101).await;
    cp.published("pay", &["pay-1"]).await;
    cp.published("cart", &["cart-1"]).await;

    let mut ads = open_delta(&cp.channel, subscribe(&["pay", "cart"])).await;
    let first = ads.next("pay and cart").await;
    assert_eq!(delta_names(&first), ["cart", "pay"]);
    ads.send(ack(&first)).await;

    ads.send(unsubscribe(&["pay"])).await;
    ads.round_trip("marker-after-unsubscribe").await;
    cp.register("pay", "pay-2", 8002).await;
    ads.quiet("pay changed after it was unsubscribed").await;

    cp.deregister("cart-1").await;
    let r = ads.next("cart removed").await;
    assert_eq!(r.removed_resources, ["cart"], "{}", r.brief());
    assert!(
        r.resources.is_empty(),
        "pay's change leaked into the removal: {}",
        r.brief()
    );
    ads.send(ack(&r)).await;
    ads.round_trip("marker-after-removal").await;

    drop(ads);
    cp.stop().await;
}

/// Delta reconnect: a new stream declaring, in `initial_resource_versions`,
/// the versions the client holds is sent nothing for unchanged names; when
/// one of them changed while the client was away, only that one is resent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_reconnect_resends_only_what_changed() {
    let cp = ControlPlane::start().await;
    cp.register("pay", "pay-1", 8001).await;
    cp.register("cart", "cart-1", 8101).await;
    cp.published("pay", &["pay-1"]).await;
    cp.published("cart", &["cart-1"]).await;
    let names = ["pay", "cart"];

    let mut ads = open_delta(&cp.channel, subscribe(&names)).await;
    let first = ads.next("pay and cart").await;
    let held = versions(&first);
    assert_eq!(held.len(), 2, "{}", first.brief());
    ads.send(ack(&first)).await;
    drop(ads);

    // Same versions: nothing to send.
    let mut ads = open_delta(&cp.channel, resume(&names, &held)).await;
    ads.quiet("every held version is current").await;
    ads.round_trip("marker-after-resume").await;
    drop(ads);

    // pay changes while no stream is open: its held version is stale.
    cp.register("pay", "pay-2", 8002).await;
    cp.published("pay", &["pay-1", "pay-2"]).await;
    let mut ads = open_delta(&cp.channel, resume(&names, &held)).await;
    let r = ads.next("pay, whose held version is stale").await;
    let got = delta_resources(&r);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        ["pay"],
        "cart was resent: {}",
        r.brief()
    );
    assert_ne!(got["pay"].0, held["pay"]);
    assert_eq!(instance_ids(&got["pay"].1), ["pay-1", "pay-2"]);
    assert!(r.removed_resources.is_empty(), "{}", r.brief());
    ads.send(ack(&r)).await;
    ads.round_trip("marker-after-stale-resume").await;

    drop(ads);
    cp.stop().await;
}

/// State of the world: every response is the full subscribed set with a
/// non-empty `version_info` and nonce. After the ACK, asking for a second
/// name (with the latest nonce, as xDS clients do) sends the full set of
/// both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_sends_the_full_set_and_follows_the_names() {
    let cp = ControlPlane::start().await;
    cp.register("pay", "pay-1", 8001).await;
    cp.register("cart", "cart-1", 8101).await;
    cp.published("pay", &["pay-1"]).await;
    cp.published("cart", &["cart-1"]).await;

    let mut ads = open_sotw(&cp.channel, sotw(&["pay"], "", "")).await;
    let r1 = ads.next("pay").await;
    assert_eq!(r1.type_url, TYPE_URL);
    assert!(!r1.version_info.is_empty(), "response without version_info");
    assert!(!r1.nonce.is_empty(), "response without a nonce");
    let got = sotw_resources(&r1);
    assert_eq!(got.keys().collect::<Vec<_>>(), ["pay"]);
    assert_eq!(endpoints(&got["pay"]), [("pay-1", "127.0.0.1", 8001)]);

    // ACK, then widen the subscription in a separate request.
    ads.send(sotw(&["pay"], &r1.version_info, &r1.nonce)).await;
    ads.quiet("the ACK of the only response").await;
    ads.send(sotw(&["pay", "cart"], &r1.version_info, &r1.nonce))
        .await;
    let r2 = ads
        .next("the full set {pay, cart} after adding cart (request carried the latest nonce)")
        .await;
    assert_eq!(
        sotw_resources(&r2).keys().collect::<Vec<_>>(),
        ["cart", "pay"]
    );
    assert_ne!(r2.version_info, r1.version_info);
    assert_ne!(r2.nonce, r1.nonce);
    ads.send(sotw(&["pay", "cart"], &r2.version_info, &r2.nonce))
        .await;

    drop(ads);
    cp.stop().await;
}

/// State of the world reconnect: a new stream whose first request carries
/// the `version_info` the client holds is sent nothing while the set is
/// unchanged; a change sends the full set again, under a new version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_reconnect_with_held_version_resends_nothing() {
    let cp = ControlPlane::start().await;
    cp.register("pay", "pay-1", 8001).await;
    cp.register("cart", "cart-1", 8101).await;
    cp.published("pay", &["pay-1"]).await;
    cp.published("cart", &["cart-1"]).await;
    let names = ["pay", "cart"];

    let mut ads = open_sotw(&cp.channel, sotw(&names, "", "")).await;
    let r1 = ads.next("pay and cart").await;
    assert_eq!(
        sotw_resources(&r1).keys().collect::<Vec<_>>(),
        ["cart", "pay"]
    );
    assert!(
        !r1.version_info.is_empty() && !r1.nonce.is_empty(),
        "{}",
        r1.brief()
    );
    ads.send(sotw(&names, &r1.version_info, &r1.nonce)).await;
    drop(ads);

    let mut ads = open_sotw(&cp.channel, sotw(&names, &r1.version_info, "")).await;
    ads.quiet("the client already holds the current set").await;

    cp.register("pay", "pay-2", 8002).await;
    let r2 = ads.next("the full set after pay changed").await;
    let got = sotw_resources(&r2);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        ["cart", "pay"],
        "not the full set"
    );
    assert_eq!(instance_ids(&got["pay"]), ["pay-1", "pay-2"]);
    assert_eq!(instance_ids(&got["cart"]), ["cart-1"]);
    assert!(
        !r2.version_info.is_empty() && r2.version_info != r1.version_info,
        "{}",
        r2.brief()
    );
    assert!(!r2.nonce.is_empty());
    ads.send(sotw(&names, &r2.version_info, &r2.nonce)).await;

    drop(ads);
    cp.stop().await;
}

/// A type URL the server does not serve ends the stream, delta and state of
/// the world alike, with INVALID_ARGUMENT naming the requested type and the
/// served one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_type_url_is_refused_with_the_served_types() {
    let cp = ControlPlane::start().await;
    let unknown = "type.googleapis.com/isdp.v1.NoSuchThing";

    let delta = DeltaDiscoveryRequest {
        type_url: unknown.into(),
        ..subscribe(&["pay"])
    };
    let status = match try_open_delta(&cp.channel, delta).await {
        Ok(mut ads) => ads.error().await,
        Err(s) => s,
    };
    assert_eq!(status.code(), Code::InvalidArgument, "delta: {status:?}");
    assert!(
        status.message().contains(TYPE_URL),
        "delta: served type not named: {status:?}"
    );
    assert!(
        status.message().contains(unknown),
        "delta: requested type not named: {status:?}"
    );

    let sotw_req = DiscoveryRequest {
        type_url: unknown.into(),
        ..sotw(&["pay"], "", "")
    };
    let status = match try_open_sotw(&cp.channel, sotw_req).await {
        Ok(mut ads) => ads.error().await,
        Err(s) => s,
    };
    assert_eq!(status.code(), Code::InvalidArgument, "sotw: {status:?}");
    assert!(
        status.message().contains(TYPE_URL),
        "sotw: served type not named: {status:?}"
    );

    cp.stop().await;
}

/// Fan-out: one registration reaches 50 delta streams, spread over two
/// HTTP/2 connections, within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_change_reaches_fifty_streams_within_a_second() {
    const STREAMS: usize = 50;
    let cp = ControlPlane::start().await;
    let channels = [
        connect(cp.grpc, &cp.auth).await,
        connect(cp.grpc, &cp.auth).await,
    ];

    let mut streams = Vec::with_capacity(STREAMS);
    for i in 0..STREAMS {
        let mut ads = open_delta(&channels[i % 2], subscribe(&["fan"])).await;
        let r = ads.next(&format!("stream {i}: fan as removed")).await;
        assert_eq!(r.removed_resources, ["fan"], "stream {i}: {}", r.brief());
        ads.send(ack(&r)).await;
        streams.push(ads);
    }

    let start = Instant::now();
    cp.register("fan", "fan-1", 8201).await;
    let deadline = tokio::time::Instant::now() + PROPAGATION;
    for (i, ads) in streams.iter_mut().enumerate() {
        let r = match tokio::time::timeout_at(deadline, ads.rx.message()).await {
            Ok(Ok(Some(r))) => r,
            Ok(other) => panic!("stream {i} failed: {other:?}"),
            Err(_) => panic!("stream {i} had no update {PROPAGATION:?} after the registration"),
        };
        let got = delta_resources(&r);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            ["fan"],
            "stream {i}: {}",
            r.brief()
        );
        assert_eq!(instance_ids(&got["fan"].1), ["fan-1"], "stream {i}");
    }
    println!(
        "{STREAMS} streams updated {:?} after Register was called",
        start.elapsed()
    );

    drop(streams);
    drop(channels);
    cp.stop().await;
}
