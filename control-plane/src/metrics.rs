//! The control plane's Prometheus metrics, and the xDS stream observer that
//! feeds most of them.
//!
//! - `grpc`: the layer counting and timing every gRPC call.
//! - `store`: the store decorator timing every store operation.
//!
//! Label sets are bounded: type URLs come from the fixed set the cache
//! serves, statuses, codes and operations from enums, methods from the
//! services served.
//!
//! Convergence is measured from the moment the endpoints publisher first sees
//! a registry change to the moment each sidecar ACKs a response carrying
//! it: debounce, push, the sidecar applying it, and the ACK's way back.

mod grpc;
mod store;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

pub use grpc::GrpcMetricsLayer;
pub use store::InstrumentedStore;

use isdp_core::metrics::{LATENCY_BUCKETS, grpc_code_name};
use isdp_proto::v1::HealthStatus;
use isdp_xds::{StreamEvent, StreamInfo, StreamObserver};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry as PromRegistry, Unit},
};

use crate::store::StoreError;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabel {
    type_url: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceLabels {
    service: String,
    instance: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodCodeLabels {
    method: String,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreOpLabel {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreErrorLabels {
    op: &'static str,
    error: &'static str,
}

/// Seconds, 0.5 ms to 10 s: from a store commit to a sidecar that
/// reconnects. The sidecar's buckets, so latencies compare across both.
fn histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS.iter().copied())
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
    load_reports: Family<StatusLabel, Counter>,
    load_summaries: Family<StatusLabel, Counter>,
    instance_utilization: Family<InstanceLabels, Gauge<f64, AtomicU64>>,
    instance_weight: Family<InstanceLabels, Gauge>,
    /// service -> instances with series now, so gone ones are dropped.
    weighed: Mutex<HashMap<String, BTreeSet<String>>>,
    convergence: Histogram,
    grpc_handled: Family<MethodCodeLabels, Counter>,
    grpc_handling: Family<MethodLabel, Histogram>,
    store_ops: Family<StoreOpLabel, Histogram>,
    store_errors: Family<StoreErrorLabels, Counter>,
    /// Kept by the gRPC listener's admission (`tls::Admission`).
    grpc_connections: crate::tls::ConnectionCounters,
    /// The rate lines clients can cause are logged at: the auth layer's
    /// refused calls, the TLS listener's refused certificates, the xDS
    /// engine's refusals and the NACKs below share it.
    client_log: isdp_xds::LogRate,
    /// The store whose health is reported at scrape time.
    store_health: store::StoreHealthCollector,
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
        let load_reports = Family::<StatusLabel, Counter>::default();
        registry.register(
            "load_reports",
            "Load reports from sidecars' sessions, by outcome (accepted, dropped: too soon after the last, refused)",
            load_reports.clone(),
        );
        let load_summaries = Family::<StatusLabel, Counter>::default();
        registry.register(
            "load_summaries",
            "Load summaries sessions queued for the store (queued; dropped: the queue was full)",
            load_summaries.clone(),
        );
        let instance_utilization = Family::<InstanceLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "instance_load_utilization",
            "Utilisation in the instance's latest load summary (application's, else its CPU)",
            instance_utilization.clone(),
        );
        let instance_weight = Family::<InstanceLabels, Gauge>::default();
        registry.register(
            "instance_weight",
            "Load-balancing weight pushed to sidecars for the instance (operator weight x load factor)",
            instance_weight.clone(),
        );
        let convergence = histogram();
        registry.register_with_unit(
            "xds_convergence",
            "Time from a registry change to a sidecar's ACK of the response carrying it",
            Unit::Seconds,
            convergence.clone(),
        );
        let grpc_handled = Family::<MethodCodeLabels, Counter>::default();
        registry.register(
            "grpc_server_handled",
            "gRPC calls completed, by method and status code",
            grpc_handled.clone(),
        );
        let grpc_handling = Family::<MethodLabel, Histogram>::new_with_constructor(histogram);
        registry.register_with_unit(
            "grpc_server_handling",
            "Time to complete a gRPC call (for streams, the stream's life)",
            Unit::Seconds,
            grpc_handling.clone(),
        );
        let store_ops = Family::<StoreOpLabel, Histogram>::new_with_constructor(histogram);
        registry.register_with_unit(
            "store_operation_duration",
            "Time taken by store operations (a txn returns once durable)",
            Unit::Seconds,
            store_ops.clone(),
        );
        let store_errors = Family::<StoreErrorLabels, Counter>::default();
        registry.register(
            "store_operation_errors",
            "Store operations that failed, by kind of failure",
            store_errors.clone(),
        );
        let grpc_connections = crate::tls::ConnectionCounters::default();
        grpc_connections.register(&mut registry);
        registry.register_collector(Box::new(DroppedSpans));
        let store_health = store::StoreHealthCollector::default();
        registry.register_collector(Box::new(store_health.clone()));
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
                load_reports,
                load_summaries,
                instance_utilization,
                instance_weight,
                weighed: Mutex::default(),
                convergence,
                grpc_handled,
                grpc_handling,
                store_ops,
                store_errors,
                grpc_connections,
                client_log: isdp_xds::LogRate::default(),
                store_health,
            }),
        }
    }

    /// What the gRPC listener counts of its connections.
    pub fn grpc_connections(&self) -> crate::tls::ConnectionCounters {
        self.inner.grpc_connections.clone()
    }

    /// The rate lines clients can cause are logged at (refused calls,
    /// xDS refusals and NACKs), for the auth layer and the ADS engine to
    /// share.
    pub fn client_log_rate(&self) -> isdp_xds::LogRate {
        self.inner.client_log.clone()
    }

    /// Reports `store`'s health (`isdp_store_up`, `isdp_store_failures_total`)
    /// from now on; only the first store given counts.
    pub fn follow_store_health(&self, store: Arc<dyn crate::store::Store>) {
        let _ = self.inner.store_health.0.set(store);
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

    fn grpc_handled(&self, method: &str, code: u16, seconds: f64) {
        self.inner
            .grpc_handled
            .get_or_create(&MethodCodeLabels {
                method: method.to_owned(),
                code: grpc_code_name(code),
            })
            .inc();
        self.inner
            .grpc_handling
            .get_or_create(&MethodLabel {
                method: method.to_owned(),
            })
            .observe(seconds);
    }

    fn store_op(&self, op: &'static str, seconds: f64, error: Option<&StoreError>) {
        self.inner
            .store_ops
            .get_or_create(&StoreOpLabel { op })
            .observe(seconds);
        if let Some(e) = error {
            self.inner
                .store_errors
                .get_or_create(&StoreErrorLabels {
                    op,
                    error: e.kind(),
                })
                .inc();
        }
    }

    /// One load report: `accepted`, `dropped` or `refused`.
    pub fn load_report(&self, outcome: &str) {
        self.inner
            .load_reports
            .get_or_create(&StatusLabel {
                status: outcome.to_owned(),
            })
            .inc();
    }

    /// One load summary's write: `queued` or `dropped`.
    pub fn load_summary(&self, outcome: &str) {
        self.inner
            .load_summaries
            .get_or_create(&StatusLabel {
                status: outcome.to_owned(),
            })
            .inc();
    }

    /// The weights just published for `service`'s instances (id,
    /// utilisation, weight); the series of instances it no longer has
    /// are dropped, so the series follow the registry.
    pub fn instance_weights(&self, service: &str, weights: &[(String, f64, u32)]) {
        let mut weighed = self.inner.weighed.lock().expect("weighed lock");
        let now: BTreeSet<String> = weights.iter().map(|(id, ..)| id.clone()).collect();
        let labels = |instance: &str| InstanceLabels {
            service: service.to_owned(),
            instance: instance.to_owned(),
        };
        if let Some(before) = weighed.get(service) {
            for gone in before.difference(&now) {
                self.inner.instance_utilization.remove(&labels(gone));
                self.inner.instance_weight.remove(&labels(gone));
            }
        }
        for (id, utilization, weight) in weights {
            self.inner
                .instance_utilization
                .get_or_create(&labels(id))
                .set(*utilization);
            self.inner
                .instance_weight
                .get_or_create(&labels(id))
                .set(i64::from(*weight));
        }
        if now.is_empty() {
            weighed.remove(service);
        } else {
            weighed.insert(service.to_owned(), now);
        }
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

/// Spans the trace exporter dropped (queue full, collector failing), read
/// from the exporter's counter at scrape time.
#[derive(Debug)]
struct DroppedSpans;

impl prometheus_client::collector::Collector for DroppedSpans {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::{encoding::EncodeMetric, metrics::TypedMetric};
        let c = prometheus_client::metrics::counter::ConstCounter::new(
            isdp_core::telemetry::dropped_spans(),
        );
        let e = encoder.encode_descriptor(
            "trace_spans_dropped",
            "Spans dropped because the export queue was full or the collector failed",
            None,
            prometheus_client::metrics::counter::ConstCounter::<u64>::TYPE,
        )?;
        c.encode(e)
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
        // Debug: a client opening streams as fast as it can must not write
        // a line per stream; `isdp_xds_streams` counts them. The caller is
        // what was authenticated (token id or SPIFFE ID), the node id only
        // what the client claims.
        tracing::debug!(node = ?s.node_id, caller = ?s.caller, stream = s.id, delta = s.delta, peer = ?s.peer, "xds stream opened");
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
                tracing::debug!(node = ?s.node_id, type_url = ?type_url, nonce, resources, bytes = bytes.len(), "xds push");
            }
            StreamEvent::Ack {
                type_url,
                changed_at,
                ..
            } => {
                self.inner.acks.get_or_create(&label(type_url)).inc();
                // A change older than the stream reached it on connect.
                if let Some(t) = changed_at
                    && *t >= s.opened
                {
                    self.inner.convergence.observe(t.elapsed().as_secs_f64());
                }
            }
            StreamEvent::Nack {
                type_url,
                nonce,
                message,
                ..
            } => {
                self.inner.nacks.get_or_create(&label(type_url)).inc();
                if self.inner.client_log.admit() {
                    tracing::warn!(node = ?s.node_id, type_url = ?type_url, nonce, error = ?message, "xds response rejected (NACK)");
                } else {
                    tracing::debug!(node = ?s.node_id, type_url = ?type_url, nonce, error = ?message, "xds response rejected (NACK)");
                }
            }
            // What a stream holds is proxy status's; nothing to count.
            StreamEvent::Subscribed { .. } | StreamEvent::Resumed { .. } => {}
        }
    }

    fn closed(&self, s: &StreamInfo) {
        self.inner.streams.dec();
        tracing::debug!(node = ?s.node_id, stream = s.id, "xds stream closed");
    }
}

impl crate::load::WeightObserver for Metrics {
    fn weighed(&self, service: &str, weights: &[(String, f64, u32)]) {
        self.instance_weights(service, weights);
    }
}
