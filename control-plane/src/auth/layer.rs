//! The tower layer in front of every gRPC service: it sees the method path
//! (which a tonic interceptor does not), authenticates the caller and
//! refuses before any handler runs or anything is stored; it counts each
//! streaming call against its principal ([`super::streams`]) and bounds it
//! by the credential that opened it ([`super::lifetime`],
//! [`super::bounded`]). Each refusal is logged with the reason the caller
//! was given, at warn level within the server's bound on lines clients can
//! cause (the xDS engine's [`LogRate`], shared), at debug level beyond it:
//! an operator sees why a client is turned away (a revoked token, an
//! expired certificate, a missing role), and a client retrying cannot
//! flood the log.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use isdp_xds::LogRate;
use tonic::{Status, body::Body, transport::server::TcpConnectInfo};

use super::{
    Principal,
    bounded::{BoundedRequest, BoundedResponse},
    lifetime::Lifetime,
    methods::{stream_group, streams},
    required,
    streams::OpenStreams,
};
use crate::{
    ca::{rfc3339, unix_ms},
    tls::PeerInfo,
    tokens::Tokens,
};

/// How a caller is told to authenticate.
const MISSING: &str = "missing bearer token: pass --token, ISDP_TOKEN or <data-dir>/admin.token \
     to isdpctl, --join-token or ISDP_JOIN_TOKEN to a sidecar, or `authorization: Bearer <token>` \
     metadata";

#[derive(Clone)]
pub struct AuthLayer {
    tokens: Tokens,
    streams: OpenStreams,
    log: LogRate,
}

impl AuthLayer {
    /// Authenticating with `tokens`, and admitting at most
    /// `max_streams_per_principal` open calls of each streaming method
    /// group per principal (`--max-streams-per-principal`); refusals are
    /// logged within `log`.
    pub fn new(tokens: Tokens, max_streams_per_principal: usize, log: LogRate) -> Self {
        AuthLayer {
            tokens,
            streams: OpenStreams::new(max_streams_per_principal),
            log,
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            tokens: self.tokens.clone(),
            streams: self.streams.clone(),
            log: self.log.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    tokens: Tokens,
    streams: OpenStreams,
    log: LogRate,
}

/// The principal of the bearer token `secret`, or UNAUTHENTICATED saying
/// why not (unknown, expired, revoked). The gRPC layer and the HTTP API
/// (`crate::http`) both authenticate tokens here.
pub fn token_principal(tokens: &Tokens, secret: &str) -> Result<Principal, Status> {
    let token = tokens
        .verify(secret)
        .map_err(|e| Status::unauthenticated(e.to_string()))?;
    Ok(Principal {
        grant: Some(token.id.clone()),
        grant_expires_at_unix_ms: (token.expires_at_unix_ms != 0)
            .then_some(token.expires_at_unix_ms),
        id: token.id,
        role: token.role,
        upstreams: (!token.upstreams.is_empty()).then_some(token.upstreams),
        services: token.services,
    })
}

// === impl Auth ===

impl<S> Auth<S> {
    /// The caller of `req`, or why it is refused. Every method needs an
    /// authenticated caller; a path without a row in the table needs admin.
    fn authorize<B>(&self, req: &http::Request<B>) -> Result<(Principal, Lifetime), Status> {
        let path = req.uri().path();
        let need = required(path);
        let (principal, lifetime) = self.authenticate(req)?;
        let method = path.trim_start_matches('/').trim_start_matches("isdp.v1.");
        need.check(principal.role).map_err(|want| {
            Status::permission_denied(format!(
                "{method} needs role {want}; token has {}",
                principal.role.name()
            ))
        })?;
        Ok((principal, lifetime))
    }

    /// The bearer token if it is valid; otherwise the client certificate's
    /// SPIFFE ID, so a caller whose token is unknown here can still be
    /// served on its certificate. The certificate stands on the token it
    /// was issued under: revoked or expired, that token refuses the
    /// certificate as well. Each principal comes with what ends it.
    fn authenticate<B>(&self, req: &http::Request<B>) -> Result<(Principal, Lifetime), Status> {
        let token_error = match req.headers().get(http::header::AUTHORIZATION) {
            Some(value) => match self.token(value) {
                Ok(authenticated) => return Ok(authenticated),
                Err(e) => Some(e),
            },
            None => None,
        };
        if let Some(peer) = req.extensions().get::<PeerInfo>()
            && let Some(service) = peer.service.clone()
        {
            return self.certificate(peer, service);
        }
        Err(token_error.unwrap_or_else(|| Status::unauthenticated(MISSING)))
    }

    /// Logs why `req` was refused: at warn level while the server's log
    /// rate admits it, at debug level otherwise. The path and the reason
    /// (which may quote the path) are client-supplied: written quoted,
    /// with control characters escaped.
    fn log_refusal<B>(&self, req: &http::Request<B>, status: &Status) {
        let path = req.uri().path();
        let peer = req.extensions().get::<PeerInfo>().and_then(|p| p.remote);
        let (code, reason) = (status.code(), status.message());
        if self.log.admit() {
            tracing::warn!(?path, ?code, ?peer, ?reason, "refused a call");
        } else {
            tracing::debug!(?path, ?code, ?peer, ?reason, "refused a call");
        }
    }

    fn token(&self, value: &http::HeaderValue) -> Result<(Principal, Lifetime), Status> {
        let secret = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                Status::unauthenticated("malformed authorization: expected `Bearer <token>`")
            })?;
        let principal = token_principal(&self.tokens, secret)?;
        let lifetime = Lifetime::token(
            &principal.id,
            principal.grant_expires_at_unix_ms.unwrap_or(0),
        );
        Ok((principal, lifetime))
    }

    /// A join principal for the certificate's service, with its grant's
    /// scope, until the certificate or its grant expires or the grant is
    /// revoked. The handshake checked the certificate's dates, but a
    /// connection outlives its handshake: they are checked again per call.
    fn certificate(
        &self,
        peer: &PeerInfo,
        service: String,
    ) -> Result<(Principal, Lifetime), Status> {
        let spiffe_id = peer.spiffe_id.clone().unwrap_or_default();
        let now = unix_ms();
        let mut lifetime = Lifetime::default();
        if let Some(not_after) = peer.not_after_unix_ms {
            if not_after <= now {
                return Err(Status::unauthenticated(format!(
                    "the client certificate of {spiffe_id} expired at {}",
                    rfc3339(not_after)
                )));
            }
            lifetime = lifetime.expiring(not_after, || {
                format!("the client certificate of {spiffe_id}")
            });
        }
        let grant = peer.grant.clone();
        let mut grant_expires_at_unix_ms = None;
        if let Some(g) = &grant {
            let Some(token) = self.tokens.get(&g.token) else {
                return Err(Status::unauthenticated(format!(
                    "the client certificate was issued under token {}, which has been revoked",
                    g.token
                )));
            };
            if token.expired(now) {
                return Err(Status::unauthenticated(format!(
                    "the client certificate was issued under token {}, which expired at {}",
                    g.token,
                    rfc3339(token.expires_at_unix_ms)
                )));
            }
            lifetime.revoked_with = Some(g.token.clone());
            lifetime = lifetime.expiring(token.expires_at_unix_ms, || {
                format!(
                    "token {}, under which the client certificate was issued,",
                    g.token
                )
            });
            grant_expires_at_unix_ms =
                (token.expires_at_unix_ms != 0).then_some(token.expires_at_unix_ms);
        }
        let principal = Principal {
            id: spiffe_id,
            role: crate::tokens::Role::Join,
            services: vec![service],
            upstreams: grant.as_ref().and_then(|g| g.upstreams.clone()),
            grant: grant.map(|g| g.token),
            grant_expires_at_unix_ms,
        };
        Ok((principal, lifetime))
    }
}

impl<S> tower::Service<http::Request<Body>> for Auth<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        // Services learn the caller's address as tonic offers it
        // (`Request::remote_addr`, which the xDS engine records for
        // `isdpctl proxy-status`); tonic knows only its own listeners'
        // connection info, and ours is `PeerInfo`.
        let first_request = req
            .extensions()
            .get::<PeerInfo>()
            .map(|peer| peer.first_request.clone());
        if let Some(remote) = req.extensions().get::<PeerInfo>().and_then(|p| p.remote) {
            req.extensions_mut().insert(TcpConnectInfo {
                local_addr: None,
                remote_addr: Some(remote),
            });
        }
        let authorized = self.authorize(&req).and_then(|(principal, lifetime)| {
            let slot = stream_group(req.uri().path())
                .map(|group| self.streams.admit(&principal, group))
                .transpose()?;
            Ok((principal, lifetime, slot))
        });
        // A connection that carried a request from someone the server
        // knows no longer has a first-request deadline (`tls::Admission`).
        // One that carried only unauthenticated calls keeps it: otherwise
        // anyone reaching the port could hold every connection place with
        // one refused call each.
        let authenticated = match &authorized {
            Ok(_) => true,
            Err(status) => status.code() != tonic::Code::Unauthenticated,
        };
        if authenticated && let Some(first_request) = first_request {
            first_request.mark();
        }
        match authorized {
            Ok((principal, lifetime, slot)) => {
                req.extensions_mut().insert(principal);
                if !streams(req.uri().path()) {
                    return Box::pin(self.inner.call(req));
                }
                let end = lifetime.end(self.tokens.clone());
                let req = req.map(|body| Body::new(BoundedRequest::new(body, end.clone())));
                let call = self.inner.call(req);
                // The slot rides with the call until its response body
                // (which holds it) ends or is cut off.
                Box::pin(async move {
                    let resp = call.await?;
                    Ok(resp.map(|body| Body::new(BoundedResponse::new(body, end, slot))))
                })
            }
            Err(status) => {
                self.log_refusal(&req, &status);
                let resp = status.into_http::<Body>();
                Box::pin(async move { Ok(resp) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use super::*;
    use crate::{
        ca::grant::Grant,
        tokens::{Role, Scope},
    };

    /// A call on a connection whose client certificate is `peer`.
    fn call_with(peer: PeerInfo, bearer: Option<&str>) -> http::Request<()> {
        let mut req = http::Request::builder().uri("/isdp.v1.Sidecar/Session");
        if let Some(secret) = bearer {
            req = req.header("authorization", format!("Bearer {secret}"));
        }
        let mut req = req.body(()).unwrap();
        req.extensions_mut().insert(peer);
        req
    }

    fn web_certificate(grant: &str, not_after_unix_ms: i64) -> PeerInfo {
        PeerInfo {
            remote: None,
            spiffe_id: Some("spiffe://isdp.local/svc/web".into()),
            service: Some("web".into()),
            grant: Some(Grant {
                token: grant.into(),
                upstreams: Some(vec!["payments".into()]),
            }),
            not_after_unix_ms: Some(not_after_unix_ms),
            ..Default::default()
        }
    }

    /// A certificate stands on its grant: it carries the grant's expiry
    /// (which caps what is signed for it) and ends at the earlier of its
    /// own and the grant's; an expired certificate or grant is refused
    /// with UNAUTHENTICATED naming what expired and when.
    #[tokio::test]
    async fn a_certificate_lives_no_longer_than_its_grant() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::embedded::EmbeddedStore::open(dir.path()).unwrap();
        let tokens = Tokens::load(Arc::new(store), "/isdp/", Duration::from_secs(60))
            .await
            .unwrap();
        let join = || Scope::services(vec!["web".into()]);
        let ttl = Some(Duration::from_secs(600));
        let (token, secret) = tokens
            .create(Role::Join, join(), String::new(), ttl)
            .await
            .unwrap();
        let auth = Auth {
            inner: (),
            tokens: tokens.clone(),
            streams: OpenStreams::new(1),
            log: LogRate::default(),
        };
        let now = unix_ms();

        // By token: the token's expiry, and the token as the grant.
        let (p, lifetime) = auth
            .authenticate(&call_with(PeerInfo::default(), Some(&secret)))
            .unwrap();
        assert_eq!(p.grant_expires_at_unix_ms, Some(token.expires_at_unix_ms));
        assert_eq!(
            lifetime,
            Lifetime::token(&token.id, token.expires_at_unix_ms)
        );

        // A certificate outliving its grant ends with the grant...
        let long = web_certificate(&token.id, now + 3_600_000);
        let (p, lifetime) = auth.authenticate(&call_with(long, None)).unwrap();
        assert_eq!(p.upstreams, Some(vec!["payments".into()]));
        assert_eq!(p.grant_expires_at_unix_ms, Some(token.expires_at_unix_ms));
        assert_eq!(lifetime.revoked_with.as_deref(), Some(token.id.as_str()));
        let expiry = lifetime.expiry.unwrap();
        assert_eq!(expiry.at_unix_ms, token.expires_at_unix_ms);
        assert!(expiry.what.starts_with(&format!("token {}", token.id)));
        // ...and one that ends first with itself.
        let short = web_certificate(&token.id, now + 60_000);
        let (_, lifetime) = auth.authenticate(&call_with(short, None)).unwrap();
        let expiry = lifetime.expiry.unwrap();
        assert_eq!(expiry.at_unix_ms, now + 60_000);
        assert!(expiry.what.contains("spiffe://isdp.local/svc/web"));

        // Expired, the certificate is refused although the handshake
        // accepted it once: a connection outlives its handshake.
        let stale = web_certificate(&token.id, now - 1_000);
        let err = auth.authenticate(&call_with(stale, None)).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(err.message().contains("expired at"), "{err:?}");

        // A grant past its expiry refuses the certificate, naming it.
        let (brief, _) = tokens
            .create(
                Role::Join,
                join(),
                String::new(),
                Some(Duration::from_millis(1)),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let under_expired = web_certificate(&brief.id, now + 3_600_000);
        let err = auth
            .authenticate(&call_with(under_expired, None))
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        let said = err.message();
        assert!(
            said.contains(&format!("token {}, which expired at 20", brief.id)),
            "{said}"
        );

        // A revoked grant refuses it too.
        tokens.revoke(&token.id).await.unwrap();
        let revoked = web_certificate(&token.id, now + 60_000);
        let err = auth.authenticate(&call_with(revoked, None)).unwrap_err();
        assert!(err.message().contains("revoked"), "{err:?}");
    }

    /// Every refused call takes a place in the server's log rate (the one
    /// the xDS engine's refusals and NACKs take), so a client retrying a
    /// refused call writes no more than that bound allows; calls that
    /// pass take none, and past the bound refusals are still answered.
    #[tokio::test]
    async fn refused_calls_are_logged_within_the_shared_log_rate() {
        use std::convert::Infallible;

        use tower::{Layer as _, Service as _};

        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::embedded::EmbeddedStore::open(dir.path()).unwrap();
        let tokens = Tokens::load(Arc::new(store), "/isdp/", Duration::from_secs(60))
            .await
            .unwrap();
        let (_, secret) = tokens
            .create(Role::Read, Scope::default(), String::new(), None)
            .await
            .unwrap();
        let log = LogRate::default();
        let inner = tower::service_fn(|_req: http::Request<Body>| async {
            Ok::<_, Infallible>(http::Response::new(Body::empty()))
        });
        let mut auth = AuthLayer::new(tokens, 10, log.clone()).layer(inner);
        let call = |bearer: Option<&str>| {
            let mut req = http::Request::builder().uri("/isdp.v1.Registry/ListServices");
            if let Some(secret) = bearer {
                req = req.header("authorization", format!("Bearer {secret}"));
            }
            req.body(Body::empty()).unwrap()
        };
        let code = |resp: &http::Response<Body>| {
            tonic::Status::from_header_map(resp.headers()).map(|s| s.code())
        };

        let passed = auth.call(call(Some(&secret))).await.unwrap();
        assert_eq!(code(&passed), None, "served by the inner service");
        for n in 1..isdp_xds::LINES_PER_WINDOW {
            let refused = auth.call(call(None)).await.unwrap();
            assert_eq!(code(&refused), Some(tonic::Code::Unauthenticated), "{n}");
        }
        assert!(log.admit(), "the passed call took no place: one is left");
        let refused = auth
            .call(call(Some("isdp_0123456789abcdef_bogus")))
            .await
            .unwrap();
        assert_eq!(code(&refused), Some(tonic::Code::Unauthenticated));
        assert!(
            !log.admit(),
            "the refusals and the line above took the window"
        );
    }
}
