//! Fault injection: delays and aborts a share of requests, as the route's
//! policy says, to test how callers cope. An abort is the policy's status
//! with `x-isdp-error: fault-injected`; a delay comes before the request
//! is sent (and so counts against the request timeout).

use std::sync::Arc;

use http::Request;

use crate::proxy::{
    policy::RoutePolicy,
    svc::{Body, BoxFuture, Next, ProxyError, Step, answer, step_layer},
};

#[derive(Clone, Copy, Debug, Default)]
pub struct FaultLayer;

step_layer!(FaultLayer => Fault);

/// True for `percent` (0-100) of calls.
fn roll(percent: f64) -> bool {
    percent > 0.0 && rand::random::<f64>() * 100.0 < percent
}

impl Step for FaultLayer {
    fn call<S: Next>(&self, next: &mut S, req: Request<Body>) -> BoxFuture {
        let Some(fault) = req
            .extensions()
            .get::<Arc<RoutePolicy>>()
            .and_then(|p| p.fault)
        else {
            return next.call(req);
        };
        if roll(fault.abort_percent) {
            return answer(ProxyError::FaultInjected.response_with(
                fault.abort_status,
                "aborted by the upstream's fault-injection policy",
            ));
        }
        if !roll(fault.delay_percent) {
            return next.call(req);
        }
        let mut next = next.clone();
        Box::pin(async move {
            tokio::time::sleep(fault.delay).await;
            next.call(req).await
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
