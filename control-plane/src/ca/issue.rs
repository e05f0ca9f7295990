//! Certificate issuance, pure functions over rcgen: a root, a sidecar leaf
//! from a CSR, and the control plane's own server certificate. No store, no
//! clock beyond `now` passed in, so each is unit-tested directly.

use std::{net::IpAddr, time::Duration};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use isdp_core::{
    names::{server_name, service_spiffe_id},
    pem::pem_to_der,
};

use super::CaError;

/// How long a generated root lives. Roots are rotated by operators, not by
/// expiry, so this is long; leaves are what stays short.
pub const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Leaves start a minute in the past so a verifier whose clock lags a little
/// still accepts a certificate minted this second.
pub const BACKDATE: Duration = Duration::from_secs(60);

/// A root: its certificate and the key that signs with it.
#[derive(Clone)]
pub struct RootPair {
    pub cert_der: Vec<u8>,
    pub key_pem: String,
}

/// A freshly issued leaf.
#[derive(Clone, Debug)]
pub struct Leaf {
    pub cert_der: Vec<u8>,
    pub not_after: OffsetDateTime,
}

/// Makes a new self-signed ECDSA P-256 root for `trust_domain`.
pub fn generate_root(trust_domain: &str, now: OffsetDateTime) -> Result<RootPair, CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(rcgen_err)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "ISDP");
    dn.push(
        DnType::CommonName,
        format!("ISDP mesh root {} {}", trust_domain, now.unix_timestamp()),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - BACKDATE;
    params.not_after = now + ROOT_LIFETIME;
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key).map_err(rcgen_err)?;
    Ok(RootPair {
        cert_der: cert.der().to_vec(),
        key_pem: key.serialize_pem(),
    })
}

/// Checks that an operator-provided certificate and key form a usable root.
pub fn load_root(cert_pem: &str, key_pem: &str) -> Result<RootPair, CaError> {
    let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::Load(format!("CA key: {e}")))?;
    let der = pem_to_der(cert_pem, "CERTIFICATE")
        .ok_or_else(|| CaError::Load("CA certificate: no PEM CERTIFICATE block".into()))?;
    let (_, x509) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| CaError::Load(format!("CA certificate: {e}")))?;
    if !x509.is_ca() {
        return Err(CaError::Load(
            "CA certificate: basicConstraints does not say CA".into(),
        ));
    }
    if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(CaError::Load(
            "CA key does not match the CA certificate".into(),
        ));
    }
    Ok(RootPair {
        cert_der: der,
        key_pem: key_pem.to_owned(),
    })
}

/// Signs a sidecar's CSR. Only the CSR's public key is used: every name
/// comes from `service`, so a sidecar cannot ask for someone else's identity.
pub fn sign_leaf(
    root: &RootPair,
    trust_domain: &str,
    service: &str,
    csr_der: &[u8],
    lifetime: Duration,
    grant: Option<&super::grant::Grant>,
    now: OffsetDateTime,
) -> Result<Leaf, CaError> {
    let csr = CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())
        .map_err(|e| CaError::Csr(e.to_string()))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, service);
    params.distinguished_name = dn;
    params.subject_alt_names = vec![
        SanType::URI(
            service_spiffe_id(trust_domain, service)
                .try_into()
                .map_err(rcgen_err)?,
        ),
        SanType::DnsName(
            server_name(trust_domain, service)
                .try_into()
                .map_err(rcgen_err)?,
        ),
    ];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = now - BACKDATE;
    params.not_after = now + lifetime;
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    if let Some(grant) = grant {
        params
            .custom_extensions
            .push(super::grant::extension(grant));
    }
    let csr = CertificateSigningRequestParams {
        params,
        public_key: csr.public_key,
    };
    let cert = csr.signed_by(&issuer(root)?).map_err(rcgen_err)?;
    Ok(Leaf {
        cert_der: cert.der().to_vec(),
        not_after: now + lifetime,
    })
}

/// Issues the control plane's own TLS server certificate and its key (PKCS#8
/// DER). The control plane holds this key, so it is generated here.
pub fn server_cert(
    root: &RootPair,
    names: &[String],
    lifetime: Duration,
    now: OffsetDateTime,
) -> Result<(Vec<u8>, Vec<u8>), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(rcgen_err)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "isdp-control-plane");
    params.distinguished_name = dn;
    for name in names {
        let san = match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => match name.clone().try_into() {
                Ok(dns) => SanType::DnsName(dns),
                // A hostname that is no DNS name must not stop the start.
                Err(e) => {
                    tracing::warn!(name = %name, error = %e, "left out of the TLS certificate");
                    continue;
                }
            },
        };
        if !params.subject_alt_names.contains(&san) {
            params.subject_alt_names.push(san);
        }
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = now - BACKDATE;
    params.not_after = now + lifetime;
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &issuer(root)?).map_err(rcgen_err)?;
    Ok((cert.der().to_vec(), key.serialize_der()))
}

fn issuer(root: &RootPair) -> Result<Issuer<'static, KeyPair>, CaError> {
    let key = KeyPair::from_pem(&root.key_pem).map_err(rcgen_err)?;
    Issuer::from_ca_cert_der(&root.cert_der.clone().into(), key).map_err(rcgen_err)
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and non-zero, as RFC 5280 asks.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

fn rcgen_err(e: rcgen::Error) -> CaError {
    CaError::Issue(e.to_string())
}
