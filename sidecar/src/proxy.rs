//! The data plane: listeners that carry traffic between a service, its
//! sidecar, and the sidecars of the services it calls.
//!
//! # Layout
//! Dependencies point up this list: each module uses only those above it.
//! - `svc`: what every layer shares (body and future types, `ClientAddr`,
//!   `Dest`, `ProxyError`, the `Step` shape of a layer); imports nothing
//!   else of the proxy.
//! - `http`: proxy header rules (hop-by-hop, forwarding headers, ids).
//! - `policy`: traffic policies compiled per version (data only).
//! - `limits`: per-upstream counters that outlive rebuilds (breaker
//!   gauges, retry budget).
//! - `upstreams`: per-upstream balancing state, rebuilt from the discovery
//!   snapshot; the endpoint a request was given (`Picked`).
//! - `transport`: handshakes between sidecars with the `tls` module's
//!   contexts, their failure metrics, and the task that keeps the context
//!   current.
//! - `observe`, `trace`, `resilience`: layers (metrics; spans and the
//!   access log; breaker, fault injection, timeouts, retries).
//! - `forward`: pooled HTTP/1.1 and HTTP/2 clients, upgrades, transport
//!   failures as answers.
//! - `tcp`: opaque TCP proxying, tunnelled between sidecars over mTLS.
//! - `outbound`: the request path from the local service to an upstream,
//!   `Route` -> `Observe` -> `Select` -> `Breaker` -> `Fault` -> `Timeout`
//!   -> `Retry` -> `Balance` -> `Dispatch`.
//! - `inbound`: the request path from other sidecars to a local service,
//!   `Observe` -> `Canonical` -> `Authorize` -> `Deliver`, and tunnels.
//!
//! Listeners: one inbound (mesh traffic to this sidecar's services), one
//! shared outbound that routes by `Host` (also usable as an `http_proxy`),
//! and one per upstream that sets `listen`. Each admits connections up to
//! its cap and serves them under the `[limits]` of the top-level
//! `listener` module (header and idle timeouts, HTTP/2 bounds, idle TCP
//! tunnels); the inbound one also caps TLS handshakes in progress. On
//! shutdown every listener stops accepting, open HTTP connections finish
//! their in-flight requests (`graceful_shutdown`), and everything still
//! open after the drain timeout is dropped.

pub mod forward;
pub mod http;
pub mod inbound;
pub mod limits;
pub mod observe;
pub mod outbound;
pub mod policy;
pub mod resilience;
pub mod svc;
pub mod tcp;
pub mod trace;
pub mod transport;
pub mod upstreams;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use ::http::Request;
use hyper::body::Incoming;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::watch,
};
use tower::Layer;

use crate::listener::{self, Cap, Gate, Place, Tunnels, http::Tracked};
use crate::tls::{PeerGuard, any_revoked};
use crate::{
    config::{Config, Protocol, Upstream},
    metrics::Metrics,
};
use forward::Forwarder;
use outbound::RouteBy;
use svc::{ClientAddr, Next, ProxyError, answer};
use transport::Tls;
use upstreams::Upstreams;

/// Tracks every connection task, so shutdown can wait for them to drain.
pub type Tracker = tokio_util::task::TaskTracker;

/// How long a connection to an endpoint may take before the request fails
/// with 504 `connect-timeout`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The data plane's listeners, bound before anything is registered so the
/// registration can carry the real inbound port.
pub struct Listeners {
    inbound: TcpListener,
    outbound: TcpListener,
    upstreams: Vec<(Upstream, TcpListener)>,
}

#[derive(Clone, Debug)]
pub struct Addrs {
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub upstreams: Vec<(String, SocketAddr)>,
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, crate::Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| crate::Error::Listen {
            what: what.to_owned(),
            addr,
            source,
        })
}

/// What the inbound side serves the local services with: the
/// destination's authorization policies, and each local service's load
/// meter in config order.
pub struct LocalInputs {
    pub policies: watch::Receiver<Arc<crate::authz::Policies>>,
    pub loads: Vec<Arc<crate::load_report::LocalLoad>>,
}

impl Listeners {
    pub async fn bind(config: &Config) -> Result<Self, crate::Error> {
        let inbound = bind(config.inbound_listen, "inbound").await?;
        let outbound = bind(config.outbound_listen, "outbound").await?;
        let mut ups = Vec::new();
        for u in &config.upstreams {
            if let Some(addr) = u.listen {
                ups.push((
                    u.clone(),
                    bind(addr, &format!("upstream {}", u.name)).await?,
                ));
            }
        }
        Ok(Listeners {
            inbound,
            outbound,
            upstreams: ups,
        })
    }

    pub fn addrs(&self) -> Addrs {
        let local = |l: &TcpListener| l.local_addr().expect("bound listener has an address");
        Addrs {
            inbound: local(&self.inbound),
            outbound: local(&self.outbound),
            upstreams: self
                .upstreams
                .iter()
                .map(|(u, l)| (u.name.clone(), local(l)))
                .collect(),
        }
    }

    /// Serves until `shutdown`, then drains for at most `drain`. `tls`
    /// secures every hop between sidecars. Every listener admits
    /// connections through its [`Gate`] (`config.limits`).
    pub async fn serve(
        self,
        config: &Config,
        upstreams: Upstreams,
        metrics: &Metrics,
        tls: Tls,
        local: LocalInputs,
        shutdown: watch::Receiver<bool>,
    ) {
        let LocalInputs { policies, loads } = local;
        let limits = &config.limits;
        let tracker = Tracker::new();
        let tunnels = Tunnels::new(limits.tcp_idle_timeout, metrics);
        let forwarder = Forwarder::new(CONNECT_TIMEOUT, tunnels.clone()).with_tls(tls.clone());
        let mut accept_loops = Vec::new();

        let tracing = trace::TraceSettings::new(config.access_log);
        let out = outbound::stack(
            RouteBy::Authority,
            upstreams.clone(),
            forwarder.clone(),
            tracing.clone(),
        );
        accept_loops.push(tokio::spawn(serve_http(
            self.outbound,
            Gate::data("outbound", limits, metrics),
            out,
            tracker.clone(),
            shutdown.clone(),
        )));

        for (u, listener) in self.upstreams {
            let name: Arc<str> = Arc::from(u.name.as_str());
            let gate = Gate::data(&format!("upstream.{name}"), limits, metrics);
            let task = match u.protocol {
                Protocol::Tcp => tokio::spawn(tcp::serve_outbound(
                    listener,
                    gate,
                    tcp::TcpOutbound {
                        upstream: name,
                        upstreams: upstreams.clone(),
                        connect_timeout: CONNECT_TIMEOUT,
                        tls: tls.clone(),
                        tunnels: tunnels.clone(),
                    },
                    tracker.clone(),
                    shutdown.clone(),
                )),
                Protocol::Http | Protocol::Grpc => {
                    let svc = outbound::stack(
                        RouteBy::Fixed(name),
                        upstreams.clone(),
                        forwarder.clone(),
                        tracing.clone(),
                    );
                    tokio::spawn(serve_http(
                        listener,
                        gate,
                        svc,
                        tracker.clone(),
                        shutdown.clone(),
                    ))
                }
            };
            accept_loops.push(task);
        }

        let inbound = trace::TraceInboundLayer(tracing).layer(inbound::Inbound::new(
            &config.services,
            &loads,
            forwarder,
            metrics,
            inbound::Authorizer::new(policies, metrics.clone()),
        ));
        accept_loops.push(tokio::spawn(serve_inbound(
            self.inbound,
            InboundGates {
                gate: Gate::data("inbound", limits, metrics),
                handshakes: listener::tls_handshakes(limits, metrics),
            },
            inbound,
            tls,
            tracker.clone(),
            shutdown.clone(),
        )));

        for l in accept_loops {
            let _ = l.await;
        }
        tracker.close();
        let open = tracker.len();
        if open > 0 {
            tracing::info!(connections = open, drain = ?config.drain_timeout, "draining connections");
        }
        if tokio::time::timeout(config.drain_timeout, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                connections = tracker.len(),
                "drain timeout reached; closing what is left"
            );
        }
    }
}

/// Serves one HTTP connection (HTTP/1.1 or HTTP/2, with upgrades) from
/// `client` with `svc`, under its listener's limits (`gate`); on shutdown,
/// finishes in-flight requests and closes. On an mTLS connection `client`
/// names the calling sidecar and the service it asked for (SNI), and holds
/// the guard on its token: once that is revoked, requests are refused
/// (403 `peer-revoked`) and the connection is closed at once, in-flight
/// requests with it.
async fn serve_conn<S, IO>(
    gate: Gate,
    stream: IO,
    place: Place,
    client: ClientAddr,
    svc: S,
    shutdown: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Next + Sync,
{
    let peer = client.addr;
    let guards: Vec<PeerGuard> = client.guard.iter().cloned().collect();
    let hyper_svc = hyper::service::service_fn(move |req: Request<Tracked<Incoming>>| {
        // A gRPC caller gets the sidecar's own answers in gRPC's form,
        // whichever layer (or hop) made them.
        let grpc = svc::grpc::is_grpc(req.headers());
        let fut =
            if let Some(guard) = &client.guard
                && guard.refuses_request()
            {
                answer(ProxyError::PeerRevoked.response(
                    "the token this caller's certificate was issued under has been revoked",
                ))
            } else {
                let mut req = req.map(svc::boxed);
                req.extensions_mut().insert(client.clone());
                svc.clone().call(req)
            };
        if !grpc {
            return fut;
        }
        Box::pin(async move {
            let Ok(resp) = fut.await;
            Ok(svc::grpc::restate(resp))
        }) as svc::BoxFuture
    });
    gate.http()
        .serve(
            stream,
            place,
            peer,
            hyper_svc,
            shutdown,
            any_revoked(&guards),
        )
        .await
}

async fn serve_http<S>(
    listener: TcpListener,
    gate: Gate,
    svc: S,
    tracker: Tracker,
    mut shutdown: watch::Receiver<bool>,
) where
    S: Next + Sync,
{
    while let Some((stream, peer, place)) = gate.accept(&listener, &mut shutdown).await {
        tracker.spawn(serve_conn(
            gate.clone(),
            stream,
            place,
            ClientAddr::new(peer),
            svc.clone(),
            shutdown.clone(),
        ));
    }
}

/// The inbound listener's caps: connections, and TLS handshakes in
/// progress among them.
struct InboundGates {
    gate: Gate,
    handshakes: Cap,
}

/// Accepts mesh traffic: the TLS handshake runs in each connection's own
/// task (the accept loop never waits on a peer), with a place among
/// `limits.max_tls_handshakes` (a connection over it is closed at once),
/// then ALPN picks HTTP or a TCP tunnel. Either ends when the caller's
/// token is revoked.
async fn serve_inbound(
    listener: TcpListener,
    gates: InboundGates,
    inbound: trace::TraceInbound<inbound::Inbound>,
    tls: Tls,
    tracker: Tracker,
    mut shutdown: watch::Receiver<bool>,
) {
    let InboundGates { gate, handshakes } = gates;
    while let Some((stream, peer, place)) = gate.accept(&listener, &mut shutdown).await {
        let Some(handshaking) = handshakes.admit(peer) else {
            continue;
        };
        let inbound = inbound.clone();
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        let gate = gate.clone();
        tracker.spawn(async move {
            let accepted = tls.accept(stream, peer).await;
            drop(handshaking);
            let Some(accepted) = accepted else {
                return;
            };
            if accepted.tunnel {
                let guards: Vec<PeerGuard> = accepted.guard.into_iter().collect();
                let tunnel = inbound.get_ref().tcp(
                    accepted.stream,
                    &accepted.service,
                    &accepted.peer,
                    CONNECT_TIMEOUT,
                );
                tokio::select! {
                    _ = tunnel => {}
                    _ = any_revoked(&guards) => {}
                }
                drop(place);
            } else {
                let client = ClientAddr::mesh(
                    peer,
                    accepted.peer,
                    Arc::from(accepted.service),
                    accepted.guard,
                );
                serve_conn(gate, accepted.stream, place, client, inbound, shutdown).await
            }
        });
    }
}

#[cfg(test)]
mod tests;
