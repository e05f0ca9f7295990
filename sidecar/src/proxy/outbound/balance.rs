//! The `Balance` layer: which endpoint of the upstream gets the request.
//! Within the route's weighted subset, it skips ejected endpoints and
//! those earlier tries of the same request used ([`Avoid`]), and charges
//! the chosen one a request; the pick rides down to `Dispatch` in a
//! [`PickedSlot`]. No endpoint to send to is 503 `no-healthy-endpoints`.

use std::sync::{Arc, Mutex};

use http::Request;

use crate::proxy::{
    policy::RoutePolicy,
    resilience::Avoid,
    svc::{Body, BoxFuture, ClientAddr, Next, ProxyError, Step, answer, step_layer},
    upstreams::{Picked, PickedSlot, UpstreamLb},
};

#[derive(Clone, Copy, Debug, Default)]
pub struct BalanceLayer;

step_layer!(BalanceLayer => Balance);

impl Step for BalanceLayer {
    fn call<S: Next>(&self, next: &mut S, mut req: Request<Body>) -> BoxFuture {
        let lb = req
            .extensions_mut()
            .remove::<Arc<UpstreamLb>>()
            .expect("route layer runs first");
        let source = req.extensions().get::<ClientAddr>().map(|c| c.addr.ip());
        let subset = req
            .extensions()
            .get::<Arc<RoutePolicy>>()
            .and_then(|p| pick_subset(&p.split));
        let avoid = req
            .extensions()
            .get::<Avoid>()
            .map_or(&[][..], |a| &a.0[..]);
        let Some((endpoint, guard)) = lb.pick_in(req.headers(), source, subset, avoid) else {
            return answer(
                ProxyError::NoHealthyEndpoints
                    .response(format!("upstream {} has no endpoints to send to", lb.name)),
            );
        };
        let slot: PickedSlot = Arc::new(Mutex::new(Some(Picked {
            endpoint,
            guard,
            upstream: lb,
        })));
        req.extensions_mut().insert(slot);
        next.call(req)
    }
}

/// A subset by the split's weights (cumulative, ending at 100); None
/// when the route splits nothing.
fn pick_subset(split: &[(usize, u32)]) -> Option<usize> {
    let total = split.last()?.1;
    let r = rand::random_range(0..total.max(1));
    split.iter().find(|(_, upto)| r < *upto).map(|(i, _)| *i)
}
