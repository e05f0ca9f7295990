//! The sidecar's Prometheus metrics, served as text on the admin port's
//! `/metrics`.
//!
//! Two kinds:
//! - Request metrics, recorded on the request path. Each route (an
//!   upstream, or a local service for inbound traffic) resolves its
//!   [`RouteMetrics`] once, so a request only touches atomics and one
//!   histogram: no label hashing per request.
//! - State metrics (endpoints by health, xDS and session state, local
//!   health), read from the state the sidecar already keeps when Prometheus
//!   scrapes, by a collector registered with [`Metrics::register_collector`]
//!   (`admin::StateCollector`, which reads every other module, so it lives
//!   above them rather than here). Nothing on the request path feeds them.
//!
//! This module depends on no other module of the sidecar: everything that
//! records a metric imports it, never the other way round.
//!
//! `listener.rs` holds the listeners' connection metrics (caps, timeouts);
//! `dns.rs` the DNS server's queries.
//! `traffic.rs` the outbound totals per upstream the session reports.
//!
//! Label sets are bounded: `service` values come from the configuration
//! (upstreams and local services), `reason` from the fixed set of
//! `x-isdp-error` values, `grpc_code` from the 17 gRPC codes.

mod dns;
mod listener;
mod traffic;

pub use dns::DnsMetrics;
pub use listener::{CapMetrics, IdleTimeouts, ListenerMetrics};
pub use traffic::{OutboundTraffic, UpstreamTotals};

use std::sync::Arc;

use isdp_core::metrics::{LATENCY_BUCKETS, grpc_code_name};

use prometheus_client::{
    collector::Collector,
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

/// Which way traffic flows through the sidecar.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From a local service to an upstream.
    Outbound,
    /// From another sidecar to a local service.
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    direction: &'static str,
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    direction: &'static str,
    service: String,
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcLabels {
    direction: &'static str,
    service: String,
    grpc_code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    direction: &'static str,
    service: String,
    reason: &'static str,
}

/// Resilience events of an upstream, by a reason from a fixed set.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResilienceLabels {
    service: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabel {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeniedLabels {
    service: String,
    source: String,
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TlsFailureLabels {
    direction: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RevokedLabels {
    direction: &'static str,
    stage: &'static str,
}

/// A cheap handle to the registry; clone it into whatever records.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: std::sync::Mutex<Registry>,
    requests: Family<StatusLabels, Counter>,
    grpc: Family<GrpcLabels, Counter>,
    durations: Family<RouteLabels, Histogram>,
    in_flight: Family<RouteLabels, Gauge>,
    errors: Family<ErrorLabels, Counter>,
    tcp_opened: Family<RouteLabels, Counter>,
    tcp_open: Family<RouteLabels, Gauge>,
    tls_failures: Family<TlsFailureLabels, Counter>,
    revoked_peers: Family<RevokedLabels, Counter>,
    denied: Family<DeniedLabels, Counter>,
    retries: Family<ResilienceLabels, Counter>,
    budget_exhausted: Family<UpstreamLabel, Counter>,
    timeouts: Family<ResilienceLabels, Counter>,
    overflows: Family<ResilienceLabels, Counter>,
    ejections: Family<UpstreamLabel, Counter>,
    relay: RelayMetrics,
    listeners: listener::Listeners,
    dns: DnsMetrics,
    traffic: OutboundTraffic,
}

/// The xDS relay's streams (`relay`): open now, relayed in all, and the
/// relay's own answers by reason (a fixed set, `relay::RelayError`).
#[derive(Clone, Debug, Default)]
pub struct RelayMetrics {
    pub open: Gauge,
    pub streams: Counter,
    errors: Family<ReasonLabel, Counter>,
}

impl RelayMetrics {
    /// A stream the relay ended (or refused) itself, for `reason`.
    pub fn error(&self, reason: &'static str) {
        self.errors.get_or_create(&ReasonLabel { reason }).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("isdp");
        let requests = Family::<StatusLabels, Counter>::default();
        registry.register(
            "requests",
            "HTTP requests completed (response headers sent), by status class",
            requests.clone(),
        );
        let grpc = Family::<GrpcLabels, Counter>::default();
        registry.register(
            "grpc_requests",
            "gRPC calls completed, by grpc-status",
            grpc.clone(),
        );
        let durations = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(LATENCY_BUCKETS.iter().copied())
        });
        registry.register_with_unit(
            "request_duration",
            "Time from receiving a request to its response headers",
            Unit::Seconds,
            durations.clone(),
        );
        let in_flight = Family::<RouteLabels, Gauge>::default();
        registry.register(
            "requests_in_flight",
            "HTTP requests whose response has not ended yet",
            in_flight.clone(),
        );
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "proxy_errors",
            "Responses the sidecar produced itself, by x-isdp-error reason",
            errors.clone(),
        );
        let tcp_opened = Family::<RouteLabels, Counter>::default();
        registry.register(
            "tcp_connections",
            "TCP connections proxied",
            tcp_opened.clone(),
        );
        let tcp_open = Family::<RouteLabels, Gauge>::default();
        registry.register(
            "tcp_connections_open",
            "TCP connections being proxied now",
            tcp_open.clone(),
        );
        let tls_failures = Family::<TlsFailureLabels, Counter>::default();
        registry.register(
            "tls_handshake_failures",
            "mTLS handshakes between sidecars that failed, by direction and reason",
            tls_failures.clone(),
        );
        let revoked_peers = Family::<RevokedLabels, Counter>::default();
        registry.register(
            "revoked_peer_refusals",
            "Requests refused (stage request) and connections closed (stage connection) because the peer's certificate was issued under a revoked token; handshakes refused for that count in tls_handshake_failures with reason revoked",
            revoked_peers.clone(),
        );
        let denied = Family::<DeniedLabels, Counter>::default();
        registry.register(
            "authz_denied",
            "Inbound requests and connections refused by authorization, by local service, calling service and rule (`default` when the default refused, `no-policy-yet` before the policy arrived, `tunnel-to-http` for a TCP tunnel to an HTTP or gRPC service)",
            denied.clone(),
        );
        let retries = Family::<ResilienceLabels, Counter>::default();
        registry.register(
            "retries",
            "Outbound retries made, by the reason the previous try failed (connect-failure, reset, 5xx, gateway-error, status-code, grpc-code)",
            retries.clone(),
        );
        let budget_exhausted = Family::<UpstreamLabel, Counter>::default();
        registry.register(
            "retry_budget_exhausted",
            "Failures returned as they were because the upstream's retry budget was spent",
            budget_exhausted.clone(),
        );
        let timeouts = Family::<ResilienceLabels, Counter>::default();
        registry.register(
            "timeouts",
            "Outbound timeouts, by kind (request, per-try)",
            timeouts.clone(),
        );
        let overflows = Family::<ResilienceLabels, Counter>::default();
        registry.register(
            "breaker_overflows",
            "Requests refused at once by an upstream's circuit breaker, by the limit hit",
            overflows.clone(),
        );
        let ejections = Family::<UpstreamLabel, Counter>::default();
        registry.register(
            "outlier_ejections",
            "Endpoints ejected by outlier detection",
            ejections.clone(),
        );
        let relay = RelayMetrics::default();
        registry.register(
            "xds_relay_streams_open",
            "ADS streams the xDS relay carries to the control plane now",
            relay.open.clone(),
        );
        registry.register(
            "xds_relay_streams",
            "ADS streams the xDS relay admitted",
            relay.streams.clone(),
        );
        registry.register(
            "xds_relay_errors",
            "Relayed ADS streams the relay refused or ended itself, by reason (max-streams, control-plane-unreachable, request-too-large, bad-request, no-first-request, response-too-large, shutting-down)",
            relay.errors.clone(),
        );
        let listeners = listener::Listeners::register(&mut registry);
        let dns = DnsMetrics::register(&mut registry);
        Metrics {
            inner: Arc::new(Inner {
                dns,
                listeners,
                relay,
                traffic: OutboundTraffic::default(),
                retries,
                budget_exhausted,
                timeouts,
                overflows,
                ejections,
                registry: std::sync::Mutex::new(registry),
                requests,
                grpc,
                durations,
                in_flight,
                errors,
                tcp_opened,
                tcp_open,
                tls_failures,
                revoked_peers,
                denied,
            }),
        }
    }

    /// Adds scrape-time metrics, read from the sidecar's state by
    /// `collector` when Prometheus scrapes.
    pub fn register_collector(&self, collector: impl Collector + 'static) {
        self.inner
            .registry
            .lock()
            .expect("registry lock")
            .register_collector(Box::new(collector));
    }

    /// The handles of one listener, resolved once by its accept loop.
    pub fn listener(&self, listener: &str) -> ListenerMetrics {
        self.inner.listeners.listener(listener)
    }

    /// The handles of a listener's TLS handshake cap (the inbound one).
    pub fn tls_handshakes(&self, listener: &str) -> CapMetrics {
        self.inner.listeners.tls_handshakes(listener)
    }

    /// The idle-timeout counters of byte streams.
    pub fn idle_timeouts(&self) -> IdleTimeouts {
        self.inner.listeners.idle_timeouts()
    }

    /// The DNS server's handles.
    pub fn dns(&self) -> DnsMetrics {
        self.inner.dns.clone()
    }

    /// The xDS relay's handles.
    pub fn relay(&self) -> RelayMetrics {
        self.inner.relay.clone()
    }

    /// Counts a failed mTLS handshake. Failures are rare and `reason` comes
    /// from a fixed set, so the label lookup per failure is fine.
    pub fn tls_handshake_failure(&self, direction: Direction, reason: &'static str) {
        self.inner
            .tls_failures
            .get_or_create(&TlsFailureLabels {
                direction: direction.as_str(),
                reason,
            })
            .inc();
    }

    /// Counts a request refused or a connection closed on an established
    /// connection whose peer's token was revoked; `stage` is `request` or
    /// `connection`.
    pub fn revoked_peer(&self, direction: Direction, stage: &'static str) {
        self.inner
            .revoked_peers
            .get_or_create(&RevokedLabels {
                direction: direction.as_str(),
                stage,
            })
            .inc();
    }

    /// Counts a call authorization refused. Labels are bounded by the
    /// mesh's services and the destination's rules: only callers with a
    /// mesh certificate get this far.
    pub fn authz_denied(&self, service: &str, source: &str, rule: &str) {
        self.inner
            .denied
            .get_or_create(&DeniedLabels {
                service: service.to_owned(),
                source: source.to_owned(),
                rule: rule.to_owned(),
            })
            .inc();
    }

    /// The handles for one route, resolved once and kept by the route.
    pub fn route(&self, direction: Direction, service: &str) -> Arc<RouteMetrics> {
        let labels = RouteLabels {
            direction: direction.as_str(),
            service: service.to_owned(),
        };
        let status = |class| {
            self.inner
                .requests
                .get_or_create(&StatusLabels {
                    direction: direction.as_str(),
                    service: service.to_owned(),
                    status_class: class,
                })
                .clone()
        };
        Arc::new(RouteMetrics {
            direction,
            service: service.to_owned(),
            status: [
                status("1xx"),
                status("2xx"),
                status("3xx"),
                status("4xx"),
                status("5xx"),
            ],
            duration: self.inner.durations.get_or_create(&labels).clone(),
            in_flight: self.inner.in_flight.get_or_create(&labels).clone(),
            tcp_opened: self.inner.tcp_opened.get_or_create(&labels).clone(),
            tcp_open: self.inner.tcp_open.get_or_create(&labels).clone(),
            traffic: match direction {
                Direction::Outbound => self.inner.traffic.counters(service),
                Direction::Inbound => None,
            },
            shared: self.clone(),
        })
    }

    /// The outbound totals per upstream.
    pub fn outbound_traffic(&self) -> Vec<UpstreamTotals> {
        self.inner.traffic.totals()
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self.inner.registry.lock().expect("registry lock");
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// One route's request metrics. Cloning the `Arc` is all a request pays to
/// hold them.
pub struct RouteMetrics {
    direction: Direction,
    service: String,
    /// Indexed by the status's hundreds digit minus one.
    status: [Counter; 5],
    pub duration: Histogram,
    pub in_flight: Gauge,
    pub tcp_opened: Counter,
    pub tcp_open: Gauge,
    /// Outbound routes: the session's traffic report totals.
    traffic: Option<Arc<traffic::Counters>>,
    shared: Metrics,
}

impl std::fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteMetrics")
            .field("direction", &self.direction)
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl RouteMetrics {
    /// A finished request, for the session's traffic report.
    pub fn finished(&self, status: http::StatusCode, elapsed: std::time::Duration) {
        if let Some(t) = &self.traffic {
            t.record(status.is_server_error(), elapsed);
        }
    }

    pub fn status(&self, status: http::StatusCode) {
        if let Some(c) = self
            .status
            .get((status.as_u16() / 100).wrapping_sub(1) as usize)
        {
            c.inc();
        }
    }

    /// A response the sidecar produced itself (the `x-isdp-error` value).
    pub fn error(&self, reason: &'static str) {
        self.shared
            .inner
            .errors
            .get_or_create(&ErrorLabels {
                direction: self.direction.as_str(),
                service: self.service.clone(),
                reason,
            })
            .inc();
    }

    fn resilience(&self, family: &Family<ResilienceLabels, Counter>, reason: &'static str) {
        family
            .get_or_create(&ResilienceLabels {
                service: self.service.clone(),
                reason,
            })
            .inc();
    }

    /// A retry made after a try failed for `reason`.
    pub fn retry(&self, reason: &'static str) {
        self.resilience(&self.shared.inner.retries, reason);
    }

    /// A failure not retried because the retry budget was spent.
    pub fn retry_budget_exhausted(&self) {
        let labels = UpstreamLabel {
            service: self.service.clone(),
        };
        self.shared
            .inner
            .budget_exhausted
            .get_or_create(&labels)
            .inc();
    }

    /// A request or try that timed out (`kind`: request, per-try).
    pub fn timeout(&self, kind: &'static str) {
        self.resilience(&self.shared.inner.timeouts, kind);
    }

    /// A request the circuit breaker refused (`limit`: max_requests, ...).
    pub fn overflow(&self, limit: &'static str) {
        self.resilience(&self.shared.inner.overflows, limit);
    }

    /// An endpoint ejected by outlier detection.
    pub fn ejection(&self) {
        let labels = UpstreamLabel {
            service: self.service.clone(),
        };
        self.shared.inner.ejections.get_or_create(&labels).inc();
    }

    /// A finished gRPC call; `code` is the `grpc-status` value.
    pub fn grpc(&self, code: u16) {
        self.shared
            .inner
            .grpc
            .get_or_create(&GrpcLabels {
                direction: self.direction.as_str(),
                service: self.service.clone(),
                grpc_code: grpc_code_name(code),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_share_series_and_render_with_units() {
        let m = Metrics::new();
        let a = m.route(Direction::Outbound, "payments");
        let b = m.route(Direction::Outbound, "payments");
        a.status(http::StatusCode::OK);
        b.status(http::StatusCode::SERVICE_UNAVAILABLE);
        b.status(http::StatusCode::from_u16(999).unwrap());
        a.error("no-healthy-endpoints");
        a.grpc(14);
        a.grpc(99);
        a.duration.observe(0.002);
        let text = m.render();
        for line in [
            r#"isdp_requests_total{direction="outbound",service="payments",status_class="2xx"} 1"#,
            r#"isdp_requests_total{direction="outbound",service="payments",status_class="5xx"} 1"#,
            r#"isdp_proxy_errors_total{direction="outbound",service="payments",reason="no-healthy-endpoints"} 1"#,
            r#"isdp_grpc_requests_total{direction="outbound",service="payments",grpc_code="UNAVAILABLE"} 1"#,
            r#"isdp_grpc_requests_total{direction="outbound",service="payments",grpc_code="UNKNOWN"} 1"#,
            r#"isdp_request_duration_seconds_bucket{direction="outbound",service="payments",le="0.0025"} 1"#,
            r#"isdp_request_duration_seconds_count{direction="outbound",service="payments"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line}\n{text}");
        }
        assert!(
            !text.contains("# EOF"),
            "Prometheus text format, not OpenMetrics"
        );
    }
}
