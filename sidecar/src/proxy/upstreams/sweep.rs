//! The latency-outlier sweep: every upstream whose policy turns it on is
//! swept every `outlier_detection.interval` by the upstreams' task
//! (`balance::outlier::latency` holds the rule).

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use super::{UpstreamLb, Upstreams};
use crate::balance::{EndpointLoad, Outlier, outlier::latency};

/// How often the task looks for upstreams due a sweep; the shortest
/// interval a policy may set (10 ms) is rounded up to it.
pub(super) const TICK: Duration = Duration::from_millis(100);

// === impl Upstreams ===

impl Upstreams {
    /// Sweeps each upstream due a sweep; `last` remembers when each was
    /// swept (the task's own state).
    pub(super) fn sweep_latency(&self, last: &mut HashMap<String, Instant>) {
        let now = Instant::now();
        for name in self.shared.configs.keys() {
            let Some(lb) = self.get(name) else { continue };
            let cfg = &lb.policy.outlier;
            if cfg.latency_factor <= 0.0 {
                last.remove(name);
                continue;
            }
            let due = last
                .get(name)
                .is_none_or(|t| now.saturating_duration_since(*t) >= cfg.interval);
            if due {
                last.insert(name.clone(), now);
                sweep(&lb, now);
            }
        }
    }
}

impl Upstreams {
    /// Folds outlier ejections into every upstream's locality shares.
    pub(super) fn refresh_localities(&self) {
        for name in self.shared.configs.keys() {
            if let Some(lb) = self.get(name) {
                lb.refresh_locality();
            }
        }
    }
}

fn sweep(lb: &UpstreamLb, now: Instant) {
    let endpoints: Vec<(&EndpointLoad, &Outlier)> = lb
        .endpoints
        .iter()
        .map(|e| (&*e.load, &*e.outlier))
        .collect();
    for (i, length) in latency::sweep(&endpoints, &lb.policy.outlier, now) {
        lb.metrics.ejection();
        let latency = lb.endpoints[i].load.recent_latency();
        tracing::info!(upstream = %lb.name, endpoint = %lb.endpoints[i].id, ?length, ?latency, "endpoint ejected as a latency outlier");
    }
}
