//! Which connections the gRPC listener holds, and for how long a
//! connection may carry nothing.
//!
//! Every connection (its TLS handshake included) takes one of
//! `--max-connections` places; one over the cap is closed as it is
//! accepted, counted and logged at a bounded rate, so a flood of idle
//! connections cannot exhaust file descriptors or memory. A connection
//! must carry its first request within `--first-request-timeout`: a client
//! that finishes TLS and then sends no HTTP/2 preface, or a preface and no
//! request, holds a place without ever presenting a credential, and is
//! closed then. Once a request arrived the connection lives as long as its
//! client keeps it (HTTP/2 keep-alive pings notice a vanished one).

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Sleep,
};

/// Default `--max-connections`: thousands of sidecars (one connection
/// each, plus a few for operators), well under a raised file limit.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default `--first-request-timeout`.
pub const DEFAULT_FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What the listener counts; registered with the control plane's other
/// metrics, which hand it back to the listener.
#[derive(Clone, Debug, Default)]
pub struct ConnectionCounters {
    open: Gauge,
    refused: Family<ReasonLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

impl ConnectionCounters {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "grpc_connections",
            "gRPC connections open, TLS handshakes included",
            self.open.clone(),
        );
        registry.register(
            "grpc_connections_refused",
            "gRPC connections refused at accept (max-connections) or closed for carrying no request in time (no-request)",
            self.refused.clone(),
        );
    }

    fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabel { reason }).inc();
    }
}

/// The listener's places and the rule for idle connections.
#[derive(Clone)]
pub struct Admission {
    places: Arc<Semaphore>,
    max: usize,
    first_request: Duration,
    metrics: ConnectionCounters,
    log: isdp_xds::LogRate,
}

impl Admission {
    pub fn new(max: usize, first_request: Duration, metrics: ConnectionCounters) -> Self {
        Admission {
            places: Arc::new(Semaphore::new(max)),
            max,
            first_request,
            metrics,
            log: isdp_xds::LogRate::default(),
        }
    }

    /// A place for a connection just accepted, or None (counted, and
    /// logged within the rate) when every place is taken.
    pub fn admit(&self, remote: std::net::SocketAddr) -> Option<ConnGuard> {
        let Ok(permit) = self.places.clone().try_acquire_owned() else {
            self.metrics.refused("max-connections");
            if self.log.admit() {
                tracing::warn!(%remote, max = self.max, "gRPC connection refused: --max-connections reached");
            }
            return None;
        };
        self.metrics.open.inc();
        Some(ConnGuard {
            _permit: permit,
            deadline: Some(Box::pin(tokio::time::sleep(self.first_request))),
            first_request: FirstRequest::default(),
            timeout: self.first_request,
            metrics: self.metrics.clone(),
            log: self.log.clone(),
            remote,
        })
    }
}

/// Set by the first request a connection carries (the auth layer marks
/// it); shared between the connection and its requests' connection info.
#[derive(Clone, Debug, Default)]
pub struct FirstRequest(Arc<AtomicBool>);

impl FirstRequest {
    pub fn mark(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn seen(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// One connection's place, held until the connection is dropped, and its
/// first-request deadline.
pub struct ConnGuard {
    _permit: OwnedSemaphorePermit,
    /// None once a request arrived.
    deadline: Option<Pin<Box<Sleep>>>,
    first_request: FirstRequest,
    timeout: Duration,
    metrics: ConnectionCounters,
    log: isdp_xds::LogRate,
    remote: std::net::SocketAddr,
}

impl ConnGuard {
    pub fn first_request(&self) -> FirstRequest {
        self.first_request.clone()
    }

    /// Polled with every read: an error once the deadline passed with no
    /// request (the server then drops the connection), registering the
    /// timer with `cx` until then.
    pub fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        let Some(deadline) = self.deadline.as_mut() else {
            return Poll::Pending;
        };
        if self.first_request.seen() {
            self.deadline = None;
            return Poll::Pending;
        }
        match deadline.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                self.deadline = None;
                self.metrics.refused("no-request");
                if self.log.admit() {
                    tracing::warn!(remote = %self.remote, timeout = ?self.timeout, "gRPC connection closed: no request within --first-request-timeout");
                }
                Poll::Ready(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no request within --first-request-timeout",
                ))
            }
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.metrics.open.dec();
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use super::*;

    fn render(counters: &ConnectionCounters) -> String {
        let mut registry = Registry::with_prefix("isdp");
        counters.register(&mut registry);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        out
    }

    /// Places are given back when connections end; one over the cap is
    /// refused and counted.
    #[tokio::test]
    async fn connections_over_the_cap_are_refused_until_one_ends() {
        let metrics = ConnectionCounters::default();
        let admission = Admission::new(2, Duration::from_secs(10), metrics.clone());
        let remote = "127.0.0.1:1".parse().unwrap();
        let a = admission.admit(remote).expect("first");
        let _b = admission.admit(remote).expect("second");
        assert!(admission.admit(remote).is_none());
        drop(a);
        assert!(admission.admit(remote).is_some());
        let text = render(&metrics);
        assert!(
            text.contains("isdp_grpc_connections_refused_total{reason=\"max-connections\"} 1"),
            "{text}"
        );
    }

    /// A connection without a request is ended at the deadline; one whose
    /// first request arrived is not.
    #[tokio::test(start_paused = true)]
    async fn a_connection_must_carry_a_request_within_the_timeout() {
        let metrics = ConnectionCounters::default();
        let admission = Admission::new(8, Duration::from_secs(10), metrics.clone());
        let remote = "127.0.0.1:1".parse().unwrap();
        let mut idle = admission.admit(remote).unwrap();
        let mut busy = admission.admit(remote).unwrap();
        let pending = |g: &mut ConnGuard| {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            g.poll_deadline(&mut cx).is_pending()
        };
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(pending(&mut idle));
        busy.first_request().mark();
        assert!(pending(&mut busy));
        tokio::time::advance(Duration::from_secs(2)).await;
        let e = poll_fn(|cx| idle.poll_deadline(cx)).await;
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(
            pending(&mut busy),
            "a connection that carried a request stays"
        );
        assert!(
            render(&metrics)
                .contains("isdp_grpc_connections_refused_total{reason=\"no-request\"} 1")
        );
    }
}
