//! The circuit breaker: a per-upstream cap on concurrent requests. A
//! request over the cap is answered 503 `overflow` at once: queueing it
//! would only add latency to an upstream that is already behind, and an
//! unbounded queue would take the sidecar's memory with it.
//!
//! Only `max_requests` is enforced here. `max_pending_requests` and
//! `max_connections` are compiled and shown but not enforced: between
//! sidecars every request rides one multiplexed HTTP/2 connection per
//! endpoint, so nothing waits for a connection; the HTTP/1.1 pool (local
//! services and sidecar-less instances) opens one per concurrent request,
//! which `max_requests` already bounds.

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
    in_flight: AtomicUsize,
    max_requests: AtomicUsize,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            in_flight: AtomicUsize::new(0),
            max_requests: AtomicUsize::new(DEFAULT_BREAKER_LIMIT),
        }
    }
}

/// Holds a place under the limit until dropped (when the response body
/// ends, or the request fails).
#[derive(Debug)]
pub struct Permit(Arc<Breaker>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

// === impl Breaker ===

impl Breaker {
    pub fn set_limits(&self, limits: BreakerLimits) {
        self.max_requests
            .store(limits.max_requests, Ordering::Relaxed);
    }

    /// A place for one request, or None when the upstream is at its limit.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let max = self.max_requests.load(Ordering::Relaxed);
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        let permit = Permit(self.clone());
        (before < max).then_some(permit)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
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
}
