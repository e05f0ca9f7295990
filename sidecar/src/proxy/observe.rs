//! The `Observe` layer: golden metrics for every request on a route
//! (count by status, latency to response headers, in flight until the
//! response body ends, gRPC status from headers or trailers, and the
//! sidecar's own error responses by reason).
//!
//! Outbound it sits after `Route` (which names the upstream) and before
//! `Balance`, so a request refused for lack of endpoints is counted too;
//! inbound, each local service's stack starts with it, so requests refused
//! for their path or by policy are counted as well.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body::{Body as _, Frame, SizeHint};

use super::{
    svc::{Body, BoxError, BoxFuture, Next, ProxyError, Step, grpc, step_layer},
    upstreams::UpstreamLb,
};
use crate::metrics::RouteMetrics;

/// Whose metrics a request is recorded on.
#[derive(Clone, Debug)]
enum Route {
    /// Outbound: the upstream the `Route` layer put in the extensions.
    Upstream,
    /// Inbound: the local service whose stack this is.
    Fixed(Arc<RouteMetrics>),
}

#[derive(Clone, Debug)]
pub struct ObserveLayer(Route);

impl ObserveLayer {
    /// Records each request on its upstream's metrics.
    pub fn upstream() -> Self {
        ObserveLayer(Route::Upstream)
    }

    /// Records every request on `metrics` (one local service's).
    pub fn route(metrics: Arc<RouteMetrics>) -> Self {
        ObserveLayer(Route::Fixed(metrics))
    }
}

step_layer!(ObserveLayer => Observe);

impl Step for ObserveLayer {
    fn call<S: Next>(&self, next: &mut S, req: Request<Body>) -> BoxFuture {
        let metrics = match &self.0 {
            Route::Upstream => req
                .extensions()
                .get::<Arc<UpstreamLb>>()
                .map(|lb| lb.metrics.clone()),
            Route::Fixed(m) => Some(m.clone()),
        };
        let fut = next.call(req);
        match metrics {
            Some(m) => observe(m, fut),
            None => fut,
        }
    }
}

/// Records the request that `fut` answers on `m`.
fn observe(m: Arc<RouteMetrics>, fut: BoxFuture) -> BoxFuture {
    let start = Instant::now();
    m.in_flight.inc();
    Box::pin(async move {
        let Ok(resp) = fut.await;
        m.duration.observe(start.elapsed().as_secs_f64());
        m.status(resp.status());
        m.finished(resp.status(), start.elapsed());
        if let Some(e) = resp.extensions().get::<ProxyError>() {
            m.error(e.as_str());
        }
        let grpc = grpc::is_grpc(resp.headers());
        let mut pending = grpc;
        if grpc && let Some(code) = grpc_status(resp.headers()) {
            // Trailers-only response: the call ended with the headers.
            m.grpc(code);
            pending = false;
        }
        if resp.body().is_end_stream() {
            if pending {
                m.grpc(UNKNOWN);
            }
            m.in_flight.dec();
            return Ok(resp);
        }
        Ok(resp.map(|inner| Body::new(Observed::new(inner, m, pending))))
    })
}

fn grpc_status(headers: &HeaderMap) -> Option<u16> {
    let v = headers.get("grpc-status")?;
    std::str::from_utf8(v.as_bytes()).ok()?.parse().ok()
}

/// gRPC codes recorded when a call ends without a status.
const CANCELLED: u16 = 1;
const UNKNOWN: u16 = 2;

/// A response body that keeps the request in flight until it ends, and
/// reads the gRPC status from its trailers.
struct Observed {
    inner: Body,
    metrics: Arc<RouteMetrics>,
    /// True while a gRPC status is still expected from the trailers.
    grpc_pending: bool,
    ended: bool,
}

impl Observed {
    fn new(inner: Body, metrics: Arc<RouteMetrics>, grpc_pending: bool) -> Self {
        Observed {
            inner,
            metrics,
            grpc_pending,
            ended: false,
        }
    }
}

impl http_body::Body for Observed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if self.grpc_pending
                    && let Some(trailers) = frame.trailers_ref()
                {
                    self.grpc_pending = false;
                    let code = grpc_status(trailers).unwrap_or(UNKNOWN);
                    self.metrics.grpc(code);
                }
            }
            Poll::Ready(None) => {
                if std::mem::take(&mut self.grpc_pending) {
                    self.metrics.grpc(UNKNOWN);
                }
                self.ended = true;
            }
            Poll::Ready(Some(Err(_))) => self.ended = true,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        self.metrics.in_flight.dec();
        if self.grpc_pending {
            // Dropped before the trailers: the caller went away.
            self.metrics
                .grpc(if self.ended { UNKNOWN } else { CANCELLED });
        }
    }
}
