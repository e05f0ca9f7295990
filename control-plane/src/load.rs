//! Load reports from sidecars (`LoadReport` on the session), checked,
//! kept in memory, and turned into endpoint weights pushed with the
//! endpoints.
//!
//! Reports are soft state per replica: each replica keeps the reports of
//! the sessions connected to it. A report older than [`REPORT_TTL`] counts
//! as absent, and is pruned on writes.
//!
//! A session reports only its own instances (ids it registered), with
//! finite values within bounds ([`check`]); anything else is refused
//! whole, naming the field and the limit, and ends the session as a bad
//! health report does. A session's reports closer together than
//! [`MIN_REPORT_GAP`] are dropped (not refused), so a sidecar cannot make
//! the control plane work harder by reporting faster.
//!
//! Weights: a report reaches only the replica holding its session, but
//! every replica must push the same weights. So the session's replica
//! writes a smoothed summary per instance to the store, on the session's
//! lease, only when a figure moved enough and at most every few seconds
//! (`writer`, `sink`); every replica follows the summaries (`view`) and
//! computes the weights from them (`weights`), the same everywhere.
//!
//! # Layout
//! - `writer`: one session's figures, smoothed; what is due to be written.
//! - `sink`: the bounded queue and the task that writes summaries.
//! - `view`: the followed summaries, on every replica.
//! - `weights`: summaries -> load factors -> pushed weights (gRFC A58).
//! - `follow`: which instances' weights may have changed, for publishers.

pub mod follow;
pub mod sink;
pub mod view;
pub mod weights;
pub mod writer;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use isdp_proto::v1::{Instance, InstanceLoad, LoadReport};
use tokio::time::Instant;

pub use self::follow::LoadFollow;
pub use self::view::LoadView;
pub use self::weights::{Weighed, WeightConfig};

/// A report older than this counts as absent.
pub const REPORT_TTL: Duration = Duration::from_secs(10);
/// Reports from one session closer together than this are dropped.
pub const MIN_REPORT_GAP: Duration = Duration::from_millis(500);
/// Bounds of a report's values, which sidecars keep to.
pub use isdp_core::load::{
    MAX_HOST_UTILIZATION, MAX_IN_FLIGHT, MAX_LATENCY_MS, MAX_METRIC_NAME, MAX_NAMED_METRICS,
    MAX_RPS, MAX_UTILIZATION,
};

/// Why a report was refused: the field and the rule.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("load report: {field}: {rule}")]
pub struct ReportError {
    pub field: String,
    pub rule: String,
}

/// One instance's latest report.
#[derive(Clone, Debug)]
pub struct Stored {
    pub load: InstanceLoad,
    /// The host figures of the report it came in.
    pub host_cpu: Option<f64>,
    pub host_mem: Option<f64>,
    pub received: Instant,
}

/// The reports this replica holds; a cheap handle.
#[derive(Clone, Default)]
pub struct LoadReports {
    inner: Arc<Mutex<HashMap<String, Stored>>>,
}

// === impl LoadReports ===

impl LoadReports {
    /// Checks `report` against the session's `own` instance ids and keeps
    /// it. The caller rate-limits (see [`Gate`]).
    pub fn accept(&self, own: &[String], report: LoadReport) -> Result<usize, ReportError> {
        check(own, &report)?;
        let now = Instant::now();
        let n = report.instances.len();
        let mut map = self.inner.lock().expect("load reports lock");
        map.retain(|_, s| now.saturating_duration_since(s.received) <= REPORT_TTL);
        for load in report.instances {
            let stored = Stored {
                host_cpu: report.cpu_utilization,
                host_mem: report.mem_utilization,
                received: now,
                load,
            };
            map.insert(stored.load.instance_id.clone(), stored);
        }
        Ok(n)
    }

    /// Instance `id`'s report, unless older than [`REPORT_TTL`].
    pub fn get(&self, id: &str) -> Option<Stored> {
        let map = self.inner.lock().expect("load reports lock");
        let s = map.get(id)?;
        (s.received.elapsed() <= REPORT_TTL).then(|| s.clone())
    }

    /// Reports not yet expired.
    pub fn fresh(&self) -> usize {
        let map = self.inner.lock().expect("load reports lock");
        map.values()
            .filter(|s| s.received.elapsed() <= REPORT_TTL)
            .count()
    }
}

/// What weighs endpoints: the knobs, and the summaries every replica
/// follows (none: every endpoint gets its operator's weight). A cheap
/// handle.
#[derive(Clone)]
pub struct LoadWeights {
    cfg: WeightConfig,
    view: Option<LoadView>,
}

// === impl LoadWeights ===

impl LoadWeights {
    /// Operator weights only, as pushed without load weights.
    pub fn operator_only() -> Self {
        LoadWeights {
            cfg: WeightConfig {
                enabled: false,
                ..WeightConfig::default()
            },
            view: None,
        }
    }

    /// Weights from the summaries in `view`, per `cfg`.
    pub fn new(cfg: WeightConfig, view: LoadView) -> Self {
        LoadWeights {
            view: cfg.enabled.then_some(view),
            cfg,
        }
    }

    pub fn config(&self) -> &WeightConfig {
        &self.cfg
    }

    pub fn view(&self) -> Option<&LoadView> {
        self.view.as_ref()
    }

    /// The weights of one service's `instances`, in order, now.
    pub fn weigh(&self, instances: &[&Instance]) -> Vec<Weighed> {
        let snapshot = self.view.as_ref().map(LoadView::snapshot);
        let summaries: Vec<_> = instances
            .iter()
            .map(|i| snapshot.as_ref().and_then(|s| s.get(&i.id)))
            .collect();
        let endpoints: Vec<_> = instances
            .iter()
            .zip(&summaries)
            .map(|(i, s)| {
                let status = i.status();
                let figures = if status == isdp_proto::v1::HealthStatus::Unhealthy {
                    Err(weights::UNHEALTHY)
                } else {
                    s.as_ref().ok_or(weights::NO_REPORT)
                };
                weights::Endpoint {
                    operator: i.weight,
                    figures,
                    checked: status == isdp_proto::v1::HealthStatus::Healthy,
                }
            })
            .collect();
        weights::weigh(&self.cfg, &endpoints, unix_ms())
    }
}

/// Told the weights of a service as they are published: (instance id,
/// utilisation, weight) each, none when the service is gone. The metrics
/// implement it, so the publisher needs not know them.
pub trait WeightObserver: Send + Sync {
    fn weighed(&self, service: &str, weights: &[(String, f64, u32)]);
}

/// The wall clock in Unix ms, which summaries' blackouts are measured on
/// (replicas share it, not a monotonic clock).
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// One session's rate limit: whether a report arriving now is taken.
#[derive(Debug, Default)]
pub struct Gate {
    last: Option<Instant>,
}

impl Gate {
    pub fn admit(&mut self, now: Instant) -> bool {
        let ok = self
            .last
            .is_none_or(|t| now.saturating_duration_since(t) >= MIN_REPORT_GAP);
        if ok {
            self.last = Some(now);
        }
        ok
    }
}

/// Every rule a report must meet; the first broken one is the error.
pub fn check(own: &[String], report: &LoadReport) -> Result<(), ReportError> {
    let err = |field: String, rule: String| Err(ReportError { field, rule });
    if report.instances.len() > own.len() {
        return err(
            "instances".into(),
            format!(
                "at most the session's {} instances, got {}",
                own.len(),
                report.instances.len()
            ),
        );
    }
    for (name, v) in [
        ("cpu_utilization", report.cpu_utilization),
        ("mem_utilization", report.mem_utilization),
    ] {
        if let Some(v) = v {
            bounded(name.into(), v, MAX_HOST_UTILIZATION)?;
        }
    }
    for (i, l) in report.instances.iter().enumerate() {
        let at = |f: &str| format!("instances[{i}].{f}");
        if !own.contains(&l.instance_id) {
            return err(
                at("instance_id"),
                format!(
                    "must be an instance of this session, got {:?}",
                    l.instance_id.chars().take(200).collect::<String>()
                ),
            );
        }
        bounded(at("rps"), l.rps, MAX_RPS)?;
        bounded(at("eps"), l.eps, MAX_RPS)?;
        bounded(at("latency_ms"), l.latency_ms, MAX_LATENCY_MS)?;
        if l.in_flight > MAX_IN_FLIGHT {
            return err(
                at("in_flight"),
                format!("must be 0..{MAX_IN_FLIGHT}, got {}", l.in_flight),
            );
        }
        for (name, v) in [
            ("application_utilization", l.application_utilization),
            ("cpu_utilization", l.cpu_utilization),
        ] {
            if let Some(v) = v {
                bounded(at(name), v, MAX_UTILIZATION)?;
            }
        }
        if l.named_metrics.len() > MAX_NAMED_METRICS {
            return err(
                at("named_metrics"),
                format!("at most {MAX_NAMED_METRICS}, got {}", l.named_metrics.len()),
            );
        }
        for (name, v) in &l.named_metrics {
            if name.is_empty() || name.len() > MAX_METRIC_NAME {
                return err(
                    at("named_metrics"),
                    format!("names must be 1..{MAX_METRIC_NAME} bytes"),
                );
            }
            bounded(at("named_metrics"), *v, f64::MAX)?;
        }
    }
    Ok(())
}

fn bounded(field: String, v: f64, max: f64) -> Result<(), ReportError> {
    if v.is_finite() && (0.0..=max).contains(&v) {
        return Ok(());
    }
    Err(ReportError {
        field,
        rule: format!(
            "must be a finite number 0..{}, got {}",
            short(max),
            short(v)
        ),
    })
}

/// A number as people read it in an error: plain up to 10^7, in
/// scientific form beyond (`f64::MAX` is 309 digits written out).
fn short(v: f64) -> String {
    if v.is_finite() && v.abs() > 1e7 {
        format!("{v:e}")
    } else {
        format!("{v}")
    }
}

/// Writes a summary per `(instance id, utilisation)`, each at 100
/// requests per second, as a session's replica would: through a
/// [`writer::Writer`] and the [`sink`] onto a lease, the figures usable
/// long before the blackout's end. For publishers' tests.
#[cfg(test)]
pub async fn write_summaries(
    store: &Arc<dyn crate::store::Store>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    figures: &[(&str, f64)],
) {
    let (sink, _task) = sink::Sink::spawn(store.clone(), "/isdp/", shutdown);
    let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    let mut writer = writer::Writer::default();
    for (id, utilization) in figures {
        let load = InstanceLoad {
            instance_id: (*id).into(),
            rps: 100.0,
            application_utilization: Some(*utilization),
            ..Default::default()
        };
        let summary = writer.offer(&load, Instant::now(), 1).unwrap();
        assert!(sink.send(writer::Write::Put(summary), Some(lease)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own() -> Vec<String> {
        vec!["n1.web".into(), "n1.api".into()]
    }

    fn report(id: &str, rps: f64) -> LoadReport {
        LoadReport {
            instances: vec![InstanceLoad {
                instance_id: id.into(),
                rps,
                latency_ms: 12.0,
                application_utilization: Some(0.4),
                ..Default::default()
            }],
            cpu_utilization: Some(0.5),
            mem_utilization: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn reports_are_kept_until_they_expire() {
        let reports = LoadReports::default();
        assert_eq!(reports.accept(&own(), report("n1.web", 100.0)), Ok(1));
        let s = reports.get("n1.web").unwrap();
        assert_eq!((s.load.rps, s.host_cpu), (100.0, Some(0.5)));
        assert_eq!(reports.fresh(), 1);
        tokio::time::advance(REPORT_TTL + Duration::from_millis(1)).await;
        assert!(reports.get("n1.web").is_none(), "expired");
        assert_eq!(reports.fresh(), 0);
        // A write prunes what expired.
        reports.accept(&own(), report("n1.api", 1.0)).unwrap();
        assert_eq!(reports.inner.lock().unwrap().len(), 1);
    }

    #[test]
    fn only_own_instances_and_bounded_values() {
        let reports = LoadReports::default();
        let e = reports.accept(&own(), report("n2.web", 1.0)).unwrap_err();
        assert_eq!(e.field, "instances[0].instance_id");
        assert!(e.rule.contains("n2.web"), "{e}");
        for (rps, field) in [(-1.0, "rps"), (f64::NAN, "rps"), (1e12, "rps")] {
            let e = check(&own(), &report("n1.web", rps)).unwrap_err();
            assert_eq!(e.field, format!("instances[0].{field}"));
            assert!(e.rule.contains("0..10000000"), "{e}");
        }
        let e = check(&own(), &report("n1.web", 1e300)).unwrap_err();
        assert_eq!(e.rule, "must be a finite number 0..10000000, got 1e300");
        let mut r = report("n1.web", 1.0);
        r.cpu_utilization = Some(1.5);
        assert_eq!(check(&own(), &r).unwrap_err().field, "cpu_utilization");
        let mut r = report("n1.web", 1.0);
        r.instances[0].named_metrics = (0..17).map(|i| (format!("m{i}"), 1.0)).collect();
        assert_eq!(
            check(&own(), &r).unwrap_err().field,
            "instances[0].named_metrics"
        );
        let mut r = report("n1.web", 1.0);
        r.instances = vec![r.instances[0].clone(); 3];
        assert_eq!(check(&own(), &r).unwrap_err().field, "instances");
        assert!(reports.get("n1.web").is_none(), "nothing refused is kept");
    }

    #[test]
    fn a_session_reports_at_most_every_gap() {
        let mut gate = Gate::default();
        let t = Instant::now();
        assert!(gate.admit(t));
        assert!(!gate.admit(t + MIN_REPORT_GAP / 2));
        assert!(gate.admit(t + MIN_REPORT_GAP));
    }
}
