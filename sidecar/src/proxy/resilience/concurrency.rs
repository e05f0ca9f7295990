//! Adaptive concurrency: the upstream's latency-following limit on
//! requests in flight (`limits::Adaptive`), when its policy sets one.
//! A request over the limit is answered at once with 503 `overload`: the
//! point is to shed before the upstream queues, and a queue here would
//! only move the wait. Shed requests are not retried by this sidecar (the
//! retry layer is below this one); a caller may retry after backing off.
//!
//! Below fault injection, so injected delays and aborts are not mistaken
//! for the upstream's latency; above the timeout and retries, so the
//! latency sampled is what the caller waits for, tries included.

use std::sync::Arc;

use http::Request;
use tokio::time::Instant;

use crate::proxy::{
    svc::{Body, BoxFuture, Next, ProxyError, Step, answer, step_layer, with_guard},
    upstreams::UpstreamLb,
};

#[derive(Clone, Copy, Debug, Default)]
pub struct ConcurrencyLayer;

step_layer!(ConcurrencyLayer => Concurrency);

impl Step for ConcurrencyLayer {
    fn call<S: Next>(&self, next: &mut S, req: Request<Body>) -> BoxFuture {
        let Some(lb) = req.extensions().get::<Arc<UpstreamLb>>().cloned() else {
            return next.call(req);
        };
        if lb.adaptive.limit().is_none() {
            return next.call(req);
        }
        let Some(permit) = lb.adaptive.try_acquire(Instant::now()) else {
            lb.metrics.overflow("adaptive_concurrency");
            return answer(ProxyError::Overload.response(format!(
                "upstream {} is at its adaptive concurrency limit of {}",
                lb.name,
                lb.adaptive.limit().unwrap_or_default()
            )));
        };
        let fut = next.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            permit.sample(Instant::now());
            Ok(resp.map(|b| with_guard(b, permit)))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::{
        convert::Infallible,
        task::{Context, Poll},
        time::Duration,
    };

    use http::{Response, StatusCode};
    use isdp_proto::v1 as pb;
    use tower::{Layer, Service, ServiceExt};

    use super::*;
    use crate::proxy::{
        policy::Compiled,
        svc::{ERROR_HEADER, empty},
    };

    /// Answers every request after `0`.
    #[derive(Clone)]
    struct Slow(Duration);

    impl Service<Request<Body>> for Slow {
        type Response = Response<Body>;
        type Error = Infallible;
        type Future = BoxFuture;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _req: Request<Body>) -> BoxFuture {
            let delay = self.0;
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                Ok(Response::new(empty()))
            })
        }
    }

    fn upstream(adaptive: Option<pb::AdaptiveConcurrency>) -> Arc<UpstreamLb> {
        let policy = pb::TrafficPolicy {
            service: "payments".into(),
            adaptive_concurrency: adaptive,
            ..Default::default()
        };
        Arc::new(UpstreamLb::for_test(Compiled::new(&policy, "1")))
    }

    fn request(lb: &Arc<UpstreamLb>) -> Request<Body> {
        let mut req = Request::new(empty());
        req.extensions_mut().insert(lb.clone());
        req
    }

    #[tokio::test(start_paused = true)]
    async fn sheds_over_the_limit_with_overload_and_frees_at_body_end() {
        let lb = upstream(Some(pb::AdaptiveConcurrency {
            // The limit starts at its floor, while the min RTT is measured.
            min_limit: 2,
            ..Default::default()
        }));
        let svc = ConcurrencyLayer.layer(Slow(Duration::from_millis(100)));
        let a = tokio::spawn(svc.clone().oneshot(request(&lb)));
        let b = tokio::spawn(svc.clone().oneshot(request(&lb)));
        tokio::task::yield_now().await;
        assert_eq!(lb.adaptive.in_flight(), 2);
        let shed = svc.clone().oneshot(request(&lb)).await.unwrap();
        assert_eq!(shed.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(shed.headers()[&ERROR_HEADER], "overload");
        let a = a.await.unwrap().unwrap();
        let _b = b.await.unwrap().unwrap();
        assert_eq!(lb.adaptive.in_flight(), 2, "held until the bodies end");
        drop(a);
        assert_eq!(lb.adaptive.in_flight(), 1);
        let ok = svc.oneshot(request(&lb)).await.unwrap();
        assert_eq!(ok.status(), StatusCode::OK);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_policy_every_request_passes() {
        let lb = upstream(None);
        let svc = ConcurrencyLayer.layer(Slow(Duration::from_millis(10)));
        let answers =
            futures::future::join_all((0..100).map(|_| svc.clone().oneshot(request(&lb)))).await;
        assert!(
            answers
                .iter()
                .all(|r| r.as_ref().unwrap().status() == StatusCode::OK)
        );
        assert_eq!(lb.adaptive.in_flight(), 0, "no place is counted when off");
    }
}
