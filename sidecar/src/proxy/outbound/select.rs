//! The `Select` layer: matches each request against its upstream's
//! compiled routes (first match wins) and attaches the chosen
//! [`RoutePolicy`] for the resilience layers below.

use std::sync::Arc;

use http::Request;

use crate::proxy::{
    policy::RoutePolicy,
    svc::{Body, BoxFuture, Next, Step, step_layer},
    upstreams::UpstreamLb,
};

/// Matches each request against its upstream's routes and attaches the
/// chosen [`RoutePolicy`] for the resilience layers below.
#[derive(Clone, Copy, Debug, Default)]
pub struct SelectLayer;

step_layer!(SelectLayer => Select);

impl Step for SelectLayer {
    fn call<S: Next>(&self, next: &mut S, mut req: Request<Body>) -> BoxFuture {
        let chosen: Option<Arc<RoutePolicy>> = req
            .extensions()
            .get::<Arc<UpstreamLb>>()
            .map(|lb| lb.policy.select(&req).clone());
        if let Some(p) = chosen {
            req.extensions_mut().insert(p);
        }
        next.call(req)
    }
}
