//! The `GrpcMetrics` layer: every call to the control plane's gRPC listener
//! counted by method and status code, and timed, in the manner of
//! go-grpc-prometheus (`grpc_server_handled_total`,
//! `grpc_server_handling_seconds`; for streams the time is the stream's
//! life).
//!
//! The code comes from the response headers when the call fails before any
//! message (trailers-only), otherwise from the trailers at the end of the
//! body. Paths that are no method of the control plane (no row in
//! [`crate::auth::METHODS`]) are counted under the method `unknown`,
//! whatever they were answered (PERMISSION_DENIED or UNAUTHENTICATED for
//! most callers, UNIMPLEMENTED for an admin), so a scanner cannot grow the
//! label set.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use super::Metrics;

#[derive(Clone)]
pub struct GrpcMetricsLayer {
    metrics: Metrics,
}

impl GrpcMetricsLayer {
    pub fn new(metrics: Metrics) -> Self {
        GrpcMetricsLayer { metrics }
    }
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    metrics: Metrics,
}

/// gRPC's UNKNOWN, for a call that ends without a status.
const UNKNOWN: u16 = 2;
/// A call whose response body was dropped before its trailers.
const CANCELLED: u16 = 1;

impl<S, ReqBody, B> tower::Service<http::Request<ReqBody>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
{
    type Response = http::Response<Observed<B>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let path = req.uri().path();
        let method = if crate::auth::lookup(path).is_some() {
            path.to_owned()
        } else {
            "unknown".to_owned()
        };
        let metrics = self.metrics.clone();
        let start = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            let mut call = Call {
                metrics,
                method,
                start,
                done: false,
            };
            if let Some(code) = grpc_status(resp.headers()) {
                call.finish(code);
            }
            Ok(resp.map(|inner| Observed { inner, call }))
        })
    }
}

fn grpc_status(headers: &HeaderMap) -> Option<u16> {
    std::str::from_utf8(headers.get("grpc-status")?.as_bytes())
        .ok()?
        .parse()
        .ok()
}

struct Call {
    metrics: Metrics,
    method: String,
    start: Instant,
    done: bool,
}

impl Call {
    fn finish(&mut self, code: u16) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        self.metrics
            .grpc_handled(&self.method, code, self.start.elapsed().as_secs_f64());
    }
}

/// The response body, passed through; its trailers finish the call.
pub struct Observed<B> {
    inner: B,
    call: Call,
}

impl<B: Body<Data = Bytes> + Unpin> Body for Observed<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(t) = frame.trailers_ref() {
                    this.call.finish(grpc_status(t).unwrap_or(UNKNOWN));
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => this.call.finish(UNKNOWN),
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

impl<B> Drop for Observed<B> {
    fn drop(&mut self) {
        self.call.finish(CANCELLED);
    }
}
