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
//! and one per upstream that sets `listen`. On shutdown every listener stops
//! accepting, open HTTP connections finish their in-flight requests
//! (`graceful_shutdown`), and everything still open after the drain timeout
//! is dropped.

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
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tower::Layer;

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
    /// secures every hop between sidecars.
    pub async fn serve(
        self,
        config: &Config,
        upstreams: Upstreams,
        metrics: &Metrics,
        tls: Tls,
        policies: watch::Receiver<Arc<crate::authz::Policies>>,
        shutdown: watch::Receiver<bool>,
    ) {
        let tracker = Tracker::new();
        let forwarder = Forwarder::new(CONNECT_TIMEOUT).with_tls(tls.clone());
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
            out,
            tracker.clone(),
            shutdown.clone(),
        )));

        for (u, listener) in self.upstreams {
            let name: Arc<str> = Arc::from(u.name.as_str());
            let task = match u.protocol {
                Protocol::Tcp => tokio::spawn(tcp::serve_outbound(
                    listener,
                    name,
                    upstreams.clone(),
                    CONNECT_TIMEOUT,
                    tls.clone(),
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
                    tokio::spawn(serve_http(listener, svc, tracker.clone(), shutdown.clone()))
                }
            };
            accept_loops.push(task);
        }

        let inbound = trace::TraceInboundLayer(tracing).layer(inbound::Inbound::new(
            &config.services,
            forwarder,
            metrics,
            inbound::Authorizer::new(policies, metrics.clone()),
        ));
        accept_loops.push(tokio::spawn(serve_inbound(
            self.inbound,
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

/// Resolves once shutdown has begun (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

async fn accept(
    listener: &TcpListener,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            _ = stopped(shutdown) => return None,
            r = listener.accept() => match r {
                Ok((s, peer)) => {
                    let _ = s.set_nodelay(true);
                    return Some((s, peer));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Serves one HTTP connection (HTTP/1.1 or HTTP/2, with upgrades) from
/// `client` with `svc`; on shutdown, finishes in-flight requests and
/// closes. On an mTLS connection `client` names the calling sidecar and the
/// service it asked for (SNI), and holds the guard on its token: once that
/// is revoked, requests are refused (403 `peer-revoked`) and the connection
/// is closed at once, in-flight requests with it.
async fn serve_conn<S, IO>(
    stream: IO,
    client: ClientAddr,
    svc: S,
    mut shutdown: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Next + Sync,
{
    let peer = client.addr;
    let guards: Vec<PeerGuard> = client.guard.iter().cloned().collect();
    let hyper_svc = hyper::service::service_fn(move |req: Request<Incoming>| {
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
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), hyper_svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "http connection ended with an error");
            }
            return;
        }
        _ = any_revoked(&guards) => return,
        _ = stopped(&mut shutdown) => {}
    }
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        _ = conn => {}
        _ = any_revoked(&guards) => {}
    }
}

async fn serve_http<S>(
    listener: TcpListener,
    svc: S,
    tracker: Tracker,
    mut shutdown: watch::Receiver<bool>,
) where
    S: Next + Sync,
{
    while let Some((stream, peer)) = accept(&listener, &mut shutdown).await {
        tracker.spawn(serve_conn(
            stream,
            ClientAddr::new(peer),
            svc.clone(),
            shutdown.clone(),
        ));
    }
}

/// Accepts mesh traffic: the TLS handshake runs in each connection's own
/// task (the accept loop never waits on a peer), then ALPN picks HTTP or a
/// TCP tunnel. Either ends when the caller's token is revoked.
async fn serve_inbound(
    listener: TcpListener,
    inbound: trace::TraceInbound<inbound::Inbound>,
    tls: Tls,
    tracker: Tracker,
    mut shutdown: watch::Receiver<bool>,
) {
    while let Some((stream, peer)) = accept(&listener, &mut shutdown).await {
        let inbound = inbound.clone();
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        tracker.spawn(async move {
            let Some(accepted) = tls.accept(stream, peer).await else {
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
            } else {
                let client = ClientAddr::mesh(
                    peer,
                    accepted.peer,
                    Arc::from(accepted.service),
                    accepted.guard,
                );
                serve_conn(accepted.stream, client, inbound, shutdown).await
            }
        });
    }
}

#[cfg(test)]
mod tests;
