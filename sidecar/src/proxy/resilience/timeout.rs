//! The request timeout: the whole call, retries and backoff included, up
//! to the response headers. Past it the caller gets 504
//! `request-timeout`, and the tries still running are dropped (which
//! cancels them). Per-try timeouts are the retry layer's.

use std::sync::Arc;

use http::Request;

use crate::proxy::{
    policy::RoutePolicy,
    svc::{Body, BoxFuture, Next, ProxyError, Step, step_layer},
    upstreams::UpstreamLb,
};

#[derive(Clone, Copy, Debug, Default)]
pub struct TimeoutLayer;

step_layer!(TimeoutLayer => Timeout);

impl Step for TimeoutLayer {
    fn call<S: Next>(&self, next: &mut S, req: Request<Body>) -> BoxFuture {
        let Some(limit) = req
            .extensions()
            .get::<Arc<RoutePolicy>>()
            .and_then(|p| p.request_timeout)
        else {
            return next.call(req);
        };
        let metrics = req
            .extensions()
            .get::<Arc<UpstreamLb>>()
            .map(|lb| lb.metrics.clone());
        let fut = next.call(req);
        Box::pin(async move {
            match tokio::time::timeout(limit, fut).await {
                Ok(r) => r,
                Err(_) => {
                    if let Some(m) = metrics {
                        m.timeout("request");
                    }
                    Ok(
                        ProxyError::RequestTimeout
                            .response(format!("no response within {limit:?}")),
                    )
                }
            }
        })
    }
}
