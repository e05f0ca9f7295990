//! Fault injection: delays and aborts a share of requests, as the route's
//! policy says, to test how callers cope. An abort is the policy's status
//! with `x-isdp-error: fault-injected`; a delay comes before the request
//! is sent (and so counts against the request timeout).

use std::{
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
};

use http::{Request, Response};
use tower::{Layer, Service};

use crate::proxy::{
    http::{Body, error_response},
    outbound::{BoxFuture, answer},
    policy::RoutePolicy,
};

#[derive(Clone, Copy, Debug, Default)]
pub struct FaultLayer;

impl<S> Layer<S> for FaultLayer {
    type Service = Fault<S>;
    fn layer(&self, inner: S) -> Fault<S> {
        Fault { inner }
    }
}

#[derive(Clone)]
pub struct Fault<S> {
    inner: S,
}

/// True for `percent` (0-100) of calls.
fn roll(percent: f64) -> bool {
    percent > 0.0 && rand::random::<f64>() * 100.0 < percent
}

impl<S> Service<Request<Body>> for Fault<S>
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

    fn call(&mut self, req: Request<Body>) -> BoxFuture {
        let Some(fault) = req
            .extensions()
            .get::<Arc<RoutePolicy>>()
            .and_then(|p| p.fault)
        else {
            return self.inner.call(req);
        };
        if roll(fault.abort_percent) {
            return answer(error_response(
                fault.abort_status,
                "fault-injected",
                "aborted by the upstream's fault-injection policy",
            ));
        }
        if !roll(fault.delay_percent) {
            return self.inner.call(req);
        }
        let mut inner = self.inner.clone();
        Box::pin(async move {
            tokio::time::sleep(fault.delay).await;
            inner.call(req).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rolls_match_their_percent() {
        assert!(!roll(0.0));
        assert!(roll(100.0));
        let hits = (0..10_000).filter(|_| roll(10.0)).count();
        assert!((800..1200).contains(&hits), "{hits}");
    }
}
