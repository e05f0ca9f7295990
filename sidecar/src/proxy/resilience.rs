//! Resilience on the outbound path, as tower layers between `Select`
//! (which route of the upstream's policy?) and `Balance`:
//!
//! `Breaker` (concurrency limits, `breaker`) -> `Fault` (injected delays
//! and aborts, `fault`) -> `Concurrency` (the adaptive limit,
//! `concurrency`) -> `Timeout` (the whole call, `timeout`) ->
//! `Retry` (per-try timeouts, backoff, budget, replayable bodies, `retry`).
//!
//! Each reads the request's [`RoutePolicy`](super::policy::RoutePolicy)
//! and its `UpstreamLb` from the extensions; a request without them (no
//! route layer above) passes through untouched. Outlier detection lives
//! with the balancer (`balance::outlier`), fed by `Dispatch`.
//!
//! # Layout
//! - `breaker`: the per-upstream concurrency check (its counters are
//!   `limits::Breaker`); overflow is 503 at once.
//! - `fault`: delay and/or abort a share of requests.
//! - `concurrency`: the latency-following limit (`limits::Adaptive`);
//!   over it is 503 `overload` at once.
//! - `timeout`: the request timeout (504 `request-timeout`).
//! - `retry`: the retry loop, classification and backoff, under the
//!   upstream's `limits::RetryBudget`.
//! - `replay`: a request body that can be sent again.
//!
//! Each layer is a [`Step`](super::svc::Step): the file holds what the
//! layer does, and `svc` the tower plumbing they share.

mod breaker;
mod concurrency;
mod fault;
mod replay;
mod retry;
mod timeout;

pub use breaker::{BreakerLayer, BreakerService, ConnectLimits};
pub use concurrency::{Concurrency, ConcurrencyLayer};
pub use fault::{Fault, FaultLayer};
pub use replay::Replay;
pub use retry::{Avoid, Retry, RetryLayer, Tried, TrySlot, backoff, classify};
pub use timeout::{Timeout, TimeoutLayer};
