//! Scrape-time metrics: read from the discovery snapshot, the balancing
//! state, the session and the workload certificates when Prometheus asks,
//! so keeping them costs nothing between scrapes. It reads nearly every
//! module, so it sits here at the top with the admin pages that read the
//! same state, and `metrics` (which everything records into) imports
//! none of them.

use std::{fmt, sync::Arc};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, TypedMetric, counter::ConstCounter, gauge::ConstGauge},
};
use tokio::sync::watch;

use isdp_core::probe::Health;

use crate::{identity::Identities, proxy::upstreams::Upstreams, session::Session, xds::Snapshot};

/// Reads the sidecar's state at scrape time.
pub struct StateCollector {
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    pub session: Session,
    pub upstreams: Option<Upstreams>,
    /// Workload certificates, for their expiry.
    pub identities: Option<watch::Receiver<Arc<Identities>>>,
}

impl fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateCollector").finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HealthLabels {
    service: String,
    health: &'static str,
}

const HEALTHS: [Health; 3] = [Health::Healthy, Health::Unhealthy, Health::Unknown];

fn one<M: EncodeMetric + TypedMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: M,
) -> fmt::Result {
    let e = encoder.encode_descriptor(name, help, None, M::TYPE)?;
    metric.encode(e)
}

fn gauge(v: impl TryInto<i64>) -> ConstGauge {
    ConstGauge::new(v.try_into().unwrap_or(i64::MAX))
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let snap = self.snapshots.borrow().clone();
        let e = &mut encoder;

        one(
            e,
            "trace_spans_dropped",
            "Spans dropped because the export queue was full or the collector failed",
            ConstCounter::new(isdp_core::telemetry::dropped_spans()),
        )?;

        // Discovery.
        let configured = self.upstreams.as_ref().map_or(0, |u| u.names().count());
        one(
            e,
            "upstreams_configured",
            "Upstreams in the configuration (a discovery stream is expected when above 0)",
            gauge(configured),
        )?;
        one(
            e,
            "xds_connected",
            "1 while the discovery stream to the control plane is open",
            gauge(snap.connected as i64),
        )?;
        one(
            e,
            "xds_acks",
            "Discovery responses accepted (ACKed)",
            ConstCounter::new(snap.acks),
        )?;
        one(
            e,
            "xds_nacks",
            "Discovery responses rejected (NACKed)",
            ConstCounter::new(snap.nacks),
        )?;
        one(
            e,
            "xds_reconnects",
            "Times the discovery stream broke or a connection attempt failed",
            ConstCounter::new(snap.reconnects),
        )?;
        one(
            e,
            "xds_resources_acked",
            "Resources held at their acknowledged version",
            gauge(snap.acked.len()),
        )?;

        // Endpoints per upstream, as the snapshot has them and as balanced.
        {
            let mut fam = e.encode_descriptor(
                "upstream_endpoints",
                "Endpoints of each upstream, by health",
                None,
                MetricType::Gauge,
            )?;
            for (name, u) in &snap.upstreams {
                for h in HEALTHS {
                    let n = u.endpoints.iter().filter(|ep| ep.health == h).count();
                    let labels = HealthLabels {
                        service: name.clone(),
                        health: h.as_str(),
                    };
                    gauge(n).encode(fam.encode_family(&labels)?)?;
                }
            }
        }
        if let Some(ups) = &self.upstreams {
            let mut fam = e.encode_descriptor(
                "upstream_panic",
                "1 while too few endpoints are healthy and traffic spreads over all of them",
                None,
                MetricType::Gauge,
            )?;
            for name in ups.names() {
                let panic = ups.get(name).is_some_and(|lb| lb.panic);
                gauge(panic as i64).encode(fam.encode_family(&ServiceLabel {
                    service: name.to_owned(),
                })?)?;
            }
            let mut fam = e.encode_descriptor(
                "outlier_ejected_endpoints",
                "Endpoints of each upstream ejected by outlier detection right now",
                None,
                MetricType::Gauge,
            )?;
            for name in ups.names() {
                let n = ups.get(name).map_or(0, |lb| lb.ejected_now());
                gauge(n).encode(fam.encode_family(&ServiceLabel {
                    service: name.to_owned(),
                })?)?;
            }
        }

        // The session and the local services it registers.
        let status = self.session.status();
        one(
            e,
            "local_services",
            "Local services in the configuration (a session is expected when above 0)",
            gauge(self.session.services().len()),
        )?;
        one(
            e,
            "session_connected",
            "1 while the registration session with the control plane is open",
            gauge(status.connected as i64),
        )?;
        one(
            e,
            "session_reconnects",
            "Times the registration session broke or a connection attempt failed",
            ConstCounter::new(status.reconnects),
        )?;
        {
            let mut fam = e.encode_descriptor(
                "local_service_health",
                "1 for the current health of each local service",
                None,
                MetricType::Gauge,
            )?;
            let health = self.session.health();
            for (svc, current) in self.session.services().iter().zip(health) {
                for h in HEALTHS {
                    let labels = HealthLabels {
                        service: svc.name.clone(),
                        health: h.as_str(),
                    };
                    gauge((current == h) as i64).encode(fam.encode_family(&labels)?)?;
                }
            }
        }
        if let Some(ids) = &self.identities {
            let ids = ids.borrow().clone();
            let mut fam = e.encode_descriptor(
                "workload_certificate_expiry_timestamp",
                "When each local service's certificate expires, in seconds since the Unix epoch (absent: none held)",
                None,
                MetricType::Gauge,
            )?;
            for (service, id) in &ids.by_service {
                let at = id
                    .not_after
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                gauge(at).encode(fam.encode_family(&ServiceLabel {
                    service: service.clone(),
                })?)?;
            }
        }
        Ok(())
    }
}
