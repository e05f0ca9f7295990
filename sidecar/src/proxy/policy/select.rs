//! The `Select` layer: matches each request against its upstream's
//! compiled routes (first match wins) and attaches the chosen
//! [`RoutePolicy`](super::RoutePolicy) for the resilience layers below.

use std::{
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
};

use http::{Request, Response};
use tower::{Layer, Service};

use crate::proxy::{http::Body, outbound::BoxFuture, upstreams::UpstreamLb};

/// Matches each request against its upstream's routes and attaches the
/// chosen [`RoutePolicy`] for the resilience layers below.
#[derive(Clone, Copy, Debug, Default)]
pub struct SelectLayer;

impl<S> Layer<S> for SelectLayer {
    type Service = Select<S>;
    fn layer(&self, inner: S) -> Select<S> {
        Select { inner }
    }
}

#[derive(Clone)]
pub struct Select<S> {
    inner: S,
}

impl<S> Service<Request<Body>> for Select<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future = BoxFuture>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Body>) -> BoxFuture {
        let chosen = req
            .extensions()
            .get::<Arc<UpstreamLb>>()
            .map(|lb| lb.policy.select(&req).clone());
        if let Some(p) = chosen {
            req.extensions_mut().insert(p);
        }
        self.inner.call(req)
    }
}
