//! Oversized requests get RESOURCE_EXHAUSTED, as the gRPC status code
//! guide prescribes for "request message larger than the configured limit".
//!
//! tonic rejects such a message before any handler runs, but reports it as
//! OUT_OF_RANGE. No handler of ours returns OUT_OF_RANGE, so this layer
//! rewrites that code, in a trailers-only response, to RESOURCE_EXHAUSTED.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use http::HeaderValue;

#[derive(Clone, Copy, Debug, Default)]
pub struct SizeLimitStatusLayer;

impl<S> tower::Layer<S> for SizeLimitStatusLayer {
    type Service = SizeLimitStatus<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SizeLimitStatus { inner }
    }
}

#[derive(Clone, Debug)]
pub struct SizeLimitStatus<S> {
    inner: S,
}

const OUT_OF_RANGE: &str = "11";
const RESOURCE_EXHAUSTED: &str = "8";

impl<S, Req, B> tower::Service<Req> for SizeLimitStatus<S>
where
    S: tower::Service<Req, Response = http::Response<B>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<B>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut resp = fut.await?;
            let headers = resp.headers_mut();
            if headers
                .get("grpc-status")
                .is_some_and(|v| v == OUT_OF_RANGE)
            {
                headers.insert("grpc-status", HeaderValue::from_static(RESOURCE_EXHAUSTED));
            }
            Ok(resp)
        })
    }
}
