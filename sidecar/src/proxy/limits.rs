//! Per-upstream counters that outlive the upstream's rebuilds and know
//! nothing of requests: the circuit breaker's gauges and the retry
//! budget's window. `upstreams` keeps one of each per upstream and hands
//! them to every `UpstreamLb` it builds; the layers that consult them are
//! in `resilience`, above `upstreams`. Splitting the counters from the
//! layers is what lets both directions hold: the state the layers read
//! (`UpstreamLb`) contains the counters, and the layers read that state.
//!
//! # Layout
//! - `adaptive`: [`Adaptive`], a concurrency limit that follows the
//!   upstream's latency (gradient rule), and its [`AdaptivePermit`].
//! - `breaker`: [`Breaker`] (requests, pending requests, connections, each
//!   with its cap) and the [`Permit`] that holds a place.
//! - `budget`: [`RetryBudget`], retries as a share of recent requests.

mod adaptive;
mod breaker;
mod budget;

pub use adaptive::{Adaptive, AdaptiveConfig, AdaptivePermit};
pub use breaker::{Breaker, BreakerLimits, DEFAULT_BREAKER_LIMIT, Permit};
pub use budget::{RetryBudget, WINDOW};
