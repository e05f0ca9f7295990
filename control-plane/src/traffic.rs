//! Traffic between services, for the dashboard's topology graph: the last
//! two `TrafficReport`s of each calling service's sidecar sessions, from
//! which each edge's request rate, error rate and p99 latency over the
//! interval between them is computed.
//!
//! Soft state, in memory, per replica: a replica shows the edges of the
//! sessions connected to it, and a restart starts empty (sidecars report
//! again within seconds). Reports are validated where they arrive
//! (`api::session`): the caller is the session's own service, and a
//! report is bounded in upstreams and buckets ([`check`]). A caller that
//! stops reporting drops out after [`STALE`].

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use isdp_proto::v1::{TrafficReport, UpstreamTraffic};

/// Upstreams one report may name.
pub const MAX_UPSTREAMS: usize = 256;
/// Latency buckets per upstream.
pub const MAX_BUCKETS: usize = 32;
/// Sessions whose reports are kept; more are not recorded.
pub const MAX_REPORTERS: usize = 10_000;
/// Distinct latency bounds one edge adds up (sessions of one service
/// share theirs; more are left out of its p99).
pub const MAX_EDGE_BUCKETS: usize = 64;
/// A reporter silent this long (ms) no longer counts.
pub const STALE: i64 = 30_000;

/// Why a report is refused (the session ends with INVALID_ARGUMENT).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("traffic report: {count} upstreams, at most {MAX_UPSTREAMS}")]
    Upstreams { count: usize },
    #[error("traffic report: upstream {upstream:?}: {field}: {reason}")]
    Upstream {
        upstream: String,
        field: &'static str,
        reason: String,
    },
}

/// Checks a report's bounds and shape.
pub fn check(report: &TrafficReport) -> Result<(), ReportError> {
    if report.upstreams.len() > MAX_UPSTREAMS {
        return Err(ReportError::Upstreams {
            count: report.upstreams.len(),
        });
    }
    let mut seen = HashSet::new();
    for u in &report.upstreams {
        let bad = |field, reason: String| ReportError::Upstream {
            upstream: u.upstream.chars().take(64).collect(),
            field,
            reason,
        };
        isdp_core::names::check_dns_label(&u.upstream)
            .map_err(|e| bad("upstream", e.to_string()))?;
        if u.bounds_ms.len() > MAX_BUCKETS || u.bounds_ms.len() != u.counts.len() {
            return Err(bad(
                "bounds_ms",
                format!(
                    "{} bounds and {} counts; equal and at most {MAX_BUCKETS}",
                    u.bounds_ms.len(),
                    u.counts.len()
                ),
            ));
        }
        if u.errors > u.requests {
            return Err(bad("errors", "more than requests".into()));
        }
        if !seen.insert(u.upstream.as_str()) {
            return Err(bad("upstream", "named twice in one report".into()));
        }
        // Bounds rise strictly (the last may be 0: +Inf); counts are
        // cumulative, so they never fall, and none exceeds the requests.
        let finite = u.bounds_ms.len() - usize::from(u.bounds_ms.last() == Some(&0.0));
        let rising = u.bounds_ms[..finite]
            .iter()
            .all(|b| b.is_finite() && *b > 0.0)
            && u.bounds_ms[..finite].windows(2).all(|w| w[0] < w[1]);
        if !rising {
            return Err(bad(
                "bounds_ms",
                "finite, positive and rising (a last 0 is +Inf)".into(),
            ));
        }
        if u.counts.windows(2).any(|w| w[0] > w[1]) || u.counts.iter().any(|c| *c > u.requests) {
            return Err(bad(
                "counts",
                "cumulative: never falling, none above requests".into(),
            ));
        }
    }
    Ok(())
}

/// One edge as the graph shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct Edge {
    pub caller: String,
    pub callee: String,
    /// Requests per second over the last interval.
    pub rps: f64,
    /// Errors / requests over the last interval (0 without requests).
    pub error_rate: f64,
    /// The bucket bound at or above the 99th percentile of the interval's
    /// requests, in ms; `None` without requests or histogram.
    pub p99_ms: Option<f64>,
}

/// One session's place in [`Traffic`]: its reports are recorded under a
/// key of its own, forgotten when the session's task ends.
pub struct Reporter {
    traffic: Traffic,
    key: u64,
}

impl Reporter {
    pub fn new(traffic: Traffic) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Reporter {
            traffic,
            key: NEXT.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Checks and keeps `report`, made by the sidecar of service `caller`
    /// (a session without instances has no service and is not recorded).
    pub fn report(&self, caller: Option<&str>, report: TrafficReport) -> Result<(), ReportError> {
        check(&report)?;
        if let Some(caller) = caller {
            self.traffic
                .record(self.key, caller, report, crate::ca::unix_ms());
        }
        Ok(())
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.traffic.forget(self.key);
    }
}

/// A reporter's last two reports.
struct Reports {
    caller: String,
    previous: Option<(i64, TrafficReport)>,
    last: (i64, TrafficReport),
}

#[derive(Clone, Default)]
pub struct Traffic {
    by_session: Arc<Mutex<HashMap<u64, Reports>>>,
}

// === impl Traffic ===

impl Traffic {
    /// Keeps `report` (already [`check`]ed) of session `session`, whose
    /// service is `caller`, received at `now_unix_ms`.
    pub fn record(&self, session: u64, caller: &str, report: TrafficReport, now_unix_ms: i64) {
        let mut map = self.lock();
        if !map.contains_key(&session) && map.len() >= MAX_REPORTERS {
            map.retain(|_, r| now_unix_ms - r.last.0 < STALE);
            if map.len() >= MAX_REPORTERS {
                return;
            }
        }
        match map.get_mut(&session) {
            Some(r) if r.caller == caller => {
                let last = std::mem::replace(&mut r.last, (now_unix_ms, report));
                r.previous = Some(last);
            }
            _ => {
                map.insert(
                    session,
                    Reports {
                        caller: caller.to_owned(),
                        previous: None,
                        last: (now_unix_ms, report),
                    },
                );
            }
        }
    }

    /// The reports; a panic elsewhere while holding them leaves nothing
    /// half-written (each change is one insert or replace), so a poisoned
    /// lock is used as it is rather than failing every later session.
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Reports>> {
        self.by_session
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets a session (it ended).
    pub fn forget(&self, session: u64) {
        self.lock().remove(&session);
    }

    /// Every caller -> callee edge with traffic in the reporters' last
    /// intervals, sorted; several sessions of one service add up.
    pub fn edges(&self, now_unix_ms: i64) -> Vec<Edge> {
        #[derive(Default)]
        struct Sum {
            requests: u64,
            errors: u64,
            seconds: f64,
            /// By bound (`bound_key`'s bits: positive floats order as
            /// their bits do), so adding a session's buckets is a lookup.
            buckets: BTreeMap<u64, u64>,
        }
        let mut sums: HashMap<(String, String), Sum> = HashMap::new();
        {
            let map = self.lock();
            for r in map.values() {
                let Some((t0, before)) = &r.previous else {
                    continue;
                };
                let (t1, after) = &r.last;
                if now_unix_ms - t1 >= STALE || t1 <= t0 {
                    continue;
                }
                let seconds = (t1 - t0) as f64 / 1000.0;
                let before: HashMap<&str, &UpstreamTraffic> = before
                    .upstreams
                    .iter()
                    .map(|o| (o.upstream.as_str(), o))
                    .collect();
                for u in &after.upstreams {
                    let d = delta(before.get(u.upstream.as_str()).copied(), u);
                    let sum = sums
                        .entry((r.caller.clone(), u.upstream.clone()))
                        .or_default();
                    sum.requests = sum.requests.saturating_add(d.requests);
                    sum.errors = sum.errors.saturating_add(d.errors);
                    // Sessions of one service report over about the same
                    // interval: rates add, so keep the longest.
                    sum.seconds = sum.seconds.max(seconds);
                    for (bound, count) in d.bounds_ms.iter().zip(&d.counts) {
                        // Sidecars of one version share their bounds; a
                        // caller's edge keeps at most MAX_EDGE_BUCKETS.
                        let key = bound_key(*bound).to_bits();
                        if let Some(c) = sum.buckets.get_mut(&key) {
                            *c = c.saturating_add(*count);
                        } else if sum.buckets.len() < MAX_EDGE_BUCKETS {
                            sum.buckets.insert(key, *count);
                        }
                    }
                }
            }
        }
        let mut edges: Vec<Edge> = sums
            .into_iter()
            .map(|((caller, callee), s)| {
                let buckets: Vec<(f64, u64)> = s
                    .buckets
                    .into_iter()
                    .map(|(bits, c)| {
                        let b = f64::from_bits(bits);
                        (if b.is_infinite() { 0.0 } else { b }, c)
                    })
                    .collect();
                Edge {
                    caller,
                    callee,
                    rps: s.requests as f64 / s.seconds.max(0.001),
                    error_rate: if s.requests == 0 {
                        0.0
                    } else {
                        s.errors as f64 / s.requests as f64
                    },
                    p99_ms: quantile(&buckets, 0.99),
                }
            })
            .collect();
        edges.sort_by(|a, b| (&a.caller, &a.callee).cmp(&(&b.caller, &b.callee)));
        edges
    }
}

/// 0 stands for +Inf.
fn bound_key(bound: f64) -> f64 {
    if bound == 0.0 { f64::INFINITY } else { bound }
}

/// What an upstream's counters grew by between two reports; a counter
/// that went down (the sidecar restarted) counts from zero.
fn delta(old: Option<&UpstreamTraffic>, new: &UpstreamTraffic) -> UpstreamTraffic {
    let restarted = old.is_none_or(|o| o.requests > new.requests || o.errors > new.errors);
    let old = if restarted { None } else { old };
    let sub = |n: u64, o: Option<u64>| n.saturating_sub(o.unwrap_or(0));
    UpstreamTraffic {
        upstream: new.upstream.clone(),
        requests: sub(new.requests, old.map(|o| o.requests)),
        errors: sub(new.errors, old.map(|o| o.errors)),
        bounds_ms: new.bounds_ms.clone(),
        // Bounds that changed between reports (a sidecar upgraded) count
        // the new histogram from zero.
        counts: match old {
            Some(o) if o.bounds_ms == new.bounds_ms => new
                .counts
                .iter()
                .zip(&o.counts)
                .map(|(n, o)| n.saturating_sub(*o))
                .collect(),
            _ => new.counts.clone(),
        },
    }
}

/// The smallest bound whose cumulative count reaches `q` of the total (the
/// last bucket's count); `None` when empty. +Inf answers the largest
/// finite bound, as Prometheus's histogram_quantile does.
pub fn quantile(cumulative: &[(f64, u64)], q: f64) -> Option<f64> {
    let total = cumulative.last()?.1;
    if total == 0 {
        return None;
    }
    let want = (q * total as f64).ceil() as u64;
    let finite_max = cumulative
        .iter()
        .map(|(b, _)| *b)
        .filter(|b| *b != 0.0)
        .fold(None, |m: Option<f64>, b| Some(m.map_or(b, |m| m.max(b))));
    cumulative
        .iter()
        .find(|(_, c)| *c >= want)
        .and_then(|(b, _)| if *b == 0.0 { finite_max } else { Some(*b) })
}

#[cfg(test)]
mod tests;
