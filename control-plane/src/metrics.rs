//! The control plane's Prometheus metrics, and the xDS stream observer that
//! feeds most of them.
//!
//! Label sets are bounded: type URLs come from the fixed set the cache
//! serves, statuses and operations from enums.

use std::sync::Arc;

use isdp_proto::v1::HealthStatus;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry as PromRegistry,
};

use crate::xds::{StreamObserver, server::StreamEvent, server::StreamInfo};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabel {
    type_url: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: String,
}

/// A cheap handle to every metric; clone it into whatever records.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: PromRegistry,
    streams: Gauge,
    responses: Family<TypeLabel, Counter>,
    response_bytes: Family<TypeLabel, Counter>,
    acks: Family<TypeLabel, Counter>,
    nacks: Family<TypeLabel, Counter>,
    registrations: Family<OpLabel, Counter>,
    health_transitions: Family<StatusLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = PromRegistry::with_prefix("isdp");
        let streams = Gauge::default();
        registry.register(
            "xds_streams",
            "xDS streams currently connected",
            streams.clone(),
        );
        let responses = Family::<TypeLabel, Counter>::default();
        registry.register("xds_responses", "xDS responses sent", responses.clone());
        let response_bytes = Family::<TypeLabel, Counter>::default();
        registry.register_with_unit(
            "xds_response",
            "Encoded size of xDS responses sent",
            prometheus_client::registry::Unit::Bytes,
            response_bytes.clone(),
        );
        let acks = Family::<TypeLabel, Counter>::default();
        registry.register(
            "xds_acks",
            "xDS responses acknowledged by clients",
            acks.clone(),
        );
        let nacks = Family::<TypeLabel, Counter>::default();
        registry.register(
            "xds_nacks",
            "xDS responses rejected (NACKed) by clients",
            nacks.clone(),
        );
        let registrations = Family::<OpLabel, Counter>::default();
        registry.register(
            "registry_operations",
            "Registry writes accepted, by operation",
            registrations.clone(),
        );
        let health_transitions = Family::<StatusLabel, Counter>::default();
        registry.register(
            "health_transitions",
            "Health transitions observed by control-plane checks, by new status",
            health_transitions.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry,
                streams,
                responses,
                response_bytes,
                acks,
                nacks,
                registrations,
                health_transitions,
            }),
        }
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.inner.registry)
            .expect("writing to a String cannot fail");
        out
    }

    pub fn registry_op(&self, op: &str) {
        self.inner
            .registrations
            .get_or_create(&OpLabel { op: op.to_owned() })
            .inc();
    }

    pub fn health_transition(&self, status: HealthStatus) {
        let status = match status {
            HealthStatus::Healthy => "healthy",
            HealthStatus::Unhealthy => "unhealthy",
            HealthStatus::Unknown => "unknown",
        };
        self.inner
            .health_transitions
            .get_or_create(&StatusLabel {
                status: status.to_owned(),
            })
            .inc();
    }
}

fn label(type_url: &str) -> TypeLabel {
    TypeLabel {
        type_url: type_url.to_owned(),
    }
}

impl StreamObserver for Metrics {
    fn opened(&self, s: &StreamInfo) {
        self.inner.streams.inc();
        tracing::info!(node = %s.node_id, stream = s.id, delta = s.delta, peer = ?s.peer, "xds stream opened");
    }

    fn event(&self, s: &StreamInfo, e: &StreamEvent) {
        match e {
            StreamEvent::Response {
                type_url,
                bytes,
                resources,
                nonce,
            } => {
                self.inner.responses.get_or_create(&label(type_url)).inc();
                self.inner
                    .response_bytes
                    .get_or_create(&label(type_url))
                    .inc_by(bytes.len() as u64);
                tracing::debug!(node = %s.node_id, %type_url, nonce, resources, bytes = bytes.len(), "xds push");
            }
            StreamEvent::Ack { type_url, .. } => {
                self.inner.acks.get_or_create(&label(type_url)).inc();
            }
            StreamEvent::Nack {
                type_url,
                nonce,
                message,
            } => {
                self.inner.nacks.get_or_create(&label(type_url)).inc();
                tracing::warn!(node = %s.node_id, %type_url, nonce, error = %message, "xds response rejected (NACK)");
            }
        }
    }

    fn closed(&self, s: &StreamInfo) {
        self.inner.streams.dec();
        tracing::info!(node = %s.node_id, stream = s.id, "xds stream closed");
    }
}
