//! The admin HTTP server: `/live`, `/ready`, `/config` and `/metrics`
//! (Prometheus text format), and the scrape-time collector of state
//! metrics (`collector`). It is served like every other listener
//! (`listener`): its own connection cap, and the same timeouts.

mod collector;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use hyper_util::service::TowerToHyperService;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::config::Limits;
use crate::listener::Gate;
use crate::proxy::upstreams::LevelView;
use crate::session::Session;
use crate::xds::Snapshot;

pub use collector::StateCollector;

/// What the handlers read; cheap to clone.
#[derive(Clone)]
pub struct AdminState {
    /// Local services and the session's state.
    pub session: Session,
    /// The latest discovery snapshot.
    pub xds: watch::Receiver<Arc<Snapshot>>,
    /// Whether upstreams are configured, i.e. whether an xDS stream exists
    /// to report on in `control_plane`.
    pub has_upstreams: bool,
    /// The workload identities, when this sidecar has one to wait for:
    /// without a certificate it can neither accept nor make mesh calls.
    pub identities: Option<watch::Receiver<Arc<crate::identity::Identities>>>,
    /// The data plane's bound listeners, for operators checking where to
    /// send traffic.
    pub listeners: Option<crate::proxy::Addrs>,
    /// The balancing state in force per upstream.
    pub upstreams: Option<crate::proxy::upstreams::Upstreams>,
    /// The xDS relay, when it is on.
    pub relay: Option<crate::relay::Relay>,
    pub metrics: crate::metrics::Metrics,
}

/// The admin routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/live", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/config", get(config))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Serves `router(state)` on `listener` until `shutdown`, under the admin
/// listener's limits: `limits.admin_max_connections` connections, and the
/// header, idle and HTTP/2 bounds every listener has. Open connections
/// finish their requests before it returns.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let gate = Gate::admin(&limits, &state.metrics);
    let router = router(state);
    let connections = TaskTracker::new();
    while let Some((stream, peer, place)) = gate.accept(&listener, &mut shutdown).await {
        let svc = TowerToHyperService::new(router.clone());
        let gate = gate.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            gate.http()
                .serve(stream, place, peer, svc, shutdown, std::future::pending())
                .await
        });
    }
    connections.close();
    connections.wait().await;
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

async fn ready(State(state): State<AdminState>) -> impl IntoResponse {
    if let Some(ids) = &state.identities {
        let revoked = state
            .xds
            .borrow()
            .trust_bundle
            .as_ref()
            .map(|b| b.revoked_grants.clone())
            .unwrap_or_default();
        if let Some(why) = identity_problem(&ids.borrow(), &revoked) {
            return (StatusCode::SERVICE_UNAVAILABLE, why);
        }
    }
    if let Some(why) = state.xds.borrow().refused.clone() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: the control plane refuses this sidecar: {why}"),
        );
    }
    let xds_ready = state.xds.borrow().ready;
    let opened = state.session.status().opened;
    if xds_ready {
        // Inbound calls are refused until their policy arrives (fail closed),
        // so a sidecar without them cannot serve its services yet.
        let missing_policy = {
            let snap = state.xds.borrow();
            state
                .session
                .services()
                .iter()
                .find(|s| !snap.authz_policies.contains_key(&s.name))
                .map(|s| s.name.clone())
        };
        if let Some(service) = missing_policy {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: waiting for the authorization policy of {service}"),
            );
        }
    }
    match (xds_ready, opened) {
        (true, true) => (StatusCode::OK, "ready".to_owned()),
        (false, _) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: waiting for the first xDS answer for every upstream".to_owned(),
        ),
        (true, false) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: session with the control plane not opened yet".to_owned(),
        ),
    }
}

/// Why the workload certificates keep the sidecar from serving, if they
/// do: none yet, one issued under a token the bundle lists as revoked
/// (peers refuse it), or a renewal the control plane refuses (the
/// certificate will not be replaced).
fn identity_problem(ids: &crate::identity::Identities, revoked: &[String]) -> Option<String> {
    if !ids.ready() {
        let primary = ids.primary.as_deref().unwrap_or_default();
        return Some(match ids.refused.get(primary) {
            Some(why) => format!(
                "not ready: the control plane refuses a workload certificate for {primary}: {why}"
            ),
            None => "not ready: waiting for a workload certificate from the control plane".into(),
        });
    }
    let revoked_grant = ids.by_service.iter().find_map(|(service, id)| {
        let grant = id.grant.as_ref()?;
        revoked.contains(grant).then_some((service, grant))
    });
    if let Some((service, grant)) = revoked_grant {
        return Some(format!(
            "not ready: the workload certificate of {service} was issued under token {grant}, \
             which has been revoked, so other sidecars refuse it; restart with a new join token"
        ));
    }
    let (service, why) = ids.refused.iter().next()?;
    Some(format!(
        "not ready: the control plane refuses to renew the workload certificate of {service}: {why}"
    ))
}

#[derive(Serialize)]
struct ConfigView {
    node_id: String,
    listeners: Option<ListenersView>,
    control_plane: ControlPlaneView,
    session: ControlPlaneView,
    services: Vec<ServiceView>,
    upstreams: BTreeMap<String, UpstreamView>,
    xds: XdsView,
    /// Workload certificates held, by service.
    identities: BTreeMap<String, IdentityView>,
    xds_relay: RelayView,
}

/// The xDS relay: whether it is on, and the streams it carries.
#[derive(Serialize)]
struct RelayView {
    enabled: bool,
    /// `127.0.0.1:PORT` or `unix:/PATH`.
    listen: Option<String>,
    max_streams: Option<usize>,
    open_streams: usize,
    streams: Vec<RelayStreamView>,
}

#[derive(Serialize)]
struct RelayStreamView {
    /// As its first request names it (the control plane checks it).
    node_id: String,
    /// The client's address, or `unix uid N`.
    peer: String,
    delta: bool,
    /// The control-plane URL it is relayed to.
    control_plane: Option<String>,
    opened_unix_ms: u128,
}

fn relay_view(relay: Option<&crate::relay::Relay>) -> RelayView {
    let Some(relay) = relay else {
        return RelayView {
            enabled: false,
            listen: None,
            max_streams: None,
            open_streams: 0,
            streams: Vec::new(),
        };
    };
    let streams: Vec<RelayStreamView> = relay
        .open_streams()
        .into_iter()
        .map(|s| RelayStreamView {
            node_id: s.node_id,
            peer: s.peer,
            delta: s.delta,
            control_plane: s.control_plane,
            opened_unix_ms: s
                .opened
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis()),
        })
        .collect();
    RelayView {
        enabled: true,
        listen: Some(relay.listen().to_owned()),
        max_streams: Some(relay.max_streams()),
        open_streams: streams.len(),
        streams,
    }
}

#[derive(Serialize)]
struct IdentityView {
    spiffe_id: String,
    /// Milliseconds since the Unix epoch.
    not_after_unix_ms: u128,
    /// Presented when calling other sidecars.
    primary: bool,
    /// The token the certificate was issued under.
    grant: Option<String>,
}

#[derive(Serialize)]
struct ListenersView {
    inbound: String,
    outbound: String,
    upstreams: BTreeMap<String, String>,
}

#[derive(Clone, Serialize)]
struct ControlPlaneView {
    connected: bool,
    url: Option<String>,
    reconnects: u64,
}

#[derive(Serialize)]
struct ServiceView {
    id: String,
    name: String,
    port: u16,
    status: &'static str,
    /// Requests from other sidecars in flight to the instance now.
    in_flight: u64,
    /// The instance's recent average latency to the response head.
    latency_ms: Option<f64>,
    /// `application_utilization` of the latest ORCA report its responses
    /// carried (`endpoint-load-metrics`), if any in the last 10 s.
    application_utilization: Option<f64>,
}

#[derive(Serialize)]
struct UpstreamView {
    exists: bool,
    version: String,
    /// The balancing algorithm in force.
    lb: Option<&'static str>,
    /// True when too few endpoints are healthy and traffic spreads over all.
    panic: Option<bool>,
    /// The traffic policy's version in force; None: the sidecar's defaults.
    policy_version: Option<String>,
    /// The adaptive concurrency limit in force and the requests counted
    /// under it; None when the policy sets no such limit.
    concurrency_limit: Option<usize>,
    concurrency_in_flight: Option<usize>,
    /// The upstream's latency without a queue, as last measured.
    concurrency_min_rtt_ms: Option<f64>,
    /// The caller's zone (this sidecar's), which orders the levels.
    caller_zone: Option<String>,
    /// Locality levels in order, with the share of requests each takes
    /// now; empty when locality-aware balancing does not apply.
    levels: Vec<LevelView>,
    endpoints: Vec<EndpointView>,
}

#[derive(Serialize)]
struct EndpointView {
    id: String,
    address: String,
    port: u16,
    inbound_port: u16,
    /// The weight the control plane pushed (operator weight × load factor).
    weight: u32,
    /// The weight the balancer uses now; None when not balanced. Equal to
    /// `weight` once the push is applied.
    weight_in_force: Option<u32>,
    /// The weight the instance was registered with, before load.
    operator_weight: u32,
    /// Why the control plane chose `weight`.
    weight_reason: String,
    metadata: BTreeMap<String, String>,
    status: &'static str,
    /// Out of the balancer by outlier detection right now.
    ejected: bool,
    /// Times outlier detection has ejected it.
    ejections: u32,
    /// Why it was last ejected (`errors` or `latency`); None if never.
    ejected_for: Option<&'static str>,
    /// Requests in flight from this sidecar now; None when not balanced
    /// (unhealthy and outside the panic set).
    in_flight: Option<u64>,
    /// The recent latency average `load_aware` balances on, in
    /// milliseconds; None before the first answer.
    latency_ms: Option<f64>,
    zone: String,
    priority: u32,
    /// Its index in `levels`; None when not balanced or without levels.
    level: Option<usize>,
}

#[derive(Serialize)]
struct XdsView {
    ready: bool,
    acked: BTreeMap<String, String>,
    /// Trust bundle, authorization and traffic policies, by `<type>/<name>`.
    acked_by_type: BTreeMap<String, String>,
    acks: u64,
    nacks: u64,
    last_nack: Option<String>,
    /// Tokens revoked by the control plane, from the trust bundle: peers
    /// with certificates issued under them are refused.
    revoked_grants: Vec<String>,
}

async fn config(State(state): State<AdminState>) -> Json<ConfigView> {
    let snap = state.xds.borrow().clone();
    let session = state.session.status();
    let session_view = ControlPlaneView {
        connected: session.connected,
        url: session.control_plane.clone(),
        reconnects: session.reconnects,
    };
    // `control_plane` follows the xDS stream when there is one, else the session.
    let control_plane = if state.has_upstreams {
        ControlPlaneView {
            connected: snap.connected,
            url: snap.control_plane.clone(),
            reconnects: snap.reconnects,
        }
    } else {
        session_view.clone()
    };
    let health = state.session.health();
    let services = state
        .session
        .services()
        .iter()
        .zip(health)
        .zip(state.session.loads())
        .map(|((svc, health), load)| ServiceView {
            in_flight: load.in_flight(),
            latency_ms: load.latency().map(|d| d.as_secs_f64() * 1000.0),
            application_utilization: load.orca().and_then(|o| o.application_utilization),
            id: state.session.instance_id(&svc.name),
            name: svc.name.clone(),
            port: svc.port,
            status: health.as_str(),
        })
        .collect();
    let upstreams = snap
        .upstreams
        .iter()
        .map(|(name, u)| {
            let lb = state.upstreams.as_ref().and_then(|ups| ups.get(name));
            let ejection = |id: &str| {
                lb.as_ref()
                    .and_then(|l| l.ejection(id))
                    .unwrap_or((false, 0, None))
            };
            let load = |id: &str| lb.as_ref().and_then(|l| l.load(id));
            let endpoints = u
                .endpoints
                .iter()
                .map(|e| EndpointView {
                    id: e.id.clone(),
                    address: e.address.clone(),
                    port: e.port,
                    inbound_port: e.inbound_port,
                    weight: e.weight,
                    weight_in_force: load(&e.id).map(|l| l.weight()),
                    operator_weight: e.operator_weight,
                    weight_reason: e.weight_reason.clone(),
                    metadata: e.metadata.clone(),
                    status: e.health.as_str(),
                    ejected: ejection(&e.id).0,
                    ejections: ejection(&e.id).1,
                    ejected_for: ejection(&e.id).2.map(|c| c.as_str()),
                    in_flight: load(&e.id).map(|l| l.in_flight()),
                    latency_ms: load(&e.id)
                        .and_then(|l| l.recent_latency())
                        .map(|d| d.as_secs_f64() * 1000.0),
                    zone: e.zone.clone(),
                    priority: e.priority,
                    level: lb.as_ref().and_then(|l| l.level_of(&e.id)),
                })
                .collect();
            let view = UpstreamView {
                exists: u.exists,
                version: u.version.clone(),
                lb: lb.as_ref().map(|l| l.algorithm().as_str()),
                panic: lb.as_ref().map(|l| l.panic),
                policy_version: lb.as_ref().and_then(|l| l.policy.version.clone()),
                concurrency_limit: lb.as_ref().and_then(|l| l.adaptive.limit()),
                concurrency_in_flight: lb
                    .as_ref()
                    .filter(|l| l.adaptive.limit().is_some())
                    .map(|l| l.adaptive.in_flight()),
                concurrency_min_rtt_ms: lb
                    .as_ref()
                    .and_then(|l| l.adaptive.min_rtt())
                    .map(|d| d.as_secs_f64() * 1000.0),
                caller_zone: lb.as_ref().and_then(|l| l.caller_zone.clone()),
                levels: lb.as_ref().map(|l| l.levels()).unwrap_or_default(),
                endpoints,
            };
            (name.clone(), view)
        })
        .collect();
    let listeners = state.listeners.as_ref().map(|a| ListenersView {
        inbound: a.inbound.to_string(),
        outbound: a.outbound.to_string(),
        upstreams: a
            .upstreams
            .iter()
            .map(|(n, addr)| (n.clone(), addr.to_string()))
            .collect(),
    });
    let identities = state
        .identities
        .as_ref()
        .map(|ids| {
            let ids = ids.borrow().clone();
            ids.by_service
                .iter()
                .map(|(service, id)| {
                    let view = IdentityView {
                        spiffe_id: id.spiffe_id.clone(),
                        not_after_unix_ms: id
                            .not_after
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_millis()),
                        primary: ids.primary.as_ref() == Some(service),
                        grant: id.grant.clone(),
                    };
                    (service.clone(), view)
                })
                .collect()
        })
        .unwrap_or_default();
    Json(ConfigView {
        xds_relay: relay_view(state.relay.as_ref()),
        identities,
        node_id: state.session.node_id().to_owned(),
        listeners,
        control_plane,
        session: session_view,
        services,
        upstreams,
        xds: XdsView {
            ready: snap.ready,
            acked: snap.acked.clone(),
            acked_by_type: snap.acked_by_type.clone(),
            acks: snap.acks,
            nacks: snap.nacks,
            last_nack: snap.last_nack.clone(),
            revoked_grants: snap
                .trust_bundle
                .as_ref()
                .map(|b| b.revoked_grants.clone())
                .unwrap_or_default(),
        },
    })
}

#[cfg(test)]
mod tests;
