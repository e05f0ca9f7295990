//! `Dispatch`, the end of the outbound stack: sends the request to the
//! endpoint `Balance` picked, and feeds the answer to outlier detection.
//! It strips hop-by-hop headers (in the forwarder), adds `x-forwarded-for`
//! and `x-request-id`, and between sidecars names the destination in
//! `x-isdp-service` on the one multiplexed mTLS HTTP/2 connection kept to
//! that sidecar. The endpoint's load is released when the response body
//! ends.

use std::{
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
};

use http::{Request, Response};
use tower::Service;

use crate::{
    balance::Outcome,
    config::Protocol,
    proxy::{
        forward::{Forwarder, Hop},
        http::{SERVICE_HEADER, add_forwarding},
        policy::RoutePolicy,
        resilience::{Tried, TrySlot},
        svc::{
            Body, BoxFuture, ClientAddr, ConnectTimeout, ERROR_HEADER, IdleTimeout, ProxyError,
            with_guard,
        },
        upstreams::{LbEndpoint, Picked, PickedSlot, UpstreamLb},
    },
};

#[derive(Clone)]
pub struct Dispatch {
    pub forwarder: Forwarder,
}

impl Service<Request<Body>> for Dispatch {
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
        if let Some(slot) = req.extensions_mut().remove::<TrySlot>() {
            slot.set(picked.endpoint.clone());
        }
        let client = req.extensions_mut().remove::<ClientAddr>();
        let timeouts = req
            .extensions()
            .get::<Arc<RoutePolicy>>()
            .map(|p| (p.connect_timeout, p.idle_timeout));
        if let Some((connect, idle)) = timeouts {
            if let Some(t) = connect {
                req.extensions_mut().insert(ConnectTimeout(t));
            }
            if let Some(t) = idle {
                req.extensions_mut().insert(IdleTimeout(t));
            }
        }
        add_forwarding(
            req.headers_mut(),
            client.as_ref().and_then(|c| c.forwarded_for.as_ref()),
        );
        let hop = if picked.endpoint.via_sidecar {
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
                endpoint,
                guard,
                upstream,
            } = picked;
            let mut resp = forwarder.forward(req, &endpoint.dest, hop).await;
            feed_outlier(&upstream, &endpoint, &resp);
            resp.extensions_mut().insert(Tried(endpoint));
            if resp.headers().contains_key(&ERROR_HEADER) || resp.status().is_server_error() {
                // Failing fast must not make an endpoint look fast.
                guard.failed();
                return Ok(resp);
            }
            // The load counts until the response body ends.
            Ok(resp.map(|b| with_guard(b, guard)))
        })
    }
}

/// Counts the response for outlier detection (see
/// [`UpstreamLb::record_outcome`]).
fn feed_outlier(upstream: &UpstreamLb, endpoint: &LbEndpoint, resp: &Response<Body>) {
    let outcome = match ProxyError::of(resp) {
        Some(e) if e.is_gateway_error() => Outcome::GatewayError,
        _ => Outcome::of_status(resp.status().as_u16()),
    };
    upstream.record_outcome(endpoint, outcome);
}
