//! TLS on the gRPC listener, accepted here rather than by tonic so the
//! server certificate and the trusted client roots can change on a root
//! rotation without a restart, and so the caller's SPIFFE ID reaches the
//! auth layer as connection info.
//!
//! Handshakes run in their own tasks with a timeout: a slow or broken
//! client never delays accepting the next one. Connections are capped, and
//! one that carries no request in time is closed (`admission.rs`). A
//! handshake that refuses the client's certificate (expired, from another
//! CA) is logged at warn level within the server's bound on lines clients
//! can cause (the one the auth layer's refusals share), so an operator
//! sees why a client with stale credentials is turned away; other failures
//! (probes, plaintext clients, timeouts) stay at debug level.

mod admission;

pub use admission::{
    Admission, ConnectionCounters, DEFAULT_FIRST_REQUEST_TIMEOUT, DEFAULT_MAX_CONNECTIONS,
    FirstRequest,
};

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    server::WebPkiClientVerifier,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tokio_rustls::server::TlsStream;

use crate::ca::{Ca, CaError, Roots};

/// Longest a client may take to finish its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("building the TLS config: {0}")]
    Config(String),
}

/// What the auth layer learns about a connection.
#[derive(Clone, Debug, Default)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    /// The URI SAN of the client certificate, if one was presented.
    pub spiffe_id: Option<String>,
    /// The service of that SPIFFE ID, when it is in this trust domain.
    pub service: Option<String>,
    /// The grant the certificate carries (`ca::grant`): the token it was
    /// issued under and that token's read scope.
    pub grant: Option<crate::ca::grant::Grant>,
    /// When the client certificate expires (unix ms): calls on a connection
    /// that outlives it are refused, and streams opened on it end then.
    pub not_after_unix_ms: Option<i64>,
    /// Marked by the connection's first request, which lifts its
    /// first-request deadline.
    pub first_request: FirstRequest,
}

/// An accepted TLS connection and who is on the other end.
pub struct Conn {
    stream: TlsStream<TcpStream>,
    peer: PeerInfo,
    /// Its place among `--max-connections`, and its first-request
    /// deadline.
    guard: admission::ConnGuard,
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Poll::Ready(e) = self.guard.poll_deadline(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The names the server certificate carries: loopback, the listen IP when
/// it is specific, the hostname and every `--tls-san`.
pub fn server_names(listen: SocketAddr, extra: &[String]) -> Vec<String> {
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".into(), "::1".into()];
    if !listen.ip().is_unspecified() {
        names.push(listen.ip().to_string());
    }
    if let Some(h) = hostname() {
        names.push(h);
    }
    names.extend(extra.iter().cloned());
    names.dedup();
    names
}

/// A server config for the current roots: a fresh server certificate, and
/// client certificates optional but verified against the trust bundle.
pub fn server_config(ca: &Ca, roots: &Roots, names: &[String]) -> Result<ServerConfig, TlsError> {
    let (cert, key) = ca.server_cert(names)?;
    let mut trusted = RootCertStore::empty();
    for der in roots.bundle_der() {
        trusted
            .add(CertificateDer::from(der))
            .map_err(|e| TlsError::Config(e.to_string()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(trusted), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from(cert)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
        )
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Keeps a server config current: rebuilt whenever `roots` change. Give it
/// the roots as published (`ca.pem` and the xDS trust bundle already
/// trusting them), not as the CA holds them: a client that reads `ca.pem`
/// after a rotation must never meet a certificate from a root the file
/// does not have yet.
pub fn follow_roots(
    ca: Ca,
    mut roots: watch::Receiver<Arc<crate::ca::Roots>>,
    names: Vec<String>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(watch::Receiver<Arc<ServerConfig>>, JoinHandle<()>), TlsError> {
    let first = server_config(&ca, &roots.borrow_and_update(), &names)?;
    let (tx, rx) = watch::channel(Arc::new(first));
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                changed = roots.changed() => if changed.is_err() { return },
            }
            let current = roots.borrow_and_update().clone();
            match server_config(&ca, &current, &names) {
                Ok(c) => {
                    tracing::info!(
                        "reissued the control plane's TLS certificate for the new roots"
                    );
                    let _ = tx.send(Arc::new(c));
                }
                Err(e) => tracing::error!(error = %e, "rebuilding the TLS config failed"),
            }
        }
    });
    Ok((rx, task))
}

/// `configs` with ALPN `alpn` instead of gRPC's `h2` alone, kept current
/// the same way: the HTTP listener offers `h2` and `http/1.1` with the
/// same certificate.
pub fn with_alpn(
    mut configs: watch::Receiver<Arc<ServerConfig>>,
    alpn: &[&[u8]],
    mut shutdown: watch::Receiver<bool>,
) -> (watch::Receiver<Arc<ServerConfig>>, JoinHandle<()>) {
    let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
    let map = move |c: &ServerConfig| {
        let mut c = c.clone();
        c.alpn_protocols.clone_from(&alpn);
        Arc::new(c)
    };
    let (tx, rx) = watch::channel(map(&configs.borrow_and_update()));
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                changed = configs.changed() => if changed.is_err() { return },
            }
            let next = map(&configs.borrow_and_update());
            let _ = tx.send(next);
        }
    });
    (rx, task)
}

/// The accepted TLS connections, as tonic serves them.
pub type Incoming = tokio_stream::wrappers::ReceiverStream<Result<Conn, io::Error>>;

/// Accepts TCP connections and yields those whose TLS handshake finished;
/// refused client certificates are logged within `log`.
pub fn incoming(
    listener: TcpListener,
    config: watch::Receiver<Arc<ServerConfig>>,
    trust_domain: String,
    admission: Admission,
    log: isdp_xds::LogRate,
    mut shutdown: watch::Receiver<bool>,
) -> Incoming {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a gRPC connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Over the cap the connection is dropped (closed) here.
            let Some(guard) = admission.admit(remote) else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(config.borrow().clone());
            let tx = tx.clone();
            let trust_domain = trust_domain.clone();
            let log = log.clone();
            tokio::spawn(async move {
                let stream =
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) if refused_certificate(&e) && log.admit() => {
                            tracing::warn!(%remote, error = %e, "refused a client certificate");
                            return;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%remote, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%remote, "TLS handshake timed out");
                            return;
                        }
                    };
                let mut peer = peer_info(&stream, remote, &trust_domain);
                peer.first_request = guard.first_request();
                let _ = tx
                    .send(Ok(Conn {
                        stream,
                        peer,
                        guard,
                    }))
                    .await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Whether a failed handshake refused the client's certificate (expired,
/// not yet valid, from an unknown CA, ...): a client with bad credentials,
/// not a port probe or a plaintext client.
fn refused_certificate(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| matches!(e, rustls::Error::InvalidCertificate(_)))
}

fn peer_info(stream: &TlsStream<TcpStream>, remote: SocketAddr, trust_domain: &str) -> PeerInfo {
    let leaf = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first());
    // Exactly one URI SAN, as the CA issues: anything else names no one.
    let spiffe_id = leaf.and_then(|leaf| isdp_core::cert::uri_san(leaf.as_ref()).ok());
    let grant = leaf.and_then(|leaf| crate::ca::grant::of_certificate(leaf.as_ref()));
    let not_after_unix_ms =
        leaf.and_then(|leaf| isdp_core::cert::not_after_unix_ms(leaf.as_ref()).ok());
    let service = spiffe_id
        .as_deref()
        .and_then(|id| isdp_core::names::service_of_spiffe_id(trust_domain, id));
    PeerInfo {
        remote: Some(remote),
        spiffe_id,
        service,
        grant,
        not_after_unix_ms,
        first_request: FirstRequest::default(),
    }
}

/// The first URI SAN of a certificate.
fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a refused client certificate is named in the log at warn
    /// level; what any port probe causes is not.
    #[test]
    fn a_refused_certificate_is_told_apart_from_other_failures() {
        let tls = |e: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, e);
        for refused in [
            rustls::CertificateError::Expired,
            rustls::CertificateError::NotValidYet,
            rustls::CertificateError::UnknownIssuer,
            rustls::CertificateError::BadSignature,
        ] {
            let e = tls(rustls::Error::InvalidCertificate(refused.clone()));
            assert!(refused_certificate(&e), "{refused:?}");
        }
        assert!(!refused_certificate(&tls(rustls::Error::InvalidMessage(
            rustls::InvalidMessage::InvalidContentType
        ))));
        assert!(!refused_certificate(&tls(
            rustls::Error::NoCertificatesPresented
        )));
        assert!(!refused_certificate(&io::Error::from(
            io::ErrorKind::UnexpectedEof
        )));
    }
}
