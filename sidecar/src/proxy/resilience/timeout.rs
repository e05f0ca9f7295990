//! The request timeout: the whole call, retries and backoff included, up
//! to the response headers. Past it the caller gets 504
//! `request-timeout`, and the tries still running are dropped (which
//! cancels them). Per-try timeouts are the retry layer's.

use std::{
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
};

use http::{Request, Response, StatusCode};
use tower::{Layer, Service};

use crate::proxy::{
    http::{Body, error_response},
    outbound::BoxFuture,
    policy::RoutePolicy,
    upstreams::UpstreamLb,
};

#[derive(Clone, Copy, Debug, Default)]
pub struct TimeoutLayer;

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;
    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout { inner }
    }
}

#[derive(Clone)]
pub struct Timeout<S> {
    inner: S,
}

impl<S> Service<Request<Body>> for Timeout<S>
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
        let Some(limit) = req
            .extensions()
            .get::<Arc<RoutePolicy>>()
            .and_then(|p| p.request_timeout)
        else {
            return self.inner.call(req);
        };
        let metrics = req
            .extensions()
            .get::<Arc<UpstreamLb>>()
            .map(|lb| lb.metrics.clone());
        let fut = self.inner.call(req);
        Box::pin(async move {
            match tokio::time::timeout(limit, fut).await {
                Ok(r) => r,
                Err(_) => {
                    if let Some(m) = metrics {
                        m.timeout("request");
                    }
                    Ok(error_response(
                        StatusCode::GATEWAY_TIMEOUT,
                        "request-timeout",
                        format!("no response within {limit:?}"),
                    ))
                }
            }
        })
    }
}
