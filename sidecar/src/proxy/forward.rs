//! Sends a request one hop further, over pooled connections, and turns
//! transport failures into responses that say what went wrong.
//!
//! Two pools: HTTP/2 (multiplexed; between sidecars and to gRPC services)
//! and HTTP/1.1 (to plain HTTP services, and for protocol upgrades such as
//! WebSocket, which HTTP/2 cannot carry without extended CONNECT).

use std::{io, net::SocketAddr, time::Duration};

use http::{HeaderValue, Request, Response, StatusCode, Uri, Version, header};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo, TokioTimer},
};

use super::{
    http::{Body, boxed, error_response, is_upgrade, strip_hop_by_hop},
    transport,
};

/// Which protocol the next hop speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hop {
    Http1,
    Http2,
}

mod h2;

#[derive(Clone)]
pub struct Forwarder {
    h1: Client<HttpConnector, Body>,
    h2: h2::H2Pool,
}

impl Forwarder {
    pub fn new(connect_timeout: Duration) -> Self {
        let connector = transport::connector(connect_timeout);
        let h1 = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector.clone());
        let h2 = h2::H2Pool::new(connect_timeout);
        Forwarder { h1, h2 }
    }

    /// Forwards `req` to `addr`. The request keeps its method, path, body
    /// and (in `Host`) its original authority.
    pub async fn forward(
        &self,
        mut req: Request<Body>,
        addr: SocketAddr,
        hop: Hop,
    ) -> Response<Body> {
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
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        *req.uri_mut() = match Uri::builder()
            .scheme("http")
            .authority(addr.to_string())
            .path_and_query(path)
            .build()
        {
            Ok(u) => u,
            Err(e) => return error_response(StatusCode::BAD_REQUEST, "bad-request", e),
        };
        strip_hop_by_hop(req.headers_mut(), upgrade);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let result = match hop {
            Hop::Http1 => {
                *req.version_mut() = Version::HTTP_11;
                self.h1.request(req).await.map_err(Failure::H1)
            }
            Hop::Http2 => {
                *req.version_mut() = Version::HTTP_2;
                self.h2.send(addr, req).await.map_err(Failure::H2)
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
            tokio::spawn(async move {
                match tokio::try_join!(client_side, upstream_side) {
                    Ok((c, u)) => {
                        let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                        if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                            tracing::debug!(error = %e, "upgraded connection ended");
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "protocol upgrade failed"),
                }
            });
            return resp.map(boxed);
        }
        strip_hop_by_hop(resp.headers_mut(), false);
        resp.map(boxed)
    }
}

enum Failure {
    H1(hyper_util::client::legacy::Error),
    H2(h2::H2Error),
}

/// The last I/O error kind in an error's source chain.
fn io_kind(e: &(dyn std::error::Error + 'static)) -> Option<io::ErrorKind> {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut kind = None;
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            kind = Some(io.kind());
        }
        src = s.source();
    }
    kind
}

impl Failure {
    /// Maps a transport failure to 502/504 with the cause in `x-isdp-error`.
    fn response(self, addr: SocketAddr) -> Response<Body> {
        if let Failure::H2(h2::H2Error::Request(e)) = &self {
            tracing::debug!(%addr, error = %e, "request to peer failed");
        }
        let connect = match &self {
            Failure::H1(e) if e.is_connect() => Some(io_kind(e)),
            Failure::H2(h2::H2Error::Connect(e)) => Some(Some(e.kind())),
            _ => None,
        };
        match connect {
            Some(Some(io::ErrorKind::ConnectionRefused)) => error_response(
                StatusCode::BAD_GATEWAY,
                "connect-refused",
                format!("{addr} refused the connection"),
            ),
            Some(Some(io::ErrorKind::TimedOut)) => error_response(
                StatusCode::GATEWAY_TIMEOUT,
                "connect-timeout",
                format!("connecting to {addr} timed out"),
            ),
            Some(_) => error_response(
                StatusCode::BAD_GATEWAY,
                "connect-failed",
                format!("connecting to {addr} failed"),
            ),
            None => error_response(
                StatusCode::BAD_GATEWAY,
                "upstream-reset",
                format!("{addr} closed or reset the connection before a full response"),
            ),
        }
    }
}
