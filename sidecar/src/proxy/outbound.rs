//! The outbound request path, as a stack of named tower layers:
//!
//! `Route` (which upstream?) -> `Observe` (metrics, in `observe`) ->
//! `Select` (which route of the upstream's traffic policy?, in `policy`)
//! -> `Breaker` -> `Fault` -> `Timeout` -> `Retry` (in `resilience`) ->
//! `Balance` (which endpoint? the route's subset, skipping ejected
//! endpoints and those earlier tries used) -> `Endpoint` (send it, and
//! feed outlier detection). Each layer either passes the request on, carrying its decision
//! in the request's extensions, or answers it itself with a response naming
//! the reason in `x-isdp-error`.
//!
//! Spans and the access log wrap the stack (`trace::Trace`, outermost) and
//! the endpoint (`trace::TraceEndpoint`, between `Balance` and `Endpoint`).

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::{HeaderValue, Request, Response, StatusCode, header};
use tower::{Layer, Service};

use super::{
    forward::{Forwarder, Hop},
    http::{Body, SERVICE_HEADER, add_forwarding, error_response, forwarded_for_value},
    observe::{Observe, ObserveLayer},
    policy::{RoutePolicy, Select, SelectLayer},
    resilience::{
        Avoid, BreakerLayer, BreakerService, Fault, FaultLayer, Retry, RetryLayer, Timeout,
        TimeoutLayer, Tried,
    },
    trace::{Trace, TraceEndpoint, TraceEndpointLayer, TraceLayer, TraceSettings},
    upstreams::{Target, UpstreamLb, Upstreams},
};
use crate::{
    balance::{LoadGuard, Outcome, outlier},
    config::Protocol,
    tls::{PeerGuard, PeerIdentity},
};

pub type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

/// A layer's own answer, short-circuiting the rest of the stack.
pub fn answer(resp: Response<Body>) -> BoxFuture {
    Box::pin(std::future::ready(Ok(resp)))
}

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

/// How the route layer finds the upstream.
#[derive(Clone, Debug)]
pub enum RouteBy {
    /// A per-upstream listener: every request goes to this upstream.
    Fixed(Arc<str>),
    /// The shared outbound listener: by `Host` / `:authority` (or an
    /// absolute-form URI, as HTTP proxies receive).
    Authority,
}

/// The layers below `Select`, per request, in order.
pub type Resilient = BreakerService<Fault<Timeout<Retry<Balance<TraceEndpoint<Endpoint>>>>>>;

/// The stack for one outbound listener.
pub fn stack(
    by: RouteBy,
    upstreams: Upstreams,
    forwarder: Forwarder,
    tracing: TraceSettings,
) -> Trace<Route<Observe<Select<Resilient>>>> {
    let endpoint = TraceEndpointLayer(tracing.clone()).layer(Endpoint { forwarder });
    let balance = BalanceLayer.layer(endpoint);
    let retry = RetryLayer.layer(balance);
    let timeout = TimeoutLayer.layer(retry);
    let fault = FaultLayer.layer(timeout);
    let breaker = BreakerLayer.layer(fault);
    let select = SelectLayer.layer(breaker);
    let observe = ObserveLayer.layer(select);
    let route = RouteLayer { by, upstreams }.layer(observe);
    TraceLayer(tracing).layer(route)
}

// === Route ===

#[derive(Clone)]
pub struct RouteLayer {
    by: RouteBy,
    upstreams: Upstreams,
}

impl<S> Layer<S> for RouteLayer {
    type Service = Route<S>;
    fn layer(&self, inner: S) -> Route<S> {
        Route {
            by: self.by.clone(),
            upstreams: self.upstreams.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct Route<S> {
    by: RouteBy,
    upstreams: Upstreams,
    inner: S,
}

/// The host a request names, without port, lowercased.
fn authority_host<B>(req: &Request<B>) -> Option<String> {
    let raw = match req.uri().authority() {
        Some(a) => a.host().to_owned(),
        None => {
            let host = req.headers().get(header::HOST)?.to_str().ok()?;
            host.parse::<http::uri::Authority>().ok()?.host().to_owned()
        }
    };
    Some(raw.trim_end_matches('.').to_ascii_lowercase())
}

impl<S> Service<Request<Body>> for Route<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future = BoxFuture>
        + Clone
        + Send
        + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Body>) -> BoxFuture {
        let name: std::borrow::Cow<'_, str> = match &self.by {
            RouteBy::Fixed(n) => n.as_ref().into(),
            RouteBy::Authority => match authority_host(&req) {
                Some(h) => h.into(),
                None => {
                    let resp = error_response(
                        StatusCode::BAD_REQUEST,
                        "missing-authority",
                        "the request names no Host or :authority to route by",
                    );
                    return answer(resp);
                }
            },
        };
        let Some(lb) = self.upstreams.get(name.as_ref()) else {
            let resp = error_response(
                StatusCode::NOT_FOUND,
                "unknown-upstream",
                format!("{name:?} is not an upstream of this sidecar (add it as an [[upstream]])"),
            );
            return answer(resp);
        };
        drop(name);
        req.extensions_mut().insert(lb);
        Box::pin(self.inner.call(req))
    }
}

// === Balance ===

#[derive(Clone, Copy, Debug, Default)]
pub struct BalanceLayer;

impl<S> Layer<S> for BalanceLayer {
    type Service = Balance<S>;
    fn layer(&self, inner: S) -> Balance<S> {
        Balance { inner }
    }
}

#[derive(Clone)]
pub struct Balance<S> {
    inner: S,
}

/// The endpoint the balancer chose, and the load it is charged with.
pub struct Picked {
    pub target: Arc<Target>,
    pub guard: LoadGuard,
    pub upstream: Arc<UpstreamLb>,
}

impl<S> Service<Request<Body>> for Balance<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future = BoxFuture>
        + Clone
        + Send
        + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Body>) -> BoxFuture {
        let lb = req
            .extensions_mut()
            .remove::<Arc<UpstreamLb>>()
            .expect("route layer runs first");
        let source = req.extensions().get::<ClientAddr>().map(|c| c.addr.ip());
        let subset = req
            .extensions()
            .get::<Arc<RoutePolicy>>()
            .and_then(|p| pick_subset(&p.split));
        let avoid = req
            .extensions()
            .get::<Avoid>()
            .map_or(&[][..], |a| &a.0[..]);
        let Some((target, guard)) = lb.pick_in(req.headers(), source, subset, avoid) else {
            let resp = error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "no-healthy-endpoints",
                format!("upstream {} has no endpoints to send to", lb.name),
            );
            return answer(resp);
        };
        req.extensions_mut()
            .insert(Arc::new(std::sync::Mutex::new(Some(Picked {
                target,
                guard,
                upstream: lb,
            }))));
        Box::pin(self.inner.call(req))
    }
}

/// A subset by the split's weights (cumulative, ending at 100); None
/// when the route splits nothing.
fn pick_subset(split: &[(usize, u32)]) -> Option<usize> {
    let total = split.last()?.1;
    let r = rand::random_range(0..total.max(1));
    split.iter().find(|(_, upto)| r < *upto).map(|(i, _)| *i)
}

// === Endpoint ===

#[derive(Clone)]
pub struct Endpoint {
    forwarder: Forwarder,
}

type PickedSlot = Arc<std::sync::Mutex<Option<Picked>>>;

impl Service<Request<Body>> for Endpoint {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Body>) -> BoxFuture {
        let picked = req
            .extensions_mut()
            .remove::<PickedSlot>()
            .and_then(|slot| slot.lock().expect("picked lock").take())
            .expect("balance layer runs first");
        let client = req.extensions_mut().remove::<ClientAddr>();
        let timeouts = req
            .extensions()
            .get::<Arc<RoutePolicy>>()
            .map(|p| (p.connect_timeout, p.idle_timeout));
        if let Some((connect, idle)) = timeouts {
            if let Some(t) = connect {
                req.extensions_mut()
                    .insert(super::forward::ConnectTimeout(t));
            }
            if let Some(t) = idle {
                req.extensions_mut().insert(super::forward::IdleTimeout(t));
            }
        }
        add_forwarding(
            req.headers_mut(),
            client.as_ref().and_then(|c| c.forwarded_for.as_ref()),
        );
        let hop = if picked.target.via_sidecar {
            // Between sidecars HTTP rides multiplexed HTTP/2, and the
            // receiving sidecar learns the destination from this header.
            if let Some(v) = &picked.upstream.service_header {
                req.headers_mut().insert(SERVICE_HEADER.clone(), v.clone());
            }
            Hop::Http2
        } else if picked.upstream.protocol == Protocol::Grpc
            || req.version() == http::Version::HTTP_2
        {
            Hop::Http2
        } else {
            Hop::Http1
        };
        let forwarder = self.forwarder.clone();
        Box::pin(async move {
            let Picked {
                target,
                guard,
                upstream,
            } = picked;
            let mut resp = forwarder.forward(req, &target.dest, hop).await;
            feed_outlier(&upstream, &target, &resp);
            resp.extensions_mut().insert(Tried(target));
            if resp.headers().contains_key(&super::http::ERROR_HEADER)
                || resp.status().is_server_error()
            {
                // Failing fast must not make an endpoint look fast.
                guard.failed();
                return Ok(resp);
            }
            // The load counts until the response body ends.
            Ok(resp.map(|b| super::http::with_guard(b, guard)))
        })
    }
}

/// Counts the response for outlier detection, and ejects the endpoint
/// when it has failed too often in a row (and the upstream can spare it).
fn feed_outlier(upstream: &UpstreamLb, target: &Target, resp: &Response<Body>) {
    let cfg = &upstream.policy.outlier;
    let outcome = match resp.headers().get(&super::http::ERROR_HEADER) {
        Some(v) if v.as_bytes().starts_with(b"connect-") || v == "upstream-reset" => {
            Outcome::GatewayError
        }
        _ => Outcome::of_status(resp.status().as_u16()),
    };
    if !target.outlier.record(outcome, cfg) {
        return;
    }
    let all: Vec<&crate::balance::Outlier> = upstream.targets.iter().map(|t| &*t.outlier).collect();
    if let Some(length) = outlier::eject(&all, &target.outlier, cfg, tokio::time::Instant::now()) {
        upstream.metrics.ejection();
        tracing::info!(upstream = %upstream.name, endpoint = %target.id, ?length, "endpoint ejected by outlier detection");
    }
}
