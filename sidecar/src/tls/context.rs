//! The TLS configurations in force: built from (identities, trust bundle)
//! once per change, never per connection.

use std::{collections::HashMap, fmt, sync::Arc};

use isdp_core::names::{check_dns_label, service_of_server_name};
use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    client::{ResolvesClientCert, WebPkiServerVerifier},
    crypto::CryptoProvider,
    pki_types::CertificateDer,
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};

use super::{
    ALPN_H2, ALPN_HTTP1, ALPN_TCP,
    revoked::Revocations,
    verify::{SpiffeClientVerifier, SpiffeServerVerifier},
};

/// Why a [`TlsContext`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("trust bundle: {0}")]
    Bundle(String),
    #[error("tls configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The crypto provider: ring, the one the lockfile carries.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// One certificate this sidecar can present.
#[derive(Clone)]
pub struct LocalCert {
    /// The service the certificate is for.
    pub service: String,
    pub key: Arc<CertifiedKey>,
}

/// Server and client configurations for one (identities, bundle) state.
/// Held in an `Arc` per connection attempt: rotation builds a new one and
/// connections already open keep theirs.
pub struct TlsContext {
    pub trust_domain: Arc<str>,
    pub server: Arc<ServerConfig>,
    /// ALPN `h2`: HTTP between sidecars.
    pub client_h2: Arc<ClientConfig>,
    /// ALPN `http/1.1`: upgrades (WebSocket) between sidecars.
    pub client_h1: Arc<ClientConfig>,
    /// ALPN `isdp-tcp/1`: TCP tunnels.
    pub client_tcp: Arc<ClientConfig>,
}

impl fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsContext")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl TlsContext {
    /// `local` are the certificates served by SNI (one per local service),
    /// `primary` the one presented as a client; `roots` the trust bundle.
    /// The verifiers read `revocations` live: a revocation needs no new
    /// context.
    pub fn new(
        trust_domain: &str,
        local: &[LocalCert],
        primary: Arc<CertifiedKey>,
        roots: &[CertificateDer<'static>],
        revocations: &Revocations,
    ) -> Result<Self, ContextError> {
        let provider = provider();
        let trust_domain: Arc<str> = Arc::from(trust_domain);
        let mut store = RootCertStore::empty();
        for root in roots {
            store
                .add(root.clone())
                .map_err(|e| ContextError::Bundle(e.to_string()))?;
        }
        if store.is_empty() {
            return Err(ContextError::Bundle("no roots".into()));
        }
        let store = Arc::new(store);

        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(store.clone(), provider.clone())
                .build()
                .map_err(|e| ContextError::Bundle(e.to_string()))?;
        let resolver = BySni {
            certs: local
                .iter()
                .map(|c| (c.service.clone(), c.key.clone()))
                .collect(),
            trust_domain: trust_domain.clone(),
        };
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(SpiffeClientVerifier {
                inner: client_verifier,
                trust_domain: trust_domain.clone(),
                revocations: revocations.clone(),
            }))
            .with_cert_resolver(Arc::new(resolver));
        server.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec(), ALPN_TCP.to_vec()];

        let server_verifier = WebPkiServerVerifier::builder_with_provider(store, provider.clone())
            .build()
            .map_err(|e| ContextError::Bundle(e.to_string()))?;
        let verifier = Arc::new(SpiffeServerVerifier {
            inner: server_verifier,
            trust_domain: trust_domain.clone(),
            revocations: revocations.clone(),
        });
        let client = |alpn: &[u8]| -> Result<Arc<ClientConfig>, ContextError> {
            let mut c = ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .dangerous()
                .with_custom_certificate_verifier(verifier.clone())
                .with_client_cert_resolver(Arc::new(Always(primary.clone())));
            c.alpn_protocols = vec![alpn.to_vec()];
            Ok(Arc::new(c))
        };
        Ok(TlsContext {
            client_h2: client(ALPN_H2)?,
            client_h1: client(ALPN_HTTP1)?,
            client_tcp: client(ALPN_TCP)?,
            server: Arc::new(server),
            trust_domain,
        })
    }
}

/// The local service an SNI asks for: `<service>.svc.<trust-domain>`, as
/// sidecars send it, or the bare `<service>`, as a proxyless gRPC client
/// sends its target's name (grpc-js ignores the cluster's `sni`). Either
/// only picks a certificate: the client still checks the service's SPIFFE
/// ID in it.
pub fn sni_service(sni: &str, trust_domain: &str) -> Option<String> {
    service_of_server_name(sni, trust_domain)
        .or_else(|| check_dns_label(sni).is_ok().then(|| sni.to_owned()))
}

/// Picks the local service's certificate by SNI ([`sni_service`]); an
/// unknown name (or none) gets no certificate, which fails the handshake.
struct BySni {
    /// By service name.
    certs: HashMap<String, Arc<CertifiedKey>>,
    trust_domain: Arc<str>,
}

impl fmt::Debug for BySni {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.certs.keys()).finish()
    }
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let service = sni_service(hello.server_name()?, &self.trust_domain)?;
        self.certs.get(&service).cloned()
    }
}

/// The primary identity, presented to every server.
#[derive(Debug)]
struct Always(Arc<CertifiedKey>);

impl ResolvesClientCert for Always {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A rustls key from a certificate chain (leaf first) and its PKCS#8 key.
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key_pkcs8: Vec<u8>,
) -> Result<Arc<CertifiedKey>, rustls::Error> {
    let key = provider()
        .key_provider
        .load_private_key(rustls::pki_types::PrivateKeyDer::Pkcs8(key_pkcs8.into()))?;
    Ok(Arc::new(CertifiedKey::new(chain, key)))
}
