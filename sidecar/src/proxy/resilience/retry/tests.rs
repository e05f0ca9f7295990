use std::{
    collections::VecDeque,
    convert::Infallible,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use isdp_proto::v1::{RetryPolicy, Timeouts, TrafficPolicy};

use tower::{Layer, Service};

use super::*;
use crate::proxy::{policy::Compiled, svc::boxed};

/// Answers each call with the next (delay, status) and records the bodies.
#[derive(Clone, Default)]
struct Mock {
    script: Arc<Mutex<VecDeque<(Duration, u16)>>>,
    calls: Arc<AtomicUsize>,
    bodies: Arc<Mutex<Vec<Bytes>>>,
}

impl Mock {
    fn new(script: &[(u64, u16)]) -> Self {
        let m = Mock::default();
        *m.script.lock().unwrap() = script
            .iter()
            .map(|(ms, s)| (Duration::from_millis(*ms), *s))
            .collect();
        m
    }
}

impl Service<Request<Body>> for Mock {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> BoxFuture {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let (delay, status) = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or((Duration::ZERO, 200));
        let bodies = self.bodies.clone();
        Box::pin(async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            bodies.lock().unwrap().push(body);
            tokio::time::sleep(delay).await;
            let mut resp = Response::new(crate::proxy::svc::empty());
            *resp.status_mut() = StatusCode::from_u16(status).unwrap();
            Ok(resp)
        })
    }
}

fn policy(retries: Option<RetryPolicy>, timeouts: Option<Timeouts>) -> Compiled {
    let p = TrafficPolicy {
        service: "test".into(),
        retries,
        timeouts,
        ..Default::default()
    };
    Compiled::new(&p, "1")
}

async fn send(mock: &Mock, compiled: Compiled, method: &str, body: &'static str) -> u16 {
    let lb = Arc::new(UpstreamLb::for_test(compiled));
    let mut req = Request::builder()
        .method(method)
        .uri("/x")
        .body(boxed(Full::new(Bytes::from_static(body.as_bytes()))))
        .unwrap();
    let route = lb.policy.select(&req).clone();
    req.extensions_mut().insert(route);
    req.extensions_mut().insert(lb);
    let mut svc = RetryLayer.layer(mock.clone());
    svc.call(req).await.unwrap().status().as_u16()
}

fn retries(attempts: u32, on: &[&str]) -> Option<RetryPolicy> {
    Some(RetryPolicy {
        attempts,
        retry_on: on.iter().map(|s| s.to_string()).collect(),
        backoff_base_ms: 10,
        backoff_max_ms: 100,
        ..Default::default()
    })
}

#[tokio::test(start_paused = true)]
async fn defaults_retry_gateway_errors_twice() {
    let mock = Mock::new(&[(0, 503), (0, 502), (0, 200)]);
    assert_eq!(send(&mock, Compiled::defaults(), "GET", "").await, 200);
    assert_eq!(mock.calls.load(Ordering::SeqCst), 3);
    let mock = Mock::new(&[(0, 503), (0, 503), (0, 503), (0, 200)]);
    assert_eq!(send(&mock, Compiled::defaults(), "GET", "").await, 503);
    assert_eq!(mock.calls.load(Ordering::SeqCst), 3, "1 try + 2 retries");
    let mock = Mock::new(&[(0, 500)]);
    assert_eq!(
        send(&mock, Compiled::defaults(), "GET", "").await,
        500,
        "a plain 500 is not a gateway error"
    );
}

#[tokio::test(start_paused = true)]
async fn non_idempotent_methods_and_zero_attempts_are_not_retried() {
    let mock = Mock::new(&[(0, 503), (0, 200)]);
    assert_eq!(send(&mock, Compiled::defaults(), "POST", "x").await, 503);
    let mock = Mock::new(&[(0, 503), (0, 200)]);
    let off = policy(retries(0, &["5xx"]), None);
    assert_eq!(send(&mock, off, "GET", "").await, 503);
    assert_eq!(mock.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn status_codes_and_bodies_are_replayed() {
    let mut r = retries(3, &["retriable-status-codes"]).unwrap();
    r.status_codes = vec![409];
    r.methods = vec!["POST".into()];
    let mock = Mock::new(&[(0, 409), (0, 409), (0, 201)]);
    assert_eq!(
        send(&mock, policy(Some(r), None), "POST", "payload").await,
        201
    );
    let bodies = mock.bodies.lock().unwrap().clone();
    assert_eq!(bodies, vec![Bytes::from_static(b"payload"); 3]);
}

#[tokio::test(start_paused = true)]
async fn bodies_over_the_buffer_are_not_retried() {
    let mut r = retries(3, &["5xx"]).unwrap();
    r.buffer_bytes = 4;
    let mock = Mock::new(&[(0, 503), (0, 200)]);
    assert_eq!(
        send(&mock, policy(Some(r), None), "PUT", "too long").await,
        503
    );
    assert_eq!(mock.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn per_try_timeout_fails_the_try_and_the_next_one_answers() {
    let t = Timeouts {
        per_try_ms: 100,
        ..Default::default()
    };
    let mock = Mock::new(&[(10_000, 200), (5, 200)]);
    let start = tokio::time::Instant::now();
    let compiled = policy(retries(2, &["gateway-error"]), Some(t));
    assert_eq!(send(&mock, compiled, "GET", "").await, 200);
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(115), "{took:?}");
    assert!(took < Duration::from_millis(300), "{took:?}");
}

#[tokio::test(start_paused = true)]
async fn backoff_grows_with_jitter_within_bounds() {
    let cfg = RetryConfig {
        backoff_base: Duration::from_millis(25),
        backoff_max: Duration::from_millis(250),
        ..Default::default()
    };
    for retry in 0..8 {
        let cap = (25u64 << retry).min(250);
        for _ in 0..50 {
            let d = backoff(&cfg, retry);
            assert!(d >= Duration::from_millis(25) && d <= Duration::from_millis(cap));
        }
    }
    assert_eq!(backoff(&cfg, 0), Duration::from_millis(25));
    // The loop sleeps that long between tries.
    let mock = Mock::new(&[(0, 503), (0, 503), (0, 200)]);
    let start = tokio::time::Instant::now();
    assert_eq!(send(&mock, Compiled::defaults(), "GET", "").await, 200);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(50) && took <= Duration::from_millis(75),
        "{took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_budget_stops_retry_storms() {
    let mut r = retries(1, &["5xx"]).unwrap();
    r.budget_ratio = 0.1;
    r.budget_min_per_second = 0;
    let compiled = Arc::new(policy(Some(r), None));
    let lb = Arc::new(UpstreamLb::for_test(policy(None, None)));
    let mock = Mock::new(&[(0, 503); 400]);
    let mut svc = RetryLayer.layer(mock.clone());
    for _ in 0..100 {
        let mut req = Request::new(crate::proxy::svc::empty());
        let route = compiled.select(&req).clone();
        req.extensions_mut().insert(route);
        req.extensions_mut().insert(lb.clone());
        svc.call(req).await.unwrap();
    }
    // 100 requests may add 10 retries.
    assert_eq!(mock.calls.load(Ordering::SeqCst), 110);
}

#[test]
fn grpc_codes_come_from_trailers_only_headers() {
    let mut r = retries(1, &["retriable-grpc-codes"]).unwrap();
    r.grpc_codes = vec!["unavailable".into()];
    let compiled = policy(Some(r), None);
    let req = Request::new(());
    let cfg = &compiled.select(&req).retry;
    let mut resp = Response::new(crate::proxy::svc::empty());
    resp.headers_mut()
        .insert("grpc-status", http::HeaderValue::from_static("14"));
    assert_eq!(classify(&resp, cfg), Some("grpc-code"));
    resp.headers_mut()
        .insert("grpc-status", http::HeaderValue::from_static("13"));
    assert_eq!(classify(&resp, cfg), None);
}

#[test]
fn nothing_to_send_to_is_not_retried() {
    let cfg = RetryConfig::default();
    let resp = ProxyError::NoHealthyEndpoints.response("none");
    assert_eq!(classify(&resp, &cfg), None);
    let resp = ProxyError::ConnectRefused.response("refused");
    assert_eq!(classify(&resp, &cfg), Some("connect-failure"));
    let resp = ProxyError::UpstreamReset.response("reset");
    assert_eq!(classify(&resp, &cfg), Some("reset"));
}
