//! The circuit breaker: per-upstream caps, each answered with 503
//! `overflow` at once rather than a queue: queueing would only add latency
//! to an upstream that is already behind, and an unbounded queue would
//! take the sidecar's memory with it.
//!
//! - `max_requests`: requests in flight (until the response body ends),
//!   checked by [`BreakerService`].
//! - `max_pending_requests`: requests waiting for a connection to their
//!   endpoint to open (TCP, TLS and HTTP/2 handshakes), checked by the
//!   HTTP/2 pool through the [`ConnectLimits`] extension this layer sets.
//! - `max_connections`: connections open to the upstream's endpoints: the
//!   multiplexed HTTP/2 connections between sidecars (one per endpoint and
//!   service, so this rarely binds) and TCP connections proxied to a `tcp`
//!   upstream (one per client connection, closed at once over the cap).
//!   Pooled HTTP/1.1 connections (sidecar-less instances, upgrades) are
//!   bounded by `max_requests` instead: one opens per concurrent request.

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use http::{Request, Response, StatusCode};
use tower::{Layer, Service};

use crate::proxy::{
    http::{Body, error_response, with_guard},
    outbound::{BoxFuture, answer},
    policy::{BreakerLimits, DEFAULT_BREAKER_LIMIT},
    upstreams::UpstreamLb,
};

/// One upstream's gate; the same across endpoint and policy changes.
#[derive(Debug)]
pub struct Breaker {
    in_flight: Gauge,
    pending: Gauge,
    connections: Gauge,
}

/// One counted quantity and its cap.
#[derive(Debug)]
struct Gauge {
    now: AtomicUsize,
    max: AtomicUsize,
}

impl Gauge {
    fn new() -> Self {
        Gauge {
            now: AtomicUsize::new(0),
            max: AtomicUsize::new(DEFAULT_BREAKER_LIMIT),
        }
    }
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            in_flight: Gauge::new(),
            pending: Gauge::new(),
            connections: Gauge::new(),
        }
    }
}

/// Which cap a permit holds a place under.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Request,
    Pending,
    Connection,
}

/// Holds a place under one cap until dropped: a request's until its
/// response body ends (or it fails), a pending request's until its
/// connection is open, a connection's until it closes.
#[derive(Debug)]
pub struct Permit(Arc<Breaker>, Kind);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.gauge(self.1).now.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Set on each request by [`BreakerService`]: the upstream (its breaker
/// and metrics), for the connection pools' pending and connection caps.
#[derive(Clone)]
pub struct ConnectLimits(pub Arc<UpstreamLb>);

// === impl Breaker ===

impl Breaker {
    pub fn set_limits(&self, limits: BreakerLimits) {
        let set = |g: &Gauge, v: usize| g.max.store(v, Ordering::Relaxed);
        set(&self.in_flight, limits.max_requests);
        set(&self.pending, limits.max_pending);
        set(&self.connections, limits.max_connections);
    }

    fn gauge(&self, kind: Kind) -> &Gauge {
        match kind {
            Kind::Request => &self.in_flight,
            Kind::Pending => &self.pending,
            Kind::Connection => &self.connections,
        }
    }

    fn try_take(self: &Arc<Self>, kind: Kind) -> Option<Permit> {
        let g = self.gauge(kind);
        let max = g.max.load(Ordering::Relaxed);
        let before = g.now.fetch_add(1, Ordering::AcqRel);
        // Dropped (and so given back) when over the cap.
        let permit = Permit(self.clone(), kind);
        (before < max).then_some(permit)
    }

    /// A place for one request, or None when the upstream is at its limit.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        self.try_take(Kind::Request)
    }

    /// A place for a request waiting for a connection to open.
    pub fn try_pending(self: &Arc<Self>) -> Option<Permit> {
        self.try_take(Kind::Pending)
    }

    /// A place for one more open connection, held as long as it is open.
    pub fn try_connection(self: &Arc<Self>) -> Option<Permit> {
        self.try_take(Kind::Connection)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.now.load(Ordering::Relaxed)
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct BreakerLayer;

impl<S> Layer<S> for BreakerLayer {
    type Service = BreakerService<S>;
    fn layer(&self, inner: S) -> BreakerService<S> {
        BreakerService { inner }
    }
}

#[derive(Clone)]
pub struct BreakerService<S> {
    inner: S,
}

impl<S> Service<Request<Body>> for BreakerService<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future = BoxFuture>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> BoxFuture {
        let Some(lb) = req.extensions().get::<Arc<UpstreamLb>>().cloned() else {
            return self.inner.call(req);
        };
        let mut req = req;
        req.extensions_mut().insert(ConnectLimits(lb.clone()));
        let Some(permit) = lb.breaker.try_acquire() else {
            lb.metrics.overflow("max_requests");
            return answer(error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "overflow",
                format!(
                    "upstream {} is at its limit of concurrent requests",
                    lb.name
                ),
            ));
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|b| with_guard(b, permit)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_up_to_the_limit_and_back() {
        let b = Arc::new(Breaker::default());
        b.set_limits(BreakerLimits {
            max_requests: 2,
            ..Default::default()
        });
        let p1 = b.try_acquire().unwrap();
        let _p2 = b.try_acquire().unwrap();
        assert!(b.try_acquire().is_none());
        assert_eq!(b.in_flight(), 2, "a refused request holds nothing");
        drop(p1);
        assert!(b.try_acquire().is_some());
    }

    #[test]
    fn each_cap_counts_on_its_own() {
        let b = Arc::new(Breaker::default());
        b.set_limits(BreakerLimits {
            max_requests: 10,
            max_pending: 1,
            max_connections: 2,
        });
        let pending = b.try_pending().unwrap();
        assert!(b.try_pending().is_none(), "one request may wait");
        let c1 = b.try_connection().unwrap();
        let _c2 = b.try_connection().unwrap();
        assert!(b.try_connection().is_none());
        assert!(b.try_acquire().is_some(), "requests have their own cap");
        drop(pending);
        drop(c1);
        assert!(b.try_pending().is_some());
        assert!(b.try_connection().is_some());
    }
}
