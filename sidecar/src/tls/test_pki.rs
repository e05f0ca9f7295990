//! Test certificate authorities made with rcgen, shared by the tests of
//! `tls`, `identity`, `xds`, `admin` and the proxy. It depends on nothing
//! but `tls`.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, CustomExtension, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::{pki_types::CertificateDer, sign::CertifiedKey};
use time::{Duration, OffsetDateTime};

use super::{LocalCert, certified_key};

pub const TD: &str = "mesh.test";

pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pub root: CertificateDer<'static>,
}

/// A leaf's names and validity.
pub struct Leaf {
    pub dns: Option<String>,
    pub uris: Vec<String>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// The token the control plane would have issued it under.
    pub grant: Option<String>,
}

impl Leaf {
    /// What the control plane issues for `service`, valid for an hour.
    pub fn service(td: &str, service: &str) -> Self {
        let now = OffsetDateTime::now_utc();
        Leaf {
            dns: Some(isdp_core::names::server_name(td, service)),
            uris: vec![isdp_core::names::service_spiffe_id(td, service)],
            not_before: now - Duration::hours(1),
            not_after: now + Duration::hours(1),
            grant: None,
        }
    }

    /// The same leaf, carrying the grant extension for `token`.
    pub fn granted_by(mut self, token: &str) -> Self {
        self.grant = Some(token.to_owned());
        self
    }

    fn params(&self) -> CertificateParams {
        let mut p = CertificateParams::new(self.dns.iter().cloned().collect::<Vec<_>>()).unwrap();
        for uri in &self.uris {
            p.subject_alt_names
                .push(SanType::URI(uri.as_str().try_into().unwrap()));
        }
        p.not_before = self.not_before;
        p.not_after = self.not_after;
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        if let Some(token) = &self.grant {
            let grant = isdp_core::grant::Grant {
                token: token.clone(),
                upstreams: None,
            };
            p.custom_extensions.push(CustomExtension::from_oid_content(
                isdp_core::grant::OID,
                isdp_core::grant::encode(&grant),
            ));
        }
        p
    }
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let root = p.self_signed(&key).unwrap().der().clone();
        TestCa {
            issuer: Issuer::new(p, key),
            root,
        }
    }

    /// A new key and a certificate for it.
    pub fn issue(&self, leaf: &Leaf) -> Arc<CertifiedKey> {
        let key = KeyPair::generate().unwrap();
        let cert = leaf.params().signed_by(&key, &self.issuer).unwrap();
        certified_key(vec![cert.der().clone()], key.serialize_der()).unwrap()
    }

    pub fn service(&self, td: &str, service: &str) -> LocalCert {
        LocalCert {
            service: service.to_owned(),
            key: self.issue(&Leaf::service(td, service)),
        }
    }

    /// Signs a CSR's public key the way the control plane does.
    pub fn sign_csr(&self, csr_der: &[u8], leaf: &Leaf) -> CertificateDer<'static> {
        let csr = CertificateSigningRequestParams::from_der(&csr_der.to_vec().into()).unwrap();
        leaf.params()
            .signed_by(&csr.public_key, &self.issuer)
            .unwrap()
            .der()
            .clone()
    }
}

/// A self-signed leaf carrying a mesh identity.
pub fn self_signed(td: &str, service: &str) -> Arc<CertifiedKey> {
    let key = KeyPair::generate().unwrap();
    let cert = Leaf::service(td, service)
        .params()
        .self_signed(&key)
        .unwrap();
    certified_key(vec![cert.der().clone()], key.serialize_der()).unwrap()
}
