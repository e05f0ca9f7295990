//! The ADS gRPC service: drives one protocol state machine per stream and
//! reports stream lifecycle events to an observer (logs, metrics, and the
//! record of what each sidecar has acknowledged).

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

use super::{Cache, Wake, codec::PreEncodedCodec, delta::DeltaStream, sotw::SotwStream};
use crate::{
    auth::{Principal, ReadScope},
    tokens::Tokens,
};

const SOTW_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
/// Largest request accepted from a client.
const MAX_REQUEST_BYTES: usize = 4 << 20;

/// What happened on a stream, for observers.
#[derive(Debug)]
pub enum StreamEvent {
    Response {
        type_url: Arc<str>,
        nonce: String,
        bytes: Bytes,
        resources: usize,
    },
    /// The client accepted a response; `versions` are the (name, version)
    /// pairs it now holds (state of the world reports one set version with
    /// an empty name; an empty version means "does not exist").
    Ack {
        type_url: Arc<str>,
        nonce: String,
        versions: Vec<(String, String)>,
        /// The newest change the acknowledged response carried (None when
        /// it carried only removals).
        changed_at: Option<Instant>,
    },
    Nack {
        type_url: Arc<str>,
        nonce: String,
        message: String,
    },
}

#[derive(Clone, Debug)]
pub struct StreamInfo {
    pub id: u64,
    /// When the stream sent its first request; changes older than this
    /// reached it on connect, not by propagation.
    pub opened: Instant,
    pub node_id: String,
    pub delta: bool,
    pub peer: Option<SocketAddr>,
}

/// Stream lifecycle hooks. `closed` is also the signal that a sidecar went
/// away.
pub trait StreamObserver: Send + Sync + 'static {
    fn opened(&self, _stream: &StreamInfo) {}
    fn event(&self, _stream: &StreamInfo, _event: &StreamEvent) {}
    fn closed(&self, _stream: &StreamInfo) {}
}

/// Two observers, both told everything (metrics and proxy status, say).
impl<A: StreamObserver, B: StreamObserver> StreamObserver for (A, B) {
    fn opened(&self, s: &StreamInfo) {
        self.0.opened(s);
        self.1.opened(s);
    }

    fn event(&self, s: &StreamInfo, e: &StreamEvent) {
        self.0.event(s, e);
        self.1.event(s, e);
    }

    fn closed(&self, s: &StreamInfo) {
        self.0.closed(s);
        self.1.closed(s);
    }
}

/// The `envoy.service.discovery.v3.AggregatedDiscoveryService` server.
#[derive(Clone)]
pub struct AdsService {
    cache: Cache,
    observer: Arc<dyn StreamObserver>,
    shutdown: watch::Receiver<bool>,
    /// When set, a stream ends with UNAUTHENTICATED once the token that
    /// vouched for its caller is revoked.
    tokens: Option<Tokens>,
}

impl AdsService {
    pub fn new(
        cache: Cache,
        observer: Arc<dyn StreamObserver>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        AdsService {
            cache,
            observer,
            shutdown,
            tokens: None,
        }
    }

    /// Ends streams whose caller's token is revoked.
    pub fn revocable(mut self, tokens: Tokens) -> Self {
        self.tokens = Some(tokens);
        self
    }
}

impl NamedService for AdsService {
    const NAME: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
}

/// One protocol variant's per-stream state machine.
trait Protocol: Send + 'static {
    type Request: prost::Message + Default + Send + 'static;
    const DELTA: bool;
    fn new(cache: Cache, scope: ReadScope) -> Self;
    fn node_id(req: &Self::Request) -> Option<&str>;
    fn on_request(&mut self, req: Self::Request, out: &mut Vec<StreamEvent>) -> Result<(), Status>;
    fn on_wake(&mut self, out: &mut Vec<StreamEvent>);
    fn wake(&self) -> &Arc<Wake>;
}

impl Protocol for SotwStream {
    type Request = DiscoveryRequest;
    const DELTA: bool = false;
    fn new(cache: Cache, scope: ReadScope) -> Self {
        SotwStream::new(cache, scope)
    }
    fn node_id(req: &DiscoveryRequest) -> Option<&str> {
        req.node.as_ref().map(|n| n.id.as_str())
    }
    fn on_request(
        &mut self,
        req: DiscoveryRequest,
        out: &mut Vec<StreamEvent>,
    ) -> Result<(), Status> {
        SotwStream::on_request(self, req, out)
    }
    fn on_wake(&mut self, out: &mut Vec<StreamEvent>) {
        SotwStream::on_wake(self, out)
    }
    fn wake(&self) -> &Arc<Wake> {
        SotwStream::wake(self)
    }
}

impl Protocol for DeltaStream {
    type Request = DeltaDiscoveryRequest;
    const DELTA: bool = true;
    fn new(cache: Cache, scope: ReadScope) -> Self {
        DeltaStream::new(cache, scope)
    }
    fn node_id(req: &DeltaDiscoveryRequest) -> Option<&str> {
        req.node.as_ref().map(|n| n.id.as_str())
    }
    fn on_request(
        &mut self,
        req: DeltaDiscoveryRequest,
        out: &mut Vec<StreamEvent>,
    ) -> Result<(), Status> {
        DeltaStream::on_request(self, req, out)
    }
    fn on_wake(&mut self, out: &mut Vec<StreamEvent>) {
        DeltaStream::on_wake(self, out)
    }
    fn wake(&self) -> &Arc<Wake> {
        DeltaStream::wake(self)
    }
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
            let principal = request.extensions().get::<Principal>();
            let scope = ReadScope::of(principal);
            let grant = principal.and_then(|p| p.grant.clone());
            let (tx, rx) = mpsc::channel(4);
            tokio::spawn(drive::<P>(
                svc,
                request.into_inner(),
                tx,
                peer,
                scope,
                grant,
            ));
            Ok(tonic::Response::new(ReceiverStream::new(rx)))
        })
    }
}

/// Runs one stream until the client leaves, an error, or shutdown.
async fn drive<P: Protocol>(
    svc: AdsService,
    mut inbound: Streaming<P::Request>,
    tx: mpsc::Sender<Result<Bytes, Status>>,
    peer: Option<SocketAddr>,
    scope: ReadScope,
    grant: Option<String>,
) {
    let mut proto = P::new(svc.cache.clone(), scope);
    let tokens = svc.tokens.clone();
    let revoked = crate::tokens::revoked(tokens.as_ref(), grant.as_deref());
    tokio::pin!(revoked);
    let wake = proto.wake().clone();
    let mut shutdown = svc.shutdown.clone();
    let mut info: Option<StreamInfo> = None;
    let mut out = Vec::new();
    loop {
        let result = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            msg = inbound.message() => match msg {
                Ok(Some(req)) => {
                    if info.is_none() {
                        let i = StreamInfo {
                            id: svc.cache.stream_id(),
                            opened: Instant::now(),
                            node_id: P::node_id(&req).unwrap_or_default().to_owned(),
                            delta: P::DELTA,
                            peer,
                        };
                        svc.observer.opened(&i);
                        info = Some(i);
                    }
                    proto.on_request(req, &mut out)
                }
                Ok(None) => break,
                Err(status) => {
                    tracing::debug!(%status, "xds stream ended by the client");
                    break;
                }
            },
            _ = wake.notify.notified() => {
                proto.on_wake(&mut out);
                Ok(())
            }
            why = &mut revoked => Err(why),
        };
        if let Err(status) = result {
            tracing::warn!(%status, ?peer, "xds request refused");
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
                return;
            }
        }
    }
    if let Some(info) = &info {
        svc.observer.closed(info);
    }
}

/// Sends one response, in a span (an OTLP span when tracing is on): a push
/// to one sidecar. False if the client is gone.
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
