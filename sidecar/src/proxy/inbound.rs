//! The inbound listener's request path: traffic from other sidecars (and
//! direct HTTP clients) for the services this sidecar fronts.
//!
//! One port serves mTLS only (`transport`): HTTP (HTTP/2 from sidecars,
//! HTTP/1.1 for upgrades) and tunnelled TCP, told apart by ALPN. The
//! destination is the service the client asked for in SNI (and whose
//! certificate it verified); `x-isdp-service`, when present, must agree
//! (421 `misdirected`), and must name a local service (404
//! `unknown-service`). [`Inbound`] picks the local service and hands the
//! request to that service's stack of named tower layers, one file each,
//! in the order a request meets them:
//!
//! `Observe` (the service's metrics, in `observe`) -> `Canonical` (method
//! and path put in canonical form, 400 if they have none, `canonical`) ->
//! `Authorize` (the destination's authorization policy, 403
//! `denied-by-policy`, `authorize`) -> `Deliver` (to `127.0.0.1:<port>`,
//! `deliver`).
//!
//! Spans and the access log wrap it all (`trace::TraceInbound`). A tunnel
//! passes the same authorization ([`Inbound::tcp`]), and reaches only a
//! service registered as `tcp`: one to an HTTP or gRPC service would carry
//! requests past every method and path rule, so it is closed (counted as
//! denied by `tunnel-to-http`).

mod authorize;
mod canonical;
mod deliver;

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite};
use tower::{Layer, Service};

use super::{
    forward::Forwarder,
    http::SERVICE_HEADER,
    observe::{Observe, ObserveLayer},
    svc::{Body, BoxFuture, ClientAddr, Dest, ProxyError, answer},
    tcp,
};
use crate::{
    authz::Call,
    config::{Protocol, Service as LocalConfig},
    listener::tunnel::{Kind, Tunnels},
    load_report::LocalLoad,
    metrics::{Direction, Metrics, RouteMetrics},
    tls::PeerIdentity,
};

pub use authorize::{Authorize, AuthorizeLayer, Authorizer, TUNNEL_TO_HTTP};
pub use canonical::{Canonical, CanonicalLayer, Refusal, canonicalize};
pub use deliver::Deliver;

/// One local service's request path, in order.
pub type LocalStack = Observe<Canonical<Authorize<Deliver>>>;

/// A local service as the inbound side needs it.
#[derive(Clone)]
struct Local {
    dest: Dest,
    protocol: Protocol,
    metrics: Arc<RouteMetrics>,
    stack: LocalStack,
}

#[derive(Clone)]
pub struct Inbound {
    services: Arc<HashMap<String, Local>>,
    /// The service requests without `x-isdp-service` go to, when there is
    /// exactly one.
    default: Option<Arc<str>>,
    authorizer: Authorizer,
    /// Tunnels are closed once silent (`tcp_idle_timeout`).
    tunnels: Tunnels,
}

impl Inbound {
    /// `loads` are the services' load meters, in the same order (a
    /// service without one gets its own).
    pub fn new(
        services: &[LocalConfig],
        loads: &[Arc<LocalLoad>],
        forwarder: Forwarder,
        metrics: &Metrics,
        authorizer: Authorizer,
    ) -> Self {
        let map: HashMap<String, Local> = services
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let name: Arc<str> = Arc::from(s.name.as_str());
                let dest = Dest::new(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), s.port));
                let route = metrics.route(Direction::Inbound, &s.name);
                let deliver = Deliver {
                    dest: dest.clone(),
                    protocol: s.protocol,
                    forwarder: forwarder.clone(),
                    load: loads
                        .get(i)
                        .cloned()
                        .unwrap_or_else(|| LocalLoad::new(&s.name)),
                };
                let authorize = AuthorizeLayer {
                    service: name.clone(),
                    authorizer: authorizer.clone(),
                }
                .layer(deliver);
                let canonical = CanonicalLayer {
                    service: name,
                    authorizer: authorizer.clone(),
                }
                .layer(authorize);
                let stack = ObserveLayer::route(route.clone()).layer(canonical);
                let local = Local {
                    dest,
                    protocol: s.protocol,
                    metrics: route,
                    stack,
                };
                (s.name.clone(), local)
            })
            .collect();
        let default = (services.len() == 1).then(|| Arc::from(services[0].name.as_str()));
        Inbound {
            tunnels: forwarder.tunnels().clone(),
            services: Arc::new(map),
            default,
            authorizer,
        }
    }

    /// Hands a tunnelled TCP connection to its local service. `peer` is
    /// the calling sidecar, for authorization.
    pub async fn tcp<S>(
        &self,
        stream: S,
        service: &str,
        peer: &PeerIdentity,
        connect_timeout: Duration,
    ) where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let Some(local) = self.services.get(service) else {
            tracing::debug!(%service, peer = %peer.0, "tcp for an unknown local service; closing");
            return;
        };
        if local.protocol != Protocol::Tcp {
            self.authorizer.refuse_tunnel(service, &peer.0);
            return;
        }
        let call = Call {
            source: Some(&peer.0),
            method: None,
            path: None,
        };
        if !self.authorizer.check(service, call).is_allowed() {
            return;
        }
        match super::transport::connect(local.dest.addr, connect_timeout).await {
            Ok(conn) => {
                let _open = tcp::OpenConnection::new(&local.metrics);
                let tunnels = &self.tunnels;
                tunnels
                    .splice(stream, conn, Direction::Inbound, Kind::Tcp)
                    .await;
            }
            Err(e) => tracing::debug!(%service, error = %e, "local service refused tcp"),
        }
    }
}

impl Service<Request<Body>> for Inbound {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Body>) -> BoxFuture {
        let named = req.headers_mut().remove(&SERVICE_HEADER);
        // Over mTLS the connection is for the service named in SNI, the one
        // the caller authenticated; a request may not name another.
        let sni = req
            .extensions()
            .get::<ClientAddr>()
            .and_then(|c| c.service.as_deref());
        if let (Some(v), Some(sni)) = (&named, sni)
            && v.as_bytes() != sni.as_bytes()
        {
            return answer(ProxyError::Misdirected.response(format!(
                "this connection is for {sni:?}, the request names {v:?}"
            )));
        }
        let local = match &named {
            Some(v) => v.to_str().ok().and_then(|name| self.services.get(name)),
            None => sni
                .or(self.default.as_deref())
                .and_then(|d| self.services.get(d)),
        };
        let Some(local) = local else {
            let detail = match &named {
                Some(v) => format!("this sidecar does not front {v:?}"),
                None => {
                    format!("no {SERVICE_HEADER} header and this sidecar fronts several services")
                }
            };
            return answer(ProxyError::UnknownService.response(detail));
        };
        local.stack.clone().call(req)
    }
}

/// The calling sidecar's SPIFFE ID, carried by every request of an mTLS
/// connection.
fn caller<B>(req: &Request<B>) -> Option<&str> {
    PeerIdentity::of(req).map(|p| &*p.0)
}

#[cfg(test)]
mod tests;
