//! Authentication and each route's row, in front of every handler.
//!
//! The credential is a bearer token, as on gRPC: `Authorization: Bearer
//! <secret>`, or Consul's `X-Consul-Token: <secret>` (what Prometheus,
//! consul-template and Consul's own clients send). Tokens are verified by
//! the same code as the gRPC auth layer's (`crate::auth::token_principal`),
//! and the route's [`crate::auth::Need`] is checked with the same rule.
//! Client certificates are not taken here: discovery tools present none.

use axum::{
    extract::{MatchedPath, Request, State},
    middleware::Next,
    response::Response,
};

use std::sync::Arc;

use super::{
    HttpError,
    routes::{self, Credential, SessionAuth},
};
use crate::{
    auth::{Principal, token_principal},
    tls::PeerInfo,
    tokens::Tokens,
};

/// Consul's header for an ACL token.
pub const CONSUL_TOKEN: &str = "x-consul-token";

const MISSING: &str = "missing bearer token: send `Authorization: Bearer <token>` or \
                       `X-Consul-Token: <token>` (an admin's is in <data-dir>/admin.token; \
                       others come from `isdpctl token create`)";

/// What the middleware authenticates with.
#[derive(Clone)]
pub struct Gate {
    pub tokens: Tokens,
    /// The dashboard's sessions, when it is mounted.
    pub sessions: Option<Arc<dyn SessionAuth>>,
}

/// Authenticates the request, checks its route's row and puts the
/// [`Principal`] into its extensions for the handler.
pub async fn authorize(
    State(gate): State<Gate>,
    matched: Option<MatchedPath>,
    mut req: Request,
    next: Next,
) -> Result<Response, HttpError> {
    let method = req.method().as_str().to_owned();
    let path = matched.as_ref().map_or("", |m| m.as_str());
    // Routes without a row cannot be mounted; refused all the same.
    let Some(route) = routes::lookup(&method, path) else {
        return Err(unlisted(&method, path));
    };
    let principal = match (route.credential, &gate.sessions) {
        (Credential::Public, _) => return Ok(next.run(req).await),
        (Credential::Bearer, _) => authenticate(&gate.tokens, &req)?,
        (Credential::Session, Some(sessions)) => match sessions.principal(&req) {
            Ok(p) => p,
            Err(refused) => return Ok(*refused),
        },
        (Credential::Session, None) => {
            return Err(super::error::no_route(req.method().clone(), req.uri().clone()).await);
        }
    };
    route.need.check(principal.role).map_err(|_| {
        HttpError::forbidden(format!(
            "{method} {path} needs role {}; token has {}",
            routes::need_name(route.need),
            principal.role.name()
        ))
    })?;
    // Only an authenticated request lifts the connection's deadline for a
    // first request, as on gRPC.
    if let Some(peer) = req.extensions().get::<PeerInfo>() {
        peer.first_request.mark();
    }
    req.extensions_mut().insert(principal);
    Ok(next.run(req).await)
}

/// A method the path has no row for: 405 naming the ones it has.
fn unlisted(method: &str, path: &str) -> HttpError {
    let allowed: Vec<&str> = routes::all()
        .filter(|r| r.path == path)
        .map(|r| r.method)
        .collect();
    HttpError::new(
        http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} {path}: allowed {}", allowed.join(", ")),
    )
}

/// The principal of the request's token.
fn authenticate(tokens: &Tokens, req: &Request) -> Result<Principal, HttpError> {
    let headers = req.headers();
    let secret = match (
        headers.get(http::header::AUTHORIZATION),
        headers.get(CONSUL_TOKEN),
    ) {
        (Some(value), _) => value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                HttpError::unauthenticated("malformed authorization: expected `Bearer <token>`")
            })?,
        (None, Some(value)) => value.to_str().map(str::trim).map_err(|_| {
            HttpError::unauthenticated("malformed X-Consul-Token: expected the token's secret")
        })?,
        (None, None) => return Err(HttpError::unauthenticated(MISSING)),
    };
    Ok(token_principal(tokens, secret)?)
}
