//! Certificate checks on top of webpki's: a mesh certificate must carry
//! exactly one URI SAN, a SPIFFE ID in our trust domain, and a server must
//! be the service we meant to reach.
//!
//! Chain building, signatures and validity periods stay with rustls'
//! `WebPki*Verifier`s; these wrappers only add what webpki does not know
//! about (SPIFFE, and the tokens the control plane revoked: `revoked.rs`),
//! so the cryptographic checks are never re-implemented.

use std::sync::Arc;

use isdp_core::{
    cert::{CertError, spiffe_id},
    names::{service_of_server_name, service_spiffe_id},
};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};

use super::revoked::Revocations;
use crate::metrics::Direction;

/// Why a peer's certificate is refused as the identity we wanted;
/// carried inside `CertificateError::Other` so the handshake error says
/// what was wrong and the proxy's handshake metrics can classify it as
/// `bad_identity`.
#[derive(Debug, thiserror::Error)]
pub enum PeerIdentityError {
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error("server is {got:?}, expected {expected:?}")]
    WrongService { got: String, expected: String },
    #[error("server name {0:?} is not <service>.svc.<trust-domain>")]
    BadServerName(String),
}

impl From<PeerIdentityError> for Error {
    fn from(e: PeerIdentityError) -> Self {
        Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
    }
}

// === Client certificates (inbound) ===

/// Requires a client certificate chaining to the bundle (webpki) whose one
/// URI SAN is a SPIFFE ID in the trust domain, issued under a token that
/// was not revoked.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    pub inner: Arc<dyn ClientCertVerifier>,
    pub trust_domain: Arc<str>,
    pub revocations: Revocations,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = spiffe_id(end_entity, &self.trust_domain).map_err(PeerIdentityError::Cert)?;
        self.revocations
            .check(end_entity, &id, Direction::Inbound)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

// === Server certificates (outbound) ===

/// Checks the server's chain and DNS name (webpki), then that its SPIFFE ID
/// is exactly the service named by the SNI we sent: a certificate for
/// another service of the same mesh is refused, so a misrouted or
/// compromised endpoint cannot answer for a service it is not. Nor may one
/// whose token was revoked.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    pub inner: Arc<WebPkiServerVerifier>,
    pub trust_domain: Arc<str>,
    pub revocations: Revocations,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let name = server_name.to_str();
        let service = service_of_server_name(&name, &self.trust_domain)
            .ok_or_else(|| PeerIdentityError::BadServerName(name.to_string()))?;
        let expected = service_spiffe_id(&self.trust_domain, &service);
        let got = spiffe_id(end_entity, &self.trust_domain).map_err(PeerIdentityError::Cert)?;
        if got != expected {
            return Err(PeerIdentityError::WrongService { got, expected }.into());
        }
        self.revocations
            .check(end_entity, &got, Direction::Outbound)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
