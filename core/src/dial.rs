//! Dialing the control plane: channel settings shared by the xDS client and
//! the session, TLS trusting only the mesh CA (the CA file plus the roots
//! learned since over xDS), the bearer token on every call, and
//! round-robin over the configured URLs.

use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use tonic::{
    metadata::{AsciiMetadataValue, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::pem::{ChainPem, cert_to_pem};

/// A channel to the control plane whose every call carries the credentials.
pub type ControlChannel = InterceptedService<Channel, Credentials>;

/// How this process proves itself to the control plane, and whom it trusts.
#[derive(Clone, Debug, Default)]
pub struct ControlAuth {
    /// Trusted roots (PEM) for https:// URLs: the mesh CA only, never the
    /// system roots, since the control plane's certificate comes from it.
    pub ca_pem: Option<String>,
    /// Bearer token sent as `authorization` on every call.
    pub token: Option<String>,
    /// The client certificate presented on the handshake: the sidecar's
    /// current workload certificate (`lib.rs` keeps it current), so once
    /// it holds one it authenticates with it as well as with its token
    /// (for a replica that does not know the token yet). The certificate
    /// stands on that token: revoked or expired, it ends both.
    pub identity: ClientIdentity,
    /// The trust bundle as last received over xDS, trusted beside
    /// `ca_pem`: after a root rotation the control plane's certificate
    /// comes from the new root, which the CA file (read at start) lacks.
    /// Clones share it; `lib.rs` keeps it current.
    pub learned: LearnedRoots,
}

/// The client certificate to present, read at each dial; a cheap shared
/// handle, empty until the first certificate.
#[derive(Clone, Debug, Default)]
pub struct ClientIdentity(Arc<RwLock<Option<ChainPem>>>);

impl ClientIdentity {
    /// Always this chain and key.
    pub fn fixed(pem: ChainPem) -> Self {
        ClientIdentity(Arc::new(RwLock::new(Some(pem))))
    }

    pub fn replace(&self, pem: Option<ChainPem>) {
        if let Ok(mut held) = self.0.write() {
            *held = pem;
        }
    }

    fn current(&self) -> Option<ChainPem> {
        self.0.read().ok().and_then(|p| p.clone())
    }
}

/// Roots (DER) learned after start; a cheap shared handle.
#[derive(Clone, Debug, Default)]
pub struct LearnedRoots(Arc<RwLock<Vec<Vec<u8>>>>);

impl LearnedRoots {
    pub fn replace(&self, roots: Vec<Vec<u8>>) {
        if let Ok(mut held) = self.0.write() {
            *held = roots;
        }
    }

    /// Every learned root as PEM, for tonic's TLS settings.
    fn pem(&self) -> Vec<String> {
        let held = self.0.read().map(|r| r.clone()).unwrap_or_default();
        held.iter().map(|der| cert_to_pem(der)).collect()
    }
}

/// Adds `authorization: Bearer <token>` to every request.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    header: Option<AsciiMetadataValue>,
}

impl Credentials {
    pub fn bearer(token: Option<&str>) -> Result<Self, String> {
        let header = match token {
            Some(t) => Some(
                MetadataValue::try_from(format!("Bearer {}", t.trim()))
                    .map_err(|_| "the token is not valid header text".to_owned())?,
            ),
            None => None,
        };
        Ok(Credentials { header })
    }
}

impl Interceptor for Credentials {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(h) = &self.header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    }
}

/// The largest message a client decodes from the control plane: an xDS
/// response, or a service's instance list. The control plane keeps every
/// delta response under it: a service's `ServiceEndpoints` resource is
/// capped at half of it, and several resources share a response only up
/// to a quarter. Finite, so one message never costs a client more memory
/// than this.
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;

/// The `user_agent_name` the sidecar's xDS client puts in its node (with
/// its version as `user_agent_version`): the control plane tells its own
/// sidecars from proxyless gRPC and Envoy by it (`isdpctl proxy-status`,
/// CSDS).
pub const SIDECAR_USER_AGENT: &str = "isdp-sidecar";

/// How long one connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP/2 PING interval, so a dead control plane is noticed on an idle stream.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a PING may go unanswered before the connection is dropped.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a control-plane connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("invalid control-plane URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("connect {url}: {reason}")]
    Connect { url: String, reason: String },
}

/// Rotates through control-plane URLs, one per attempt.
#[derive(Clone, Debug)]
pub struct Dialer {
    /// Configured URLs; never empty (config validation guarantees it).
    urls: Vec<String>,
    /// Index of the URL the next attempt uses.
    next: usize,
    /// TLS roots, token and optional client identity.
    auth: ControlAuth,
}

// === impl Dialer ===

impl Dialer {
    pub fn new(urls: Vec<String>, auth: ControlAuth) -> Self {
        Self {
            urls,
            next: 0,
            auth,
        }
    }

    /// The URL for the next attempt; advances the rotation.
    pub fn next_url(&mut self) -> String {
        let url = self.urls[self.next % self.urls.len().max(1)].clone();
        self.next = self.next.wrapping_add(1);
        url
    }

    /// Connects to `url` with the shared channel settings and this
    /// dialer's credentials.
    pub async fn connect(&self, url: &str) -> Result<ControlChannel, DialError> {
        connect(url, &self.auth).await
    }
}

/// Connects to `url`: TLS (trusting `auth.ca_pem` and the learned roots
/// only) for https://, the
/// token on every call.
pub async fn connect(url: &str, auth: &ControlAuth) -> Result<ControlChannel, DialError> {
    let invalid = |reason: String| DialError::InvalidUrl {
        url: url.to_owned(),
        reason,
    };
    let credentials = Credentials::bearer(auth.token.as_deref()).map_err(invalid)?;
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| DialError::InvalidUrl {
            url: url.to_owned(),
            reason: e.to_string(),
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    if url.starts_with("https://") {
        let ca = auth
            .ca_pem
            .as_deref()
            .ok_or_else(|| invalid("an https:// control plane needs a CA file (ca_file)".into()))?;
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        for root in auth.learned.pem() {
            tls = tls.ca_certificate(Certificate::from_pem(root));
        }
        if let Some(pem) = auth.identity.current() {
            tls = tls.identity(Identity::from_pem(pem.chain, pem.key));
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| invalid(error_chain(&e)))?;
    }
    let channel = endpoint.connect().await.map_err(|e| DialError::Connect {
        url: url.to_owned(),
        reason: error_chain(&e),
    })?;
    Ok(InterceptedService::new(channel, credentials))
}

/// An error and its sources, joined with ": ".
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_round_robin() {
        let mut d = Dialer::new(
            vec!["http://a:1".into(), "http://b:1".into()],
            ControlAuth::default(),
        );
        let got: Vec<_> = (0..5).map(|_| d.next_url()).collect();
        assert_eq!(
            got,
            [
                "http://a:1",
                "http://b:1",
                "http://a:1",
                "http://b:1",
                "http://a:1"
            ]
        );
    }

    #[tokio::test]
    async fn connect_errors_name_the_url() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let err = connect(&url, &ControlAuth::default())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.starts_with(&format!("connect {url}: ")), "{err}");
    }
}
