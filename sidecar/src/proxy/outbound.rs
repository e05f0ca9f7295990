//! The outbound request path, as a stack of named tower layers, one file
//! each, in the order a request meets them:
//!
//! `Route` (which upstream?, `route`) -> `Observe` (metrics, in
//! `observe`) -> `Select` (which route of the upstream's traffic
//! policy?, `select`) -> `Breaker` -> `Fault` -> `Timeout` -> `Retry` (in
//! `resilience`) -> `Balance` (which endpoint? the route's subset,
//! skipping ejected endpoints and those earlier tries used, `balance`) ->
//! `Dispatch` (send it, and feed outlier detection, `dispatch`). Each
//! layer either passes the request on, carrying its decision in the
//! request's extensions, or answers it itself with a response naming the
//! reason in `x-isdp-error` ([`ProxyError`](super::svc::ProxyError)).
//!
//! Spans and the access log wrap the stack (`trace::Trace`, outermost) and
//! the endpoint (`trace::TraceEndpoint`, between `Balance` and
//! `Dispatch`).
//!
//! This file only assembles the stack; the types the layers share are in
//! `svc` and `upstreams`, so no layer imports this one.

mod balance;
mod dispatch;
mod route;
mod select;

use tower::Layer;

use super::{
    forward::Forwarder,
    observe::{Observe, ObserveLayer},
    resilience::{
        BreakerLayer, BreakerService, Concurrency, ConcurrencyLayer, Fault, FaultLayer, Retry,
        RetryLayer, Timeout, TimeoutLayer,
    },
    trace::{Trace, TraceEndpoint, TraceEndpointLayer, TraceLayer, TraceSettings},
    upstreams::Upstreams,
};

pub use balance::{Balance, BalanceLayer};
pub use dispatch::Dispatch;
pub use route::{Route, RouteBy, RouteLayer};
pub use select::{Select, SelectLayer};

/// The layers below `Select`, per request, in order.
pub type Resilient =
    BreakerService<Fault<Concurrency<Timeout<Retry<Balance<TraceEndpoint<Dispatch>>>>>>>;

/// The stack for one outbound listener.
pub fn stack(
    by: RouteBy,
    upstreams: Upstreams,
    forwarder: Forwarder,
    tracing: TraceSettings,
) -> Trace<Route<Observe<Select<Resilient>>>> {
    let dispatch = TraceEndpointLayer::new(&tracing).layer(Dispatch { forwarder });
    let balance = BalanceLayer.layer(dispatch);
    let retry = RetryLayer.layer(balance);
    let timeout = TimeoutLayer.layer(retry);
    let concurrency = ConcurrencyLayer.layer(timeout);
    let fault = FaultLayer.layer(concurrency);
    let breaker = BreakerLayer.layer(fault);
    let select = SelectLayer.layer(breaker);
    let observe = ObserveLayer::upstream().layer(select);
    let route = RouteLayer { by, upstreams }.layer(observe);
    TraceLayer(tracing).layer(route)
}
