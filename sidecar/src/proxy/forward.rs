//! Sends a request one hop further, over pooled connections, and turns
//! transport failures into responses that say what went wrong.
//!
//! Two pools: HTTP/2 (`h2`: one multiplexed connection per peer; between
//! sidecars and to gRPC services) and HTTP/1.1 (`h1`: to plain HTTP
//! services, and for protocol upgrades such as WebSocket, which HTTP/2
//! cannot carry without extended CONNECT).

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use http::{
    HeaderValue, Request, Response, StatusCode, Uri, Version, header,
    uri::{PathAndQuery, Scheme},
};
use hyper_util::rt::TokioIo;

use super::http::{is_upgrade, strip_hop_by_hop};
use super::svc::{Body, ClientAddr, Dest, ProxyError, boxed};
use super::transport::Tls;
use crate::listener::tunnel::{Kind, Tunnels};
use crate::metrics::Direction;
use crate::tls::{PeerGuard, any_revoked};

/// Which protocol the next hop speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hop {
    Http1,
    Http2,
}

mod h1;
mod h2;

/// How to reach a mesh destination: the TLS handle and the service named
/// in SNI.
pub type Mesh<'a> = Option<(&'a Tls, &'a Arc<str>)>;

/// Why a request could not be sent to its next hop.
#[derive(Debug)]
pub enum SendError {
    Connect(io::Error),
    Request(hyper::Error),
    /// A breaker cap (`max_pending_requests`, `max_connections`) refused
    /// to open another connection.
    Overflow(&'static str),
}

#[derive(Clone)]
pub struct Forwarder {
    h1: h1::H1Pool,
    h2: h2::H2Pool,
    /// mTLS to other sidecars; None where only plaintext hops exist.
    tls: Option<Tls>,
    /// Upgraded connections are closed once silent (`tcp_idle_timeout`).
    tunnels: Tunnels,
}

impl Forwarder {
    pub fn new(connect_timeout: Duration, tunnels: Tunnels) -> Self {
        Forwarder {
            h1: h1::H1Pool::new(connect_timeout),
            h2: h2::H2Pool::new(connect_timeout),
            tls: None,
            tunnels,
        }
    }

    /// The idle timeout of upgraded connections, which tunnels share.
    pub fn tunnels(&self) -> &Tunnels {
        &self.tunnels
    }

    /// Lets the forwarder reach other sidecars ([`Dest::mesh`]).
    pub fn with_tls(mut self, tls: Tls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Forwards `req` to `dest`. The request keeps its method, path, body
    /// and (in `Host`) its original authority.
    pub async fn forward(&self, mut req: Request<Body>, dest: &Dest, hop: Hop) -> Response<Body> {
        let upgrade = is_upgrade(&req);
        let hop = if upgrade { Hop::Http1 } else { hop };
        if !req.headers().contains_key(header::HOST)
            && let Some(v) = req
                .uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            req.headers_mut().insert(header::HOST, v);
        }
        // The path moves over as is (no copy, no reparse). HTTP/1.1 wants
        // origin form; HTTP/2 names the peer in `:authority`.
        let path = std::mem::take(req.uri_mut())
            .into_parts()
            .path_and_query
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *req.uri_mut() = match hop {
            Hop::Http1 => Uri::from(path),
            Hop::Http2 => {
                let mut parts = http::uri::Parts::default();
                parts.scheme = Some(Scheme::HTTP);
                parts.authority = Some(dest.authority.clone());
                parts.path_and_query = Some(path);
                Uri::from_parts(parts).expect("scheme, authority and path make a URI")
            }
        };
        strip_hop_by_hop(req.headers_mut(), upgrade);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        // An upgraded connection outlives its request: it ends when the
        // token of the sidecar on either side is revoked, or when it has
        // been silent for the idle timeout. Its direction is the
        // listener's: a mesh client (SNI named a local service) is inbound.
        let mut guards: Vec<PeerGuard> = Vec::new();
        let mut direction = Direction::Outbound;
        if upgrade && let Some(client) = req.extensions().get::<ClientAddr>() {
            guards.extend(client.guard.clone());
            if client.service.is_some() {
                direction = Direction::Inbound;
            }
        }
        let addr = dest.addr;
        let mesh = match (&dest.service, &self.tls) {
            (None, _) => None,
            (Some(service), Some(tls)) => Some((tls, service)),
            (Some(_), None) => {
                let e = io::Error::other("no mTLS configured for a sidecar destination");
                return SendError::Connect(e).response(addr);
            }
        };
        let result = match hop {
            Hop::Http1 => {
                *req.version_mut() = Version::HTTP_11;
                self.h1.send(addr, mesh, req).await
            }
            Hop::Http2 => {
                *req.version_mut() = Version::HTTP_2;
                self.h2.send(addr, mesh, req).await.map(|r| r.map(boxed))
            }
        };
        let mut resp = match result {
            Ok(r) => r,
            Err(e) => return e.response(addr),
        };
        if let (Some(client_side), StatusCode::SWITCHING_PROTOCOLS) =
            (client_upgrade, resp.status())
        {
            let upstream_side = hyper::upgrade::on(&mut resp);
            guards.extend(resp.extensions_mut().remove::<PeerGuard>());
            let tunnels = self.tunnels.clone();
            tokio::spawn(async move {
                match tokio::try_join!(client_side, upstream_side) {
                    Ok((c, u)) => {
                        let (c, u) = (TokioIo::new(c), TokioIo::new(u));
                        tokio::select! {
                            _ = tunnels.splice(c, u, direction, Kind::Upgrade) => {}
                            _ = any_revoked(&guards) => {}
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "protocol upgrade failed"),
                }
            });
            return resp;
        }
        strip_hop_by_hop(resp.headers_mut(), false);
        resp
    }
}

impl SendError {
    /// Maps a transport failure to 502/504 with the cause in `x-isdp-error`.
    fn response(self, addr: SocketAddr) -> Response<Body> {
        let connect = match &self {
            SendError::Connect(e) => Some(e.kind()),
            SendError::Request(e) => {
                tracing::debug!(%addr, error = %e, "request to next hop failed");
                None
            }
            SendError::Overflow(cap) => {
                return ProxyError::Overflow
                    .response(format!("the upstream is at its {cap} limit"));
            }
        };
        match connect {
            Some(io::ErrorKind::ConnectionRefused) => {
                ProxyError::ConnectRefused.response(format!("{addr} refused the connection"))
            }
            Some(io::ErrorKind::TimedOut) => {
                ProxyError::ConnectTimeout.response(format!("connecting to {addr} timed out"))
            }
            Some(_) => ProxyError::ConnectFailed.response(format!("connecting to {addr} failed")),
            None => ProxyError::UpstreamReset.response(format!(
                "{addr} closed or reset the connection before a full response"
            )),
        }
    }
}
