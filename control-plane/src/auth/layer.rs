//! The tower layer in front of every gRPC service: it sees the method path
//! (which a tonic interceptor does not), authenticates the caller and
//! refuses before any handler runs or anything is stored.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use tonic::{Status, transport::server::TcpConnectInfo};

use super::{Principal, required};
use crate::{tls::PeerInfo, tokens::Tokens};

/// How a caller is told to authenticate.
const MISSING: &str = "missing bearer token: pass --token, ISDP_TOKEN or <data-dir>/admin.token \
     to isdpctl, --join-token or ISDP_JOIN_TOKEN to a sidecar, or `authorization: Bearer <token>` \
     metadata";

#[derive(Clone)]
pub struct AuthLayer {
    tokens: Tokens,
}

impl AuthLayer {
    pub fn new(tokens: Tokens) -> Self {
        AuthLayer { tokens }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            tokens: self.tokens.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    tokens: Tokens,
}

// === impl Auth ===

impl<S> Auth<S> {
    /// The caller of `req`, or why it is refused. Every method needs an
    /// authenticated caller; a path without a row in the table needs admin.
    fn authorize<B>(&self, req: &http::Request<B>) -> Result<Principal, Status> {
        let path = req.uri().path();
        let need = required(path);
        let principal = self.authenticate(req)?;
        let method = path.trim_start_matches('/').trim_start_matches("isdp.v1.");
        need.check(principal.role).map_err(|want| {
            Status::permission_denied(format!(
                "{method} needs role {want}; token has {}",
                principal.role.name()
            ))
        })?;
        Ok(principal)
    }

    /// The bearer token if it is valid; otherwise the client certificate's
    /// SPIFFE ID, so a sidecar that joined with a token and has since been
    /// certified keeps working when that token expires. Revoking the token
    /// refuses the certificates issued under it as well.
    fn authenticate<B>(&self, req: &http::Request<B>) -> Result<Principal, Status> {
        let token_error = match req.headers().get(http::header::AUTHORIZATION) {
            Some(value) => match self.token(value) {
                Ok(principal) => return Ok(principal),
                Err(e) => Some(e),
            },
            None => None,
        };
        let peer = req.extensions().get::<PeerInfo>();
        if let Some(peer) = peer
            && let Some(service) = peer.service.clone()
        {
            let grant = peer.grant.clone();
            if let Some(g) = &grant
                && !self.tokens.exists(&g.token)
            {
                return Err(Status::unauthenticated(format!(
                    "the client certificate was issued under token {}, which has been revoked",
                    g.token
                )));
            }
            return Ok(Principal {
                id: peer.spiffe_id.clone().unwrap_or_default(),
                role: crate::tokens::Role::Join,
                services: vec![service],
                upstreams: grant.as_ref().and_then(|g| g.upstreams.clone()),
                grant: grant.map(|g| g.token),
            });
        }
        Err(token_error.unwrap_or_else(|| Status::unauthenticated(MISSING)))
    }

    fn token(&self, value: &http::HeaderValue) -> Result<Principal, Status> {
        let secret = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                Status::unauthenticated("malformed authorization: expected `Bearer <token>`")
            })?;
        let token = self
            .tokens
            .verify(secret)
            .ok_or_else(|| Status::unauthenticated("unknown, expired or revoked token"))?;
        Ok(Principal {
            grant: Some(token.id.clone()),
            id: token.id,
            role: token.role,
            upstreams: (!token.upstreams.is_empty()).then_some(token.upstreams),
            services: token.services,
        })
    }
}

impl<S, B, RB> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // Services learn the caller's address as tonic offers it
        // (`Request::remote_addr`, which the xDS engine records for
        // `isdpctl proxy-status`); tonic knows only its own listeners'
        // connection info, and ours is `PeerInfo`.
        if let Some(remote) = req.extensions().get::<PeerInfo>().and_then(|p| p.remote) {
            req.extensions_mut().insert(TcpConnectInfo {
                local_addr: None,
                remote_addr: Some(remote),
            });
        }
        match self.authorize(&req) {
            Ok(principal) => {
                req.extensions_mut().insert(principal);
                Box::pin(self.inner.call(req))
            }
            Err(status) => {
                tracing::debug!(path = ?req.uri().path(), code = ?status.code(), message = status.message(), "refused a call");
                let resp = status.into_http::<RB>();
                Box::pin(async move { Ok(resp) })
            }
        }
    }
}
