//! The client's identity: an ECDSA P-256 key made here (as the sidecar
//! makes its keys; it never leaves the machine), a CSR, and
//! `isdp.v1.Certificates/Sign`, authenticated by a join token or by the
//! certificate being renewed.
//!
//! A renewal keeps the key: only `cert.pem` (and `ca.pem`) change, each in
//! one rename, so a client's file watcher can never pair a new key with an
//! old certificate, which two separate files could not promise. A client
//! that wants a new key is bootstrapped again.

use std::time::Duration;

use isdp_core::{
    cert,
    dial::{ControlAuth, ControlChannel},
    names::split_service_spiffe_id,
    pem::{cert_to_pem, pem_to_der},
};
use isdp_proto::v1::{SignRequest, certificates_client::CertificatesClient};
use rcgen::{CertificateParams, DnType, KeyPair};

use super::{
    BootstrapError,
    document::{self, Saved},
    files::{BOOTSTRAP, CA, CERT, KEY, OutDir},
    rfc3339, unix_ms,
};

/// How long one control-plane call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

pub fn new_key() -> Result<KeyPair, BootstrapError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| BootstrapError::Key(e.to_string()))
}

/// A gRPC status as an error naming the call, with what to do about it.
pub fn api<'a>(op: &'static str, hint: &'a str) -> impl Fn(tonic::Status) -> BootstrapError + 'a {
    move |s| BootstrapError::Api {
        op,
        code: s.code(),
        message: s.message().to_owned(),
        hint: hint.to_owned(),
    }
}

pub async fn connect(url: &str, auth: &ControlAuth) -> Result<ControlChannel, BootstrapError> {
    isdp_core::dial::connect(url, auth)
        .await
        .map_err(|e| BootstrapError::Connect {
            url: url.to_owned(),
            reason: match e {
                isdp_core::dial::DialError::Connect { reason, .. }
                | isdp_core::dial::DialError::InvalidUrl { reason, .. } => reason,
            },
        })
}

/// What a signing returned, as the files hold it.
pub struct Signed {
    /// The chain, leaf first, PEM.
    pub chain_pem: String,
    /// Every root of the trust bundle, PEM.
    pub roots_pem: String,
    pub spiffe_id: String,
    pub not_after_unix_ms: i64,
}

/// Signs a CSR of `key` for `service` and checks the answer is a
/// certificate of that service for that key.
pub async fn sign(
    url: &str,
    auth: &ControlAuth,
    service: &str,
    key: &KeyPair,
    lifetime: Option<Duration>,
) -> Result<Signed, BootstrapError> {
    let mut params = CertificateParams::new(Vec::<String>::new())
        .map_err(|e| BootstrapError::Key(e.to_string()))?;
    params.distinguished_name.push(DnType::CommonName, service);
    let csr = params
        .serialize_request(key)
        .map_err(|e| BootstrapError::Key(e.to_string()))?;
    let channel = connect(url, auth).await?;
    let hint = if auth.token.is_some() {
        format!(
            " (the join token must be a live join token for {service:?}: \
             `isdpctl token create --role join --service {service}` makes one)"
        )
    } else {
        " (renewing on the current certificate: pass --join-token to renew with a token instead)"
            .to_owned()
    };
    let mut client = CertificatesClient::new(channel);
    let request = client.sign(SignRequest {
        service: service.to_owned(),
        csr_der: csr.der().to_vec(),
        lifetime_seconds: lifetime.map_or(0, |l| l.as_secs().max(1)),
    });
    let response = tokio::time::timeout(CALL_TIMEOUT, request)
        .await
        .map_err(|_| BootstrapError::Api {
            op: "certificates sign",
            code: tonic::Code::DeadlineExceeded,
            message: format!("no answer within {CALL_TIMEOUT:?}"),
            hint: String::new(),
        })?
        .map_err(|s| {
            let refused = matches!(
                s.code(),
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
            );
            api(
                "certificates sign",
                if refused { hint.as_str() } else { "" },
            )(s)
        })?
        .into_inner();

    let bad = BootstrapError::BadResponse;
    let leaf = response
        .chain_der
        .first()
        .ok_or_else(|| bad("an empty chain".into()))?;
    let san = cert::uri_san(leaf).map_err(|e| bad(e.to_string()))?;
    if san != response.spiffe_id || split_service_spiffe_id(&san).map(|(_, s)| s) != Some(service) {
        return Err(bad(format!(
            "it names {san:?} (the response says {:?}), not service {service:?}",
            response.spiffe_id
        )));
    }
    if cert::public_key(leaf).map_err(|e| bad(e.to_string()))? != key.public_key_raw() {
        return Err(bad("it is not for the key sent".into()));
    }
    if response.trust_bundle_der.is_empty() {
        return Err(bad("no trust bundle came with it".into()));
    }
    Ok(Signed {
        chain_pem: response.chain_der.iter().map(|c| cert_to_pem(c)).collect(),
        roots_pem: response
            .trust_bundle_der
            .iter()
            .map(|c| cert_to_pem(c))
            .collect(),
        spiffe_id: san,
        not_after_unix_ms: response.not_after_unix_ms,
    })
}

/// A bootstrap found in the output directory, to renew.
pub struct Existing {
    pub key_pem: String,
    pub cert_pem: String,
    pub ca_pem: String,
    /// What the bootstrap said.
    pub saved: Saved,
    spiffe_id: String,
    not_after_unix_ms: i64,
}

// === impl Existing ===

impl Existing {
    /// Reads every file and checks they belong together and to `service`.
    pub fn read(dir: &OutDir, service: &str) -> Result<Existing, BootstrapError> {
        let missing: Vec<&str> = [KEY, CERT, CA, BOOTSTRAP]
            .into_iter()
            .filter(|name| !dir.file(name).exists())
            .collect();
        if !missing.is_empty() {
            return Err(BootstrapError::Renew(format!(
                "{} holds no {}: bootstrap it first (without --renew)",
                dir.path().display(),
                missing.join(", ")
            )));
        }
        let renew = |file: &str, why: String| {
            BootstrapError::Renew(format!("{}: {why}", dir.file(file).display()))
        };
        let key_pem = dir.read(KEY)?;
        let cert_pem = dir.read(CERT)?;
        let ca_pem = dir.read(CA)?;
        let saved = document::read(&dir.read(BOOTSTRAP)?).map_err(|e| renew(BOOTSTRAP, e))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| renew(KEY, e.to_string()))?;
        let leaf = pem_to_der(&cert_pem, "CERTIFICATE")
            .ok_or_else(|| renew(CERT, "no PEM certificate".into()))?;
        let spiffe_id = cert::uri_san(&leaf).map_err(|e| renew(CERT, e.to_string()))?;
        let named = split_service_spiffe_id(&spiffe_id).map(|(_, s)| s);
        if named != Some(service) || saved.cluster != service {
            return Err(BootstrapError::Renew(format!(
                "{} is the bootstrap of {spiffe_id:?} (node cluster {:?}), not of --service {service:?}",
                dir.path().display(),
                saved.cluster
            )));
        }
        if cert::public_key(&leaf).map_err(|e| renew(CERT, e.to_string()))? != key.public_key_raw()
        {
            return Err(renew(CERT, format!("not a certificate for {KEY}")));
        }
        let not_after_unix_ms =
            cert::not_after_unix_ms(&leaf).map_err(|e| renew(CERT, e.to_string()))?;
        Ok(Existing {
            key_pem,
            cert_pem,
            ca_pem,
            saved,
            spiffe_id,
            not_after_unix_ms,
        })
    }

    pub fn key(&self) -> Result<KeyPair, BootstrapError> {
        KeyPair::from_pem(&self.key_pem).map_err(|e| BootstrapError::Key(e.to_string()))
    }

    /// Whether the certificate can still vouch for its renewal; an expired
    /// one is refused at the handshake, so say why here.
    pub fn check_current(&self) -> Result<(), BootstrapError> {
        if self.not_after_unix_ms > unix_ms() {
            return Ok(());
        }
        Err(BootstrapError::Renew(format!(
            "the certificate of {} expired at {}, so it cannot vouch for its renewal: \
             pass a join token for the service with --join-token",
            self.spiffe_id,
            rfc3339(self.not_after_unix_ms)
        )))
    }
}
