//! The inbound listener: traffic from other sidecars (and direct HTTP
//! clients) for the services this sidecar fronts.
//!
//! One port serves mTLS only (`transport`): HTTP (HTTP/2 from sidecars,
//! HTTP/1.1 for upgrades) and tunnelled TCP, told apart by ALPN. The
//! destination is the service the client asked for in SNI (and whose
//! certificate it verified); `x-isdp-service`, when present, must agree.
//! A request's method and path are then put in canonical form
//! ([`super::canonical`]; 400 if they have none), and every request and
//! tunnel passes the destination's authorization policy
//! ([`super::authorize`]); a refusal is 403 `denied-by-policy`, or a
//! closed tunnel. A tunnel reaches only a service registered as `tcp`: one
//! to an HTTP or gRPC service would carry requests past every method and
//! path rule, so it is closed (counted as denied by `tunnel-to-http`).

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};

use super::observe::observe;
use super::{
    authorize::Authorizer,
    canonical,
    forward::{Dest, Forwarder, Hop},
    http::{Body, SERVICE_HEADER, error_response},
    outbound::{BoxFuture, ClientAddr, answer},
    tcp,
};
use crate::{
    authz::{Call, Decision},
    config::{Protocol, Service},
    metrics::{Direction, Metrics, RouteMetrics},
    tls::PeerIdentity,
};

/// A local service as the inbound side needs it.
#[derive(Clone, Debug)]
struct Local {
    name: Arc<str>,
    dest: Dest,
    protocol: Protocol,
    metrics: Arc<RouteMetrics>,
}

#[derive(Clone)]
pub struct Inbound {
    services: Arc<HashMap<String, Local>>,
    /// The service requests without `x-isdp-service` go to, when there is
    /// exactly one.
    default: Option<Arc<str>>,
    forwarder: Forwarder,
    authorizer: Authorizer,
}

impl Inbound {
    pub fn new(
        services: &[Service],
        forwarder: Forwarder,
        metrics: &Metrics,
        authorizer: Authorizer,
    ) -> Self {
        let map: HashMap<String, Local> = services
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    Local {
                        name: Arc::from(s.name.as_str()),
                        dest: Dest::new(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), s.port)),
                        protocol: s.protocol,
                        metrics: metrics.route(Direction::Inbound, &s.name),
                    },
                )
            })
            .collect();
        let default = (services.len() == 1).then(|| Arc::from(services[0].name.as_str()));
        Inbound {
            services: Arc::new(map),
            default,
            forwarder,
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
                tcp::splice(stream, conn).await
            }
            Err(e) => tracing::debug!(%service, error = %e, "local service refused tcp"),
        }
    }
}

impl tower::Service<Request<Body>> for Inbound {
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
            return answer(error_response(
                StatusCode::MISDIRECTED_REQUEST,
                "misdirected",
                format!("this connection is for {sni:?}, the request names {v:?}"),
            ));
        }
        let local = match &named {
            Some(v) => v.to_str().ok().and_then(|name| self.services.get(name)),
            None => sni
                .or(self.default.as_deref())
                .and_then(|d| self.services.get(d)),
        };
        let Some(local) = local.cloned() else {
            let detail = match &named {
                Some(v) => format!("this sidecar does not front {v:?}"),
                None => {
                    format!("no {SERVICE_HEADER} header and this sidecar fronts several services")
                }
            };
            return answer(error_response(
                StatusCode::NOT_FOUND,
                "unknown-service",
                detail,
            ));
        };
        if let Err(refusal) = canonical::canonicalize(&mut req) {
            let target = req.uri().to_string();
            let method = req.method().as_str();
            self.authorizer
                .malformed(&local.name, caller(&req), refusal.as_str(), method, &target);
            return observe(
                local.metrics.clone(),
                Box::pin(async move { Ok(refusal.response()) }),
            );
        }
        let call = Call {
            source: caller(&req),
            method: Some(req.method().as_str()),
            path: Some(req.uri().path()),
        };
        if let Decision::Deny { .. } = self.authorizer.check(&local.name, call) {
            return observe(
                local.metrics.clone(),
                Box::pin(async move {
                    Ok(error_response(
                        StatusCode::FORBIDDEN,
                        "denied-by-policy",
                        format!("{} does not allow this caller", local.name),
                    ))
                }),
            );
        }
        let grpc = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        let hop = if local.protocol == Protocol::Grpc || grpc {
            Hop::Http2
        } else {
            Hop::Http1
        };
        let forwarder = self.forwarder.clone();
        let metrics = local.metrics.clone();
        observe(
            metrics,
            Box::pin(async move { Ok(forwarder.forward(req, &local.dest, hop).await) }),
        )
    }
}

/// The calling sidecar's SPIFFE ID, carried by every request of an mTLS
/// connection.
fn caller<B>(req: &Request<B>) -> Option<&str> {
    req.extensions()
        .get::<ClientAddr>()
        .and_then(|c| c.peer.as_ref())
        .map(|p| &*p.0)
}

#[cfg(test)]
mod tests;
