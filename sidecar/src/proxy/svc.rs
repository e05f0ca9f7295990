//! What every layer of both request paths shares, and nothing else: the
//! body and future types, the request extensions the listeners and layers
//! hand down ([`ClientAddr`], [`Dest`], the pools' timeouts), the
//! sidecar's own answers ([`ProxyError`]), and [`Step`], the one shape of
//! a layer.
//!
//! It imports no other module of the proxy: the files that assemble a
//! stack (`outbound`, `inbound`) and every layer import it, so none of
//! them has to import another to name a type they share.
//!
//! # Layout
//! - `error`: [`ProxyError`], the reasons the sidecar answers a request
//!   itself, with their status and `x-isdp-error` value.
//! - `grpc`: those answers restated for gRPC callers (trailers-only, with
//!   `grpc-status` and `grpc-message`).

mod error;
pub mod grpc;

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, uri::Authority};
use http_body_util::{BodyExt, combinators::BoxBody};
use tower::Service;

use crate::tls::{PeerGuard, PeerIdentity};

pub use error::{ERROR_HEADER, ProxyError};

/// Every body the proxy moves: streamed, never buffered whole.
pub type Body = BoxBody<Bytes, BoxError>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What every service on the request path returns.
pub type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

/// A layer's own answer, short-circuiting the rest of the stack.
pub fn answer(resp: Response<Body>) -> BoxFuture {
    Box::pin(std::future::ready(Ok(resp)))
}

pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}

/// An empty body.
pub fn empty() -> Body {
    boxed(http_body_util::Empty::<Bytes>::new())
}

/// Keeps `guard` alive until `body` has been fully sent (or dropped), so
/// load accounting covers the whole exchange, not just the headers.
pub fn with_guard<G: Send + Sync + Unpin + 'static>(body: Body, guard: G) -> Body {
    BoxBody::new(Guarded {
        inner: body,
        _guard: guard,
    })
}

struct Guarded<G> {
    inner: Body,
    _guard: G,
}

impl<G: Unpin> http_body::Body for Guarded<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

// === Step: one layer of a request path ===

/// A service the request path can hand a request to: answers with a
/// [`BoxFuture`], never fails (errors are responses), and is cheap to
/// clone into a future.
pub trait Next:
    Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future = BoxFuture>
    + Clone
    + Send
    + 'static
{
}

impl<S> Next for S where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future = BoxFuture>
        + Clone
        + Send
        + 'static
{
}

/// What one layer does with a request: pass it to `next` (perhaps after
/// changing it, or around the future `next` returns), or answer it
/// itself. The value is the layer's configuration; [`Layered`] makes it a
/// tower service, and [`step_layer!`] a tower layer. Every layer is always
/// ready: back-pressure is the breaker's, by refusing, never by waiting.
pub trait Step: Clone + Send + 'static {
    fn call<S: Next>(&self, next: &mut S, req: Request<Body>) -> BoxFuture;
}

/// The service of a [`Step`] in front of the next service `S`.
#[derive(Clone, Debug)]
pub struct Layered<M, S> {
    step: M,
    inner: S,
}

impl<M, S> Layered<M, S> {
    pub fn new(step: M, inner: S) -> Self {
        Layered { step, inner }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<M: Step, S: Next> Service<Request<Body>> for Layered<M, S> {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> BoxFuture {
        self.step.call(&mut self.inner, req)
    }
}

/// Makes a [`Step`] type `$layer` a `tower::Layer` whose service is
/// `$service<S>` (an alias of [`Layered`]`<$layer, S>`), so each layer
/// file holds only what its layer does.
macro_rules! step_layer {
    ($(#[$doc:meta])* $layer:ident => $service:ident) => {
        $(#[$doc])*
        pub type $service<S> = $crate::proxy::svc::Layered<$layer, S>;

        impl<S> tower::Layer<S> for $layer {
            type Service = $service<S>;

            fn layer(&self, inner: S) -> $service<S> {
                $crate::proxy::svc::Layered::new(self.clone(), inner)
            }
        }
    };
}
pub(crate) use step_layer;

// === Request extensions ===

/// The client that sent the request, set by the listener once per
/// connection: its address (for `source_ip` hashing), that address as an
/// `x-forwarded-for` entry, and on the inbound listener the verified
/// identity of the calling sidecar (here rather than in an extension of
/// its own, so a request pays for one extension, not two).
#[derive(Clone, Debug)]
pub struct ClientAddr {
    pub addr: SocketAddr,
    pub forwarded_for: Option<HeaderValue>,
    pub peer: Option<PeerIdentity>,
    /// On the inbound listener, the local service the caller asked for in
    /// SNI (and authenticated): requests on the connection go there.
    pub service: Option<Arc<str>>,
    /// On the inbound listener, the watch on the caller's token: an
    /// upgraded connection (WebSocket) ends when it is revoked.
    pub guard: Option<PeerGuard>,
}

impl ClientAddr {
    pub fn new(addr: SocketAddr) -> Self {
        ClientAddr {
            addr,
            forwarded_for: forwarded_for_value(addr),
            peer: None,
            service: None,
            guard: None,
        }
    }

    /// A sidecar calling over mTLS: who it is, the local service it asked
    /// for, and the watch on its token.
    pub fn mesh(
        addr: SocketAddr,
        peer: PeerIdentity,
        service: Arc<str>,
        guard: Option<PeerGuard>,
    ) -> Self {
        ClientAddr {
            peer: Some(peer),
            service: Some(service),
            guard,
            ..ClientAddr::new(addr)
        }
    }
}

impl PeerIdentity {
    /// The calling sidecar's identity, on a request the inbound listener
    /// accepted over mTLS.
    pub fn of<B>(req: &Request<B>) -> Option<&PeerIdentity> {
        req.extensions().get::<ClientAddr>()?.peer.as_ref()
    }
}

/// The client's IP as an `x-forwarded-for` entry, formatted once per
/// connection rather than once per request.
pub fn forwarded_for_value(client: SocketAddr) -> Option<HeaderValue> {
    HeaderValue::try_from(client.ip().to_string()).ok()
}

/// Where a request goes next: the socket address, and the same as a URI
/// authority, formatted once when the destination is learnt rather than
/// once per request.
#[derive(Clone, Debug)]
pub struct Dest {
    pub addr: SocketAddr,
    pub authority: Authority,
    /// The service when `addr` is its sidecar: the connection is mTLS with
    /// this service's SNI, and pooled per (address, service). None for a
    /// local service or an instance without a sidecar (plaintext).
    pub service: Option<Arc<str>>,
}

impl Dest {
    /// A plaintext destination.
    pub fn new(addr: SocketAddr) -> Self {
        let authority = addr
            .to_string()
            .parse()
            .expect("a socket address is a valid authority");
        Dest {
            addr,
            authority,
            service: None,
        }
    }

    /// `service`'s sidecar at `addr`, reached over mTLS.
    pub fn mesh(addr: SocketAddr, service: Arc<str>) -> Self {
        Dest {
            service: Some(service),
            ..Dest::new(addr)
        }
    }
}

/// A request extension overriding the pool's connect timeout for the
/// connection this request may have to open (a traffic policy's
/// `timeouts.connect`).
#[derive(Clone, Copy, Debug)]
pub struct ConnectTimeout(pub Duration);

/// A request extension: pooled HTTP/1.1 connections idle longer than this
/// are closed rather than reused for it (a traffic policy's
/// `timeouts.idle`; never more than the pool's own limit). HTTP/2
/// connections between sidecars are kept alive by pings and not affected.
#[derive(Clone, Copy, Debug)]
pub struct IdleTimeout(pub Duration);
