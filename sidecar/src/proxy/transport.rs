//! How sidecars reach each other and accept each other's connections:
//! the listener and connector side of mutual TLS. The configurations, the
//! SPIFFE verifiers and the revoked tokens are the top-level `tls`
//! module's; this one runs handshakes with them, counts and logs their
//! failures, and keeps the configuration in force current.
//!
//! The configurations in force live in a `watch` of [`TlsContext`],
//! rebuilt by `follow` when identities or the bundle's roots change; each
//! new connection reads the current one, connections already open keep
//! theirs, so rotation drops nothing. Instances without a sidecar are
//! reached in plaintext with [`connect`].
//!
//! The bundle also lists the tokens the control plane revoked: certificates
//! issued under them are refused at the handshake (by the verifiers, and
//! here again after a resumed session, which skips them), and connections
//! open with such a peer are refused and closed through the [`PeerGuard`]
//! each holds.

mod follow;
#[cfg(test)]
pub mod testing;

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use rustls::{CertificateError, pki_types::ServerName};
use tokio::{net::TcpStream, sync::watch};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

pub use follow::{build, follow};

use crate::{
    metrics::{Direction, Metrics},
    tls::{ALPN_TCP, PeerGuard, PeerIdentity, Revocations, TlsContext},
};

/// How long a peer has to complete the TLS handshake, so a silent or slow
/// client cannot hold a connection task forever.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The first byte of a TLS record carrying a handshake.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// What an outbound connection carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    H2,
    Http1,
    Tcp,
}

/// Why a handshake failed; the `reason` label of
/// `isdp_tls_handshake_failures_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureReason {
    /// The peer did not speak TLS.
    Plaintext,
    NoClientCert,
    /// The chain does not lead to a root of the trust bundle (self-signed,
    /// another CA, another mesh).
    UnknownCa,
    Expired,
    /// Chains fine but is not a mesh identity we accept (URI SANs, trust
    /// domain, or the wrong service).
    BadIdentity,
    /// Issued under a token the control plane revoked.
    Revoked,
    Other,
}

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Plaintext => "plaintext",
            FailureReason::NoClientCert => "no_client_cert",
            FailureReason::UnknownCa => "unknown_ca",
            FailureReason::Expired => "expired",
            FailureReason::BadIdentity => "bad_identity",
            FailureReason::Revoked => "revoked",
            FailureReason::Other => "other",
        }
    }

    /// Classifies a handshake error from tokio-rustls.
    pub fn of(error: &io::Error) -> Self {
        let Some(tls) = error
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
        else {
            return FailureReason::Other;
        };
        match tls {
            rustls::Error::NoCertificatesPresented => FailureReason::NoClientCert,
            rustls::Error::InvalidCertificate(e) => match e {
                CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                    FailureReason::UnknownCa
                }
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    FailureReason::Expired
                }
                CertificateError::Revoked => FailureReason::Revoked,
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. }
                | CertificateError::ApplicationVerificationFailure
                | CertificateError::Other(_) => FailureReason::BadIdentity,
                _ => FailureReason::Other,
            },
            _ => FailureReason::Other,
        }
    }
}

/// An accepted, authenticated inbound connection.
pub struct Accepted {
    pub stream: server::TlsStream<TcpStream>,
    pub peer: PeerIdentity,
    /// Watches the peer's token, when its certificate names one.
    pub guard: Option<PeerGuard>,
    /// The local service the client asked for by SNI.
    pub service: String,
    /// True for a TCP tunnel (ALPN `isdp-tcp/1`), false for HTTP.
    pub tunnel: bool,
}

/// The TLS side of the data plane: a cheap handle (a `watch` receiver and
/// the metrics) cloned into every listener and pool.
#[derive(Clone)]
pub struct Tls {
    current: watch::Receiver<Option<Arc<TlsContext>>>,
    revocations: Revocations,
    metrics: Metrics,
    /// When a handshake failure was last logged at warn (ms since
    /// `started`): a scanner or a misconfigured peer must not flood the
    /// log, so further failures within a second log at debug (all are
    /// counted).
    last_warn: Arc<std::sync::atomic::AtomicU64>,
    started: std::time::Instant,
}

impl Tls {
    /// `revocations` must be the handle the contexts were built with.
    pub fn new(
        current: watch::Receiver<Option<Arc<TlsContext>>>,
        revocations: Revocations,
        metrics: Metrics,
    ) -> Self {
        Tls {
            current,
            revocations,
            metrics,
            last_warn: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            started: std::time::Instant::now(),
        }
    }

    /// The configurations in force; None until the first certificate.
    pub fn context(&self) -> Option<Arc<TlsContext>> {
        self.current.borrow().clone()
    }

    /// The guard of an outbound connection: watches the token of the
    /// server it reached.
    pub fn guard_of(&self, stream: &client::TlsStream<TcpStream>) -> Option<PeerGuard> {
        let leaf = stream.get_ref().1.peer_certificates()?.first()?;
        let id = isdp_core::cert::uri_san(leaf).ok()?;
        let grant = isdp_core::grant::of_certificate(leaf).map(|g| g.token);
        self.revocations.guard(grant, &id, Direction::Outbound)
    }

    fn failed(
        &self,
        direction: Direction,
        reason: FailureReason,
        addr: SocketAddr,
        error: &dyn std::fmt::Display,
    ) {
        use std::sync::atomic::Ordering;
        self.metrics
            .tls_handshake_failure(direction, reason.as_str());
        let direction = if direction == Direction::Inbound {
            "inbound"
        } else {
            "outbound"
        };
        // +1000 so the very first failure logs at warn.
        let now = self.started.elapsed().as_millis() as u64 + 1000;
        let last = self.last_warn.load(Ordering::Relaxed);
        // A revoked peer is logged at warn once per token, by `revoked`.
        let warn = reason != FailureReason::Revoked
            && now.saturating_sub(last) >= 1000
            && self
                .last_warn
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        let reason = reason.as_str();
        if warn {
            tracing::warn!(direction, reason, peer = %addr, %error, "tls handshake failed");
        } else {
            tracing::debug!(direction, reason, peer = %addr, %error, "tls handshake failed");
        }
    }

    /// Runs the server handshake on a freshly accepted connection. Call it
    /// from the connection's task: it waits on the peer.
    pub async fn accept(&self, stream: TcpStream, peer: SocketAddr) -> Option<Accepted> {
        let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
        let mut first = [0u8; 1];
        match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                tracing::debug!(%peer, "inbound connection closed before sending anything");
                return None;
            }
            Err(_) => {
                self.failed(
                    Direction::Inbound,
                    FailureReason::Other,
                    peer,
                    &"no data before the handshake timeout",
                );
                return None;
            }
            Ok(Ok(_)) if first[0] != TLS_HANDSHAKE_RECORD => {
                self.failed(
                    Direction::Inbound,
                    FailureReason::Plaintext,
                    peer,
                    &"not a TLS handshake",
                );
                return None;
            }
            Ok(Ok(_)) => {}
        }
        let Some(ctx) = self.context() else {
            self.failed(
                Direction::Inbound,
                FailureReason::Other,
                peer,
                &"no workload certificate yet",
            );
            return None;
        };
        let accepted = tokio::time::timeout_at(
            deadline,
            TlsAcceptor::from(ctx.server.clone()).accept(stream),
        )
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "handshake timed out",
            ))
        });
        let stream = match accepted {
            Ok(s) => s,
            Err(e) => {
                self.failed(Direction::Inbound, FailureReason::of(&e), peer, &e);
                return None;
            }
        };
        let conn = stream.get_ref().1;
        let leaf = conn.peer_certificates().and_then(|c| c.first());
        let id = leaf.and_then(|leaf| isdp_core::cert::uri_san(leaf).ok());
        let grant = leaf.and_then(|leaf| isdp_core::grant::of_certificate(leaf).map(|g| g.token));
        let service = conn
            .server_name()
            .and_then(|sni| crate::tls::sni_service(sni, &ctx.trust_domain));
        let (Some(id), Some(service)) = (id, service) else {
            // The verifier and resolver already required both.
            self.failed(
                Direction::Inbound,
                FailureReason::BadIdentity,
                peer,
                &"no peer identity or SNI",
            );
            return None;
        };
        let tunnel = conn.alpn_protocol() == Some(ALPN_TCP);
        let guard = self.revocations.guard(grant, &id, Direction::Inbound);
        if let Some(g) = &guard
            && g.refuses_handshake()
        {
            let e = revoked_error();
            self.failed(Direction::Inbound, FailureReason::of(&e), peer, &e);
            return None;
        }
        Some(Accepted {
            stream,
            guard,
            peer: PeerIdentity(Arc::from(id)),
            service,
            tunnel,
        })
    }

    /// Connects to the sidecar at `addr` as a client of `service`.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        service: &str,
        alpn: Alpn,
        timeout: Duration,
    ) -> io::Result<client::TlsStream<TcpStream>> {
        let Some(ctx) = self.context() else {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "no workload certificate yet; cannot call other sidecars",
            ));
        };
        let stream = connect(addr, timeout).await?;
        let config = match alpn {
            Alpn::H2 => &ctx.client_h2,
            Alpn::Http1 => &ctx.client_h1,
            Alpn::Tcp => &ctx.client_tcp,
        };
        let name = ServerName::try_from(isdp_core::names::server_name(&ctx.trust_domain, service))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let result = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            TlsConnector::from(config.clone()).connect(name, stream),
        )
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "handshake timed out",
            ))
        });
        // A resumed session skipped the verifier: check the server again.
        let result = result.and_then(|stream| {
            let revoked = !self.revocations.is_empty()
                && self
                    .guard_of(&stream)
                    .is_some_and(|g| g.refuses_handshake());
            if revoked {
                Err(revoked_error())
            } else {
                Ok(stream)
            }
        });
        if let Err(e) = &result {
            self.failed(Direction::Outbound, FailureReason::of(e), addr, e);
        }
        result
    }
}

/// The error of a handshake refused after the fact (a resumed session of a
/// revoked peer), shaped like the verifiers' so it is classified alike.
fn revoked_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        rustls::Error::InvalidCertificate(CertificateError::Revoked),
    )
}

/// Opens a connection to a peer or a local service, with Nagle off (the
/// proxy writes whole messages) and a bounded connect time.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connecting to {addr} timed out"),
            )
        })??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

#[cfg(test)]
mod tests;
