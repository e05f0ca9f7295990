//! Whether the store can be written now, as `/ready` and the metrics report
//! it: the embedded store says so itself (failed from an I/O error until it
//! has reopened the file and committed again), the etcd store from its
//! calls (failed once every call has been failing for longer than a bound).

use std::{sync::Mutex, time::Duration};

use tokio::time::Instant;

/// The store's health at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreHealth {
    /// Why the store cannot be written now; `None` while it can.
    pub problem: Option<String>,
    /// How many times the store has become unwritable since it opened.
    pub failures: u64,
}

impl StoreHealth {
    pub fn is_healthy(&self) -> bool {
        self.problem.is_none()
    }
}

/// Health judged from the outcome of calls: failed once calls have failed
/// without a success in between for longer than `unready_after`, so one
/// slow call or an election does not flip readiness.
#[derive(Debug)]
pub struct CallHealth {
    unready_after: Duration,
    state: Mutex<CallState>,
}

#[derive(Debug, Default)]
struct CallState {
    /// The first failure since the last success, and the latest reason.
    failing: Option<(Instant, String)>,
    /// Whether the current run of failures has been counted as a failure.
    counted: bool,
    failures: u64,
}

impl CallHealth {
    pub fn new(unready_after: Duration) -> Self {
        CallHealth {
            unready_after,
            state: Mutex::new(CallState::default()),
        }
    }

    /// A call reached the store (whatever it answered).
    pub fn reached(&self) {
        let mut s = self.state.lock().expect("health lock");
        s.failing = None;
        s.counted = false;
    }

    /// A call could not reach the store.
    pub fn unreachable(&self, reason: String) {
        let mut s = self.state.lock().expect("health lock");
        match &mut s.failing {
            Some((_, latest)) => *latest = reason,
            None => s.failing = Some((Instant::now(), reason)),
        }
        self.judge(&mut s);
    }

    pub fn health(&self) -> StoreHealth {
        let mut s = self.state.lock().expect("health lock");
        StoreHealth {
            problem: self.judge(&mut s),
            failures: s.failures,
        }
    }

    /// The problem, if the failures have lasted past the bound (each run
    /// of failures counted once).
    fn judge(&self, s: &mut CallState) -> Option<String> {
        let (since, reason) = s.failing.as_ref()?;
        let lasted = since.elapsed();
        if lasted < self.unready_after {
            return None;
        }
        let problem = format!("unreachable for {}s: {reason}", lasted.as_secs());
        if !s.counted {
            s.counted = true;
            s.failures += 1;
        }
        Some(problem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn failing_calls_make_it_unhealthy_only_past_the_bound() {
        let h = CallHealth::new(Duration::from_secs(10));
        assert!(h.health().is_healthy());
        h.unreachable("no answer".into());
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(h.health().is_healthy(), "within the bound");
        tokio::time::advance(Duration::from_secs(1)).await;
        h.unreachable("refused".into());
        let health = h.health();
        assert!(health.problem.as_deref().unwrap().contains("refused"));
        assert_eq!(health.failures, 1);
        assert_eq!(h.health().failures, 1, "one run counts once");
        h.reached();
        assert_eq!(
            h.health(),
            StoreHealth {
                problem: None,
                failures: 1
            }
        );
    }
}
