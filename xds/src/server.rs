//! The ADS gRPC service: drives one protocol state machine per stream,
//! under the access the application granted it, and reports stream
//! lifecycle events to an observer (logs, metrics, and the record of what
//! each client has acknowledged).
//!
//! A stream the application refuses ([`Access::stream`]) ends before it
//! opens; the first request's node (its id, by the application and the
//! engine, and the rest of what observers are told, `node.rs`) is checked
//! before observers hear of the stream; a request the server cannot read (over
//! `MAX_REQUEST_BYTES`, or not protobuf) ends the stream with a status
//! saying why, RESOURCE_EXHAUSTED for the size. Lines about refused
//! streams and requests share the server's [`LogRate`] with refused
//! subscriptions, so clients opening stream after stream cannot flood
//! the log.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming, body::Body, codegen::BoxFuture, server::NamedService};
use tracing::Instrument as _;

use crate::{
    access::{Access, Caller},
    cache::Cache,
    codec::PreEncodedCodec,
    delta::DeltaStream,
    event::{StreamEvent, StreamInfo, StreamObserver},
    limits::Limits,
    log_rate::LogRate,
    node::ClientNode,
    protocol::Protocol,
    sotw::SotwStream,
};

const SOTW_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
/// Largest request accepted from a client: with the names per stream
/// ([`Limits`]) it bounds what a stream's requests make the server hold.
const MAX_REQUEST_BYTES: usize = 4 << 20;

/// The `envoy.service.discovery.v3.AggregatedDiscoveryService` server.
#[derive(Clone)]
pub struct AdsService {
    cache: Cache,
    /// What each stream may read, and when its credential is withdrawn.
    access: Arc<dyn Access>,
    observer: Arc<dyn StreamObserver>,
    shutdown: watch::Receiver<bool>,
    limits: Limits,
    /// What every stream's client may make the server log, together.
    log: LogRate,
}

impl AdsService {
    pub fn new(
        cache: Cache,
        access: Arc<dyn Access>,
        observer: Arc<dyn StreamObserver>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        AdsService {
            cache,
            access,
            observer,
            shutdown,
            limits: Limits::default(),
            log: LogRate::default(),
        }
    }

    /// The rate lines about refused streams, requests and subscriptions
    /// are logged at, shared with the application (its NACK lines, say),
    /// so one bound holds for everything clients can make the server log.
    pub fn with_log_rate(mut self, log: LogRate) -> Self {
        self.log = log;
        self
    }

    /// The limits every stream is held to (by default [`Limits::default`]).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }
}

impl NamedService for AdsService {
    const NAME: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
}

struct Method<P>(AdsService, std::marker::PhantomData<fn() -> P>);

type Responses = ReceiverStream<Result<Bytes, Status>>;

impl<P: Protocol> tonic::server::StreamingService<P::Request> for Method<P> {
    type Response = Bytes;
    type ResponseStream = Responses;
    type Future = BoxFuture<tonic::Response<Responses>, Status>;

    fn call(&mut self, request: tonic::Request<Streaming<P::Request>>) -> Self::Future {
        let svc = self.0.clone();
        Box::pin(async move {
            let peer = request.remote_addr();
            let access = svc
                .access
                .stream(Caller {
                    metadata: request.metadata(),
                    extensions: request.extensions(),
                    peer,
                })
                .inspect_err(|status| {
                    if svc.log.admit() {
                        tracing::warn!(%status, ?peer, "xds stream refused");
                    } else {
                        tracing::debug!(%status, ?peer, "xds stream refused");
                    }
                })?;
            let caller = Opened {
                peer,
                caller: access.caller(),
            };
            let proto = P::new(svc.cache.clone(), access, svc.limits, svc.log.clone());
            let (tx, rx) = mpsc::channel(4);
            tokio::spawn(drive(svc, proto, request.into_inner(), tx, caller));
            Ok(tonic::Response::new(ReceiverStream::new(rx)))
        })
    }
}

/// Who opened a stream: known when it opens, told to observers with its
/// first request.
struct Opened {
    peer: Option<SocketAddr>,
    /// [`crate::StreamAccess::caller`].
    caller: String,
}

/// Runs one stream until the client leaves, an error, or shutdown.
async fn drive<P: Protocol>(
    svc: AdsService,
    mut proto: P,
    mut inbound: Streaming<P::Request>,
    tx: mpsc::Sender<Result<Bytes, Status>>,
    opened: Opened,
) {
    let Opened { peer, mut caller } = opened;
    let wake = proto.wake().clone();
    let mut shutdown = svc.shutdown.clone();
    let mut info: Option<StreamInfo> = None;
    let mut out = Vec::new();
    loop {
        let result = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            msg = inbound.message() => match msg {
                // The first request names the node: checked before the
                // stream is told to observers or logged under it.
                Ok(Some(req)) if info.is_none() => {
                    let node = P::node(&req);
                    let node_id = node.map_or("", |n| n.id.as_str()).to_owned();
                    let checked = proto
                        .check_node(&node_id)
                        .and_then(|()| ClientNode::read(node));
                    checked.and_then(|client| {
                        let i = StreamInfo {
                            id: svc.cache.stream_id(),
                            opened: Instant::now(),
                            node_id,
                            delta: P::DELTA,
                            peer,
                            caller: std::mem::take(&mut caller),
                            user_agent_name: client.user_agent_name,
                            user_agent_version: client.user_agent_version,
                            cluster: client.cluster,
                            zone: client.zone,
                        };
                        svc.observer.opened(&i);
                        info = Some(i);
                        proto.on_request(req, &mut out)
                    })
                }
                Ok(Some(req)) => proto.on_request(req, &mut out),
                Ok(None) => break,
                // A request the server could not read (too large, not
                // protobuf) is answered with why; anything else (the
                // client reset the stream) reaches no one, and is only
                // noted.
                Err(status) => match inbound_error(status) {
                    Some(status) => Err(status),
                    None => break,
                },
            },
            _ = wake.notify.notified() => {
                proto.on_wake(&mut out);
                Ok(())
            }
        };
        if let Err(status) = result {
            if svc.log.admit() {
                tracing::warn!(%status, ?peer, "xds request refused");
            } else {
                tracing::debug!(%status, ?peer, "xds request refused");
            }
            let _ = tx.send(Err(status)).await;
            break;
        }
        let info = info.as_ref().expect("set on the first request");
        for event in out.drain(..) {
            svc.observer.event(info, &event);
            if let StreamEvent::Response {
                bytes,
                type_url,
                resources,
                ..
            } = event
                && !send_response(&tx, info, bytes, &type_url, resources).await
            {
                svc.observer.closed(info);
                drop(proto);
                svc.log.tick();
                return;
            }
        }
    }
    if let Some(info) = &info {
        svc.observer.closed(info);
    }
    // The stream's access (and its last refusal line) goes first, then a
    // count of the lines left out, if their window is over.
    drop(proto);
    svc.log.tick();
}

/// The status a stream whose request could not be read ends with, or
/// None when the client itself ended it. tonic reports a request over the
/// size limit as OUT_OF_RANGE; the gRPC status guide prescribes
/// RESOURCE_EXHAUSTED ("request message larger than the configured
/// limit"), as the control plane's other services answer.
fn inbound_error(status: Status) -> Option<Status> {
    match status.code() {
        tonic::Code::OutOfRange => Some(Status::resource_exhausted(status.message())),
        tonic::Code::Internal => Some(status),
        _ => {
            tracing::debug!(%status, "xds stream ended by the client");
            None
        }
    }
}

/// Sends one response, in a span (an OTLP span when tracing is on): a push
/// to one client. False if the client is gone. The node id is recorded as
/// `isdp.node`, the attribute the mesh's other spans (sessions) carry, so
/// one query finds a node's pushes and its session.
async fn send_response(
    tx: &mpsc::Sender<Result<Bytes, Status>>,
    info: &StreamInfo,
    bytes: Bytes,
    type_url: &str,
    resources: usize,
) -> bool {
    let span = tracing::info_span!(
        "xds push",
        otel.kind = "server",
        isdp.node = %info.node_id,
        xds.stream = info.id,
        xds.delta = info.delta,
        xds.type_url = type_url,
        xds.resources = resources,
        xds.bytes = bytes.len(),
    );
    tx.send(Ok(bytes)).instrument(span).await.is_ok()
}

impl tower::Service<http::Request<Body>> for AdsService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let svc = self.clone();
        Box::pin(async move {
            let resp = match req.uri().path() {
                SOTW_PATH => {
                    let mut grpc =
                        tonic::server::Grpc::new(PreEncodedCodec::<DiscoveryRequest>::default())
                            .apply_max_message_size_config(Some(MAX_REQUEST_BYTES), None);
                    grpc.streaming(Method::<SotwStream>(svc, Default::default()), req)
                        .await
                }
                DELTA_PATH => {
                    let mut grpc = tonic::server::Grpc::new(
                        PreEncodedCodec::<DeltaDiscoveryRequest>::default(),
                    )
                    .apply_max_message_size_config(Some(MAX_REQUEST_BYTES), None);
                    grpc.streaming(Method::<DeltaStream>(svc, Default::default()), req)
                        .await
                }
                _ => Status::unimplemented(format!("no method {}", req.uri().path())).into_http(),
            };
            Ok(resp)
        })
    }
}
