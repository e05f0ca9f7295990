//! Certificate checks on top of webpki's: a mesh certificate must carry
//! exactly one URI SAN, a SPIFFE ID in our trust domain, and a server must
//! be the service we meant to reach.
//!
//! Chain building, signatures and validity periods stay with rustls'
//! `WebPki*Verifier`s; these wrappers only add what webpki does not know
//! about (SPIFFE, and the tokens the control plane revoked: `revoked.rs`),
//! so the cryptographic checks are never re-implemented.

use std::sync::Arc;

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use x509_parser::{extensions::GeneralName, prelude::FromDer};

use super::revoked::Revocations;
use crate::metrics::Direction;

/// Why a certificate's identity is refused; carried inside
/// `CertificateError::Other` so the handshake error says what was wrong
/// and [`super::FailureReason`] can classify it as `bad_identity`.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("certificate does not parse")]
    Unparsable,
    #[error("certificate has {0} URI SANs, a mesh certificate has exactly one")]
    UriSanCount(usize),
    #[error("SPIFFE ID {0:?} is not in trust domain {1:?}")]
    ForeignTrustDomain(String, String),
    #[error("server is {got:?}, expected {expected:?}")]
    WrongService { got: String, expected: String },
    #[error("server name {0:?} is not <service>.svc.<trust-domain>")]
    BadServerName(String),
}

impl From<IdentityError> for Error {
    fn from(e: IdentityError) -> Self {
        Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
    }
}

/// The single URI SAN of a certificate.
pub fn uri_san(der: &[u8]) -> Result<String, IdentityError> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|_| IdentityError::Unparsable)?;
    let sans = cert
        .subject_alternative_name()
        .map_err(|_| IdentityError::Unparsable)?;
    let mut uris = sans
        .iter()
        .flat_map(|s| s.value.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        });
    match (uris.next(), uris.next()) {
        (Some(uri), None) => Ok(uri.to_owned()),
        (None, _) => Err(IdentityError::UriSanCount(0)),
        (Some(_), Some(_)) => Err(IdentityError::UriSanCount(2 + uris.count())),
    }
}

/// The certificate's SPIFFE ID, checked to be in `trust_domain`.
pub fn spiffe_id(der: &[u8], trust_domain: &str) -> Result<String, IdentityError> {
    let id = uri_san(der)?;
    let in_domain = id
        .strip_prefix("spiffe://")
        .and_then(|rest| rest.strip_prefix(trust_domain))
        .is_some_and(|path| path.starts_with('/') && path.len() > 1);
    if !in_domain {
        return Err(IdentityError::ForeignTrustDomain(
            id,
            trust_domain.to_owned(),
        ));
    }
    Ok(id)
}

/// The SPIFFE ID of a service.
pub fn service_spiffe_id(trust_domain: &str, service: &str) -> String {
    format!("spiffe://{trust_domain}/svc/{service}")
}

/// The TLS server name (SNI, and DNS SAN) of a service's sidecars.
pub fn server_name(trust_domain: &str, service: &str) -> String {
    format!("{service}.svc.{trust_domain}")
}

/// The service a server name names, if it is in `trust_domain`.
pub fn service_of(server_name: &str, trust_domain: &str) -> Option<String> {
    let service = server_name
        .strip_suffix(trust_domain)?
        .strip_suffix(".svc.")?;
    (!service.is_empty() && !service.contains('.')).then(|| service.to_owned())
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
        let id = spiffe_id(end_entity, &self.trust_domain)?;
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
        let service = service_of(&name, &self.trust_domain)
            .ok_or_else(|| IdentityError::BadServerName(name.to_string()))?;
        let expected = service_spiffe_id(&self.trust_domain, &service);
        let got = spiffe_id(end_entity, &self.trust_domain)?;
        if got != expected {
            return Err(IdentityError::WrongService { got, expected }.into());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(server_name("mesh.local", "web"), "web.svc.mesh.local");
        assert_eq!(
            service_of("web.svc.mesh.local", "mesh.local").as_deref(),
            Some("web")
        );
        assert_eq!(service_of("a.b.svc.mesh.local", "mesh.local"), None);
        assert_eq!(service_of("web.svc.other", "mesh.local"), None);
        assert_eq!(service_of(".svc.mesh.local", "mesh.local"), None);
    }
}
