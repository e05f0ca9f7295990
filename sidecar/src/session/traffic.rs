//! Traffic reports on the session: every [`INTERVAL`], the outbound
//! totals per upstream (`metrics::OutboundTraffic`), for the control
//! plane's topology graph. Totals rather than deltas, so a lost report
//! loses nothing and the control plane computes rates from any two. The
//! control plane records them as this session's own service; nothing in
//! the report names the caller.

use std::time::Duration;

use isdp_proto::v1::{TrafficReport, UpstreamTraffic};
use tokio::time::{Interval, MissedTickBehavior};

use super::Session;
use crate::metrics::Metrics;

/// How often a report is sent.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// Upstreams one report carries, the control plane's bound.
pub const MAX_UPSTREAMS: usize = 256;

// === impl Session ===

impl Session {
    /// Reports `metrics`' outbound totals from now on.
    pub fn report_traffic(&self, metrics: Metrics) {
        let _ = self.shared.traffic.set(metrics);
    }
}

/// The first tick one interval after the session opened.
pub(super) fn ticker() -> Interval {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + INTERVAL, INTERVAL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tick
}

/// The report to send now; `None` before the data plane has started or
/// when nothing was ever sent upstream.
pub(super) fn report(session: &Session) -> Option<TrafficReport> {
    let metrics = session.shared.traffic.get()?;
    let upstreams: Vec<UpstreamTraffic> = metrics
        .outbound_traffic()
        .into_iter()
        .filter(|t| t.requests > 0)
        .take(MAX_UPSTREAMS)
        .map(|t| UpstreamTraffic {
            upstream: t.upstream,
            requests: t.requests,
            errors: t.errors,
            bounds_ms: t.bounds_ms,
            counts: t.counts,
        })
        .collect();
    (!upstreams.is_empty()).then_some(TrafficReport { upstreams })
}
