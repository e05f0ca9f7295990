//! The circuit breaker: per-upstream caps, each answered with 503
//! `overflow` at once rather than a queue: queueing would only add latency
//! to an upstream that is already behind, and an unbounded queue would
//! take the sidecar's memory with it.
//!
//! - `max_requests`: requests in flight (until the response body ends),
//!   checked by [`BreakerLayer`].
//! - `max_pending_requests`: requests waiting for a connection to their
//!   endpoint to open (TCP, TLS and HTTP/2 handshakes), checked by the
//!   HTTP/2 pool through the [`ConnectLimits`] extension this layer sets.
//! - `max_connections`: connections open to the upstream's endpoints: the
//!   multiplexed HTTP/2 connections between sidecars (one per endpoint and
//!   service, so this rarely binds) and TCP connections proxied to a `tcp`
//!   upstream (one per client connection, closed at once over the cap).
//!   Pooled HTTP/1.1 connections (sidecar-less instances, upgrades) are
//!   bounded by `max_requests` instead: one opens per concurrent request.

use std::sync::Arc;

use http::Request;

use crate::proxy::{
    svc::{Body, BoxFuture, Next, ProxyError, Step, answer, step_layer, with_guard},
    upstreams::UpstreamLb,
};

/// Set on each request by [`BreakerService`]: the upstream (its breaker
/// and metrics), for the connection pools' pending and connection caps.
#[derive(Clone)]
pub struct ConnectLimits(pub Arc<UpstreamLb>);

/// Checks `max_requests` and sets [`ConnectLimits`] for the pools.
#[derive(Clone, Copy, Debug, Default)]
pub struct BreakerLayer;

step_layer!(BreakerLayer => BreakerService);

impl Step for BreakerLayer {
    fn call<S: Next>(&self, next: &mut S, mut req: Request<Body>) -> BoxFuture {
        let Some(lb) = req.extensions().get::<Arc<UpstreamLb>>().cloned() else {
            return next.call(req);
        };
        req.extensions_mut().insert(ConnectLimits(lb.clone()));
        let Some(permit) = lb.breaker.try_acquire() else {
            lb.metrics.overflow("max_requests");
            return answer(ProxyError::Overflow.response(format!(
                "upstream {} is at its limit of concurrent requests",
                lb.name
            )));
        };
        let fut = next.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|b| with_guard(b, permit)))
        })
    }
}
