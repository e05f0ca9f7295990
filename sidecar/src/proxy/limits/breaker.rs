//! The circuit breaker's counters: one [`Breaker`] per upstream, holding
//! a gauge and a cap for each of requests in flight, requests waiting for
//! a connection, and open connections. A [`Permit`] holds one place until
//! it is dropped. What is counted where (and the 503 `overflow` answer) is
//! the breaker layer's and the pools' (`resilience::breaker`, `forward`).

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

/// High enough never to bite a healthy service; low enough to stop a
/// stalled upstream from soaking up every socket and task.
pub const DEFAULT_BREAKER_LIMIT: usize = 1024;

/// The caps a policy's `circuit_breaker` sets; each defaults to
/// [`DEFAULT_BREAKER_LIMIT`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerLimits {
    pub max_requests: usize,
    pub max_pending: usize,
    pub max_connections: usize,
}

impl Default for BreakerLimits {
    fn default() -> Self {
        BreakerLimits {
            max_requests: DEFAULT_BREAKER_LIMIT,
            max_pending: DEFAULT_BREAKER_LIMIT,
            max_connections: DEFAULT_BREAKER_LIMIT,
        }
    }
}

/// One upstream's gate; the same across endpoint and policy changes.
#[derive(Debug)]
pub struct Breaker {
    in_flight: Gauge,
    pending: Gauge,
    connections: Gauge,
}

/// One counted quantity and its cap.
#[derive(Debug)]
struct Gauge {
    now: AtomicUsize,
    max: AtomicUsize,
}

impl Gauge {
    fn new() -> Self {
        Gauge {
            now: AtomicUsize::new(0),
            max: AtomicUsize::new(DEFAULT_BREAKER_LIMIT),
        }
    }
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            in_flight: Gauge::new(),
            pending: Gauge::new(),
            connections: Gauge::new(),
        }
    }
}

/// Which cap a permit holds a place under.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Request,
    Pending,
    Connection,
}

/// Holds a place under one cap until dropped: a request's until its
/// response body ends (or it fails), a pending request's until its
/// connection is open, a connection's until it closes.
#[derive(Debug)]
pub struct Permit(Arc<Breaker>, Kind);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.gauge(self.1).now.fetch_sub(1, Ordering::AcqRel);
    }
}

// === impl Breaker ===

impl Breaker {
    pub fn set_limits(&self, limits: BreakerLimits) {
        let set = |g: &Gauge, v: usize| g.max.store(v, Ordering::Relaxed);
        set(&self.in_flight, limits.max_requests);
        set(&self.pending, limits.max_pending);
        set(&self.connections, limits.max_connections);
    }

    fn gauge(&self, kind: Kind) -> &Gauge {
        match kind {
            Kind::Request => &self.in_flight,
            Kind::Pending => &self.pending,
            Kind::Connection => &self.connections,
        }
    }

    fn try_take(self: &Arc<Self>, kind: Kind) -> Option<Permit> {
        let g = self.gauge(kind);
        let max = g.max.load(Ordering::Relaxed);
        let before = g.now.fetch_add(1, Ordering::AcqRel);
        // Dropped (and so given back) when over the cap.
        let permit = Permit(self.clone(), kind);
        (before < max).then_some(permit)
    }

    /// A place for one request, or None when the upstream is at its limit.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        self.try_take(Kind::Request)
    }

    /// A place for a request waiting for a connection to open.
    pub fn try_pending(self: &Arc<Self>) -> Option<Permit> {
        self.try_take(Kind::Pending)
    }

    /// A place for one more open connection, held as long as it is open.
    pub fn try_connection(self: &Arc<Self>) -> Option<Permit> {
        self.try_take(Kind::Connection)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.now.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_up_to_the_limit_and_back() {
        let b = Arc::new(Breaker::default());
        b.set_limits(BreakerLimits {
            max_requests: 2,
            ..Default::default()
        });
        let p1 = b.try_acquire().unwrap();
        let _p2 = b.try_acquire().unwrap();
        assert!(b.try_acquire().is_none());
        assert_eq!(b.in_flight(), 2, "a refused request holds nothing");
        drop(p1);
        assert!(b.try_acquire().is_some());
    }

    #[test]
    fn each_cap_counts_on_its_own() {
        let b = Arc::new(Breaker::default());
        b.set_limits(BreakerLimits {
            max_requests: 10,
            max_pending: 1,
            max_connections: 2,
        });
        let pending = b.try_pending().unwrap();
        assert!(b.try_pending().is_none(), "one request may wait");
        let c1 = b.try_connection().unwrap();
        let _c2 = b.try_connection().unwrap();
        assert!(b.try_connection().is_none());
        assert!(b.try_acquire().is_some(), "requests have their own cap");
        drop(pending);
        drop(c1);
        assert!(b.try_pending().is_some());
        assert!(b.try_connection().is_some());
    }
}
