//! The retry loop. A request whose method the route's policy allows is
//! tried up to `1 + attempts` times while each try fails in a way the
//! policy names (`retry_on`), the upstream's retry budget has room, and
//! the body can be replayed (see `replay`). Each try has the per-try
//! timeout (504 `per-try-timeout`, a gateway error) and goes to an
//! endpoint not tried yet when the upstream has one ([`Avoid`]). Between
//! tries: exponential backoff with jitter. A response is only ever retried
//! before anything of it was passed on, so a caller never sees two.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{Request, Response};
use http_body::Body as _;

use super::Replay;
use crate::{
    balance::Outcome,
    proxy::{
        http::is_upgrade,
        policy::{RetryConfig, RoutePolicy},
        svc::{Body, BoxFuture, Next, ProxyError, Step, empty, step_layer},
        upstreams::{LbEndpoint, UpstreamLb},
    },
};

/// Endpoints earlier tries of this request went to, for the balancer.
#[derive(Clone, Debug, Default)]
pub struct Avoid(pub Vec<Arc<LbEndpoint>>);

/// On a response: the endpoint that produced it (set by `Dispatch`).
#[derive(Clone, Debug)]
pub struct Tried(pub Arc<LbEndpoint>);

/// On a try's request: where `Dispatch` notes the endpoint it sends the
/// try to. A try the per-try timeout abandons never reaches the end of
/// `Dispatch`, which would have said; this is how the timeout still
/// names the silent endpoint, so the next try avoids it and outlier
/// detection counts the timeout as a gateway error (as Envoy does).
#[derive(Clone, Debug, Default)]
pub struct TrySlot(Arc<Mutex<Option<Arc<LbEndpoint>>>>);

impl TrySlot {
    pub fn set(&self, endpoint: Arc<LbEndpoint>) {
        *self.0.lock().expect("try slot lock") = Some(endpoint);
    }

    fn take(&self) -> Option<Arc<LbEndpoint>> {
        self.0.lock().expect("try slot lock").take()
    }
}

static GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// Why a try's response may be retried under `cfg`, as a metric label;
/// None when it may not.
pub fn classify(resp: &Response<Body>, cfg: &RetryConfig) -> Option<&'static str> {
    let on = &cfg.on;
    match ProxyError::of(resp) {
        Some(e) if e.is_connect_failure() && on.connect_failure => {
            return Some("connect-failure");
        }
        Some(ProxyError::UpstreamReset) if on.reset => return Some("reset"),
        // This sidecar found nothing to send to: another try would not
        // either, it would only spend the budget.
        Some(ProxyError::NoHealthyEndpoints) => return None,
        _ => {}
    }
    let status = resp.status().as_u16();
    if on.server_error && resp.status().is_server_error() {
        return Some("5xx");
    }
    if on.gateway_error && (502..=504).contains(&status) {
        return Some("gateway-error");
    }
    if on.status_codes && cfg.status_codes.contains(&status) {
        return Some("status-code");
    }
    if on.grpc_codes
        && let Some(code) = resp
            .headers()
            .get(&GRPC_STATUS)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u16>().ok())
        && cfg.grpc_codes.contains(&code)
    {
        return Some("grpc-code");
    }
    None
}

/// The pause before retry number `retry` (0-based): uniform between the
/// base and `base × 2^retry` capped at the max ("full jitter" above the
/// base), so a crowd of retries spreads out instead of arriving together.
pub fn backoff(cfg: &RetryConfig, retry: u32) -> Duration {
    let cap = cfg
        .backoff_base
        .saturating_mul(1u32 << retry.min(16))
        .min(cfg.backoff_max)
        .max(cfg.backoff_base);
    let spread = cap - cfg.backoff_base;
    cfg.backoff_base + spread.mul_f64(rand::random::<f64>())
}

#[derive(Clone, Copy, Debug, Default)]
pub struct RetryLayer;

step_layer!(RetryLayer => Retry);

/// One try, under the per-try timeout.
async fn try_once<S: Next>(
    inner: &mut S,
    mut req: Request<Body>,
    per_try: Option<Duration>,
    lb: &UpstreamLb,
) -> Response<Body> {
    let Some(limit) = per_try else {
        return match inner.call(req).await {
            Ok(r) => r,
            Err(e) => match e {},
        };
    };
    let slot = TrySlot::default();
    req.extensions_mut().insert(slot.clone());
    match tokio::time::timeout(limit, inner.call(req)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => match e {},
        Err(_) => {
            lb.metrics.timeout("per-try");
            let mut resp = ProxyError::PerTryTimeout.response(format!(
                "no response within the per-try timeout of {limit:?}"
            ));
            if let Some(endpoint) = slot.take() {
                lb.record_outcome(&endpoint, Outcome::GatewayError);
                resp.extensions_mut().insert(Tried(endpoint));
            }
            resp
        }
    }
}

/// A copy of `parts` for another try (the body comes separately).
fn copy_parts(parts: &http::request::Parts, body: Body) -> Request<Body> {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    *req.extensions_mut() = parts.extensions.clone();
    req
}

impl Step for RetryLayer {
    fn call<S: Next>(&self, next: &mut S, req: Request<Body>) -> BoxFuture {
        let (Some(policy), Some(lb)) = (
            req.extensions().get::<Arc<RoutePolicy>>().cloned(),
            req.extensions().get::<Arc<UpstreamLb>>().cloned(),
        ) else {
            return next.call(req);
        };
        let mut inner = next.clone();
        let per_try = policy.per_try_timeout;
        let cfg = &policy.retry;
        let retriable = cfg.attempts > 0 && cfg.methods.contains(req.method()) && !is_upgrade(&req);
        if !retriable {
            return Box::pin(async move { Ok(try_once(&mut inner, req, per_try, &lb).await) });
        }
        lb.budget.request();
        let (parts, body) = req.into_parts();
        // Most retried requests (GET and friends) have no body at all.
        let replay = (!body.is_end_stream()).then(|| Replay::new(body, cfg.buffer_bytes));
        Box::pin(async move {
            let cfg = &policy.retry;
            let mut avoid = Avoid::default();
            let mut retry = 0;
            loop {
                let body = replay.as_ref().map_or_else(empty, Replay::body);
                let mut req = copy_parts(&parts, body);
                if !avoid.0.is_empty() {
                    req.extensions_mut().insert(avoid.clone());
                }
                let resp = try_once(&mut inner, req, per_try, &lb).await;
                let Some(reason) = classify(&resp, cfg) else {
                    return Ok(resp);
                };
                if retry >= cfg.attempts || replay.as_ref().is_some_and(|r| !r.can_replay()) {
                    return Ok(resp);
                }
                if !lb
                    .budget
                    .try_retry(cfg.budget_ratio, cfg.budget_min_per_second)
                {
                    lb.metrics.retry_budget_exhausted();
                    return Ok(resp);
                }
                if let Some(t) = resp.extensions().get::<Tried>() {
                    avoid.0.push(t.0.clone());
                }
                drop(resp);
                lb.metrics.retry(reason);
                tokio::time::sleep(backoff(cfg, retry)).await;
                retry += 1;
            }
        })
    }
}

#[cfg(test)]
mod tests;
