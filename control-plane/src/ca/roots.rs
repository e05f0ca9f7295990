//! The roots as stored under `<prefix>ca/roots` (JSON: readable with
//! `etcdctl get`; the certificates are PEM like any operator-provided CA,
//! the signer's private key is sealed under the KEK, see `seal`) and the
//! rules for rotating and pruning them.

use bytes::Bytes;
use isdp_core::pem::{cert_to_pem, pem_to_der};
use isdp_proto::v1::TrustBundle;
use sha2::{Digest as _, Sha256};

use super::{
    CaError,
    issue::RootPair,
    seal::{Keyring, OpenedWith, Sealed},
};
use crate::store::Revision;

#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    /// The signing root first.
    roots: Vec<StoredRoot>,
    /// When the roots after the first stop being trusted; 0: nothing to prune.
    #[serde(default)]
    prune_at_unix_ms: i64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredRoot {
    cert_pem: String,
    /// The signer's key in plain PEM, as versions before sealing stored it:
    /// read (and sealed on the next start), never written.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    key_pem: String,
    /// Only the signing root keeps its key: PKCS#8 PEM sealed under the KEK.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_sealed: Option<Sealed>,
}

/// Why a stored value should be written again under the current KEK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reseal {
    /// The key is in plain PEM (written before keys were sealed).
    Plaintext,
    /// The key is sealed under the previous KEK (a rotation is under way).
    PreviousKek,
}

/// The mesh's roots at one store revision.
#[derive(Clone)]
pub struct Roots {
    signer: RootPair,
    /// Roots trusted besides the signer (the previous ones, until pruned).
    previous: Vec<Vec<u8>>,
    prune_at_unix_ms: i64,
    /// The store revision these were read at (0: not stored yet).
    pub mod_revision: Revision,
    /// Set when the stored form is not sealed under the current KEK.
    pub reseal: Option<Reseal>,
}

// === impl Roots ===

impl Roots {
    pub fn new(signer: RootPair) -> Self {
        Roots {
            signer,
            previous: Vec::new(),
            prune_at_unix_ms: 0,
            mod_revision: 0,
            reseal: None,
        }
    }

    pub fn signer(&self) -> &RootPair {
        &self.signer
    }

    /// Every trusted root, DER, the signer first.
    pub fn bundle_der(&self) -> Vec<Vec<u8>> {
        std::iter::once(self.signer.cert_der.clone())
            .chain(self.previous.iter().cloned())
            .collect()
    }

    pub fn bundle(&self, trust_domain: &str) -> TrustBundle {
        TrustBundle {
            trust_domain: trust_domain.to_owned(),
            roots_der: self.bundle_der(),
            // The xDS publisher adds the revoked tokens (`tokens`).
            revoked_grants: Vec::new(),
        }
    }

    /// Every trusted root as concatenated PEM (`ca.pem`).
    pub fn bundle_pem(&self) -> String {
        self.bundle_der().iter().map(|d| cert_to_pem(d)).collect()
    }

    /// A new signer in front; every root trusted now stays trusted until
    /// `prune_at_unix_ms`.
    pub fn rotated(&self, signer: RootPair, prune_at_unix_ms: i64) -> Roots {
        Roots {
            previous: self.bundle_der(),
            signer,
            prune_at_unix_ms,
            mod_revision: self.mod_revision,
            reseal: None,
        }
    }

    pub fn prune_due(&self, now_unix_ms: i64) -> bool {
        !self.previous.is_empty() && self.prune_at_unix_ms <= now_unix_ms
    }

    /// Only the signer left.
    pub fn pruned(&self) -> Roots {
        Roots {
            previous: Vec::new(),
            prune_at_unix_ms: 0,
            reseal: None,
            ..self.clone()
        }
    }

    /// The stored form, the signer's key sealed under `keys`' current KEK
    /// and bound to `store_key` (the full key, prefix included) and the
    /// signer's certificate.
    pub fn encode(&self, store_key: &str, keys: &Keyring) -> Result<Bytes, CaError> {
        let sealed = keys
            .seal(
                self.signer.key_pem.as_bytes(),
                &aad(store_key, &self.signer.cert_der),
            )
            .map_err(|source| CaError::Sealed {
                key: store_key.to_owned(),
                source,
            })?;
        let mut roots = vec![StoredRoot {
            cert_pem: cert_to_pem(&self.signer.cert_der),
            key_pem: String::new(),
            key_sealed: Some(sealed),
        }];
        roots.extend(self.previous.iter().map(|d| StoredRoot {
            cert_pem: cert_to_pem(d),
            key_pem: String::new(),
            key_sealed: None,
        }));
        let stored = Stored {
            roots,
            prune_at_unix_ms: self.prune_at_unix_ms,
        };
        serde_json::to_vec(&stored)
            .map(Bytes::from)
            .map_err(|e| CaError::Issue(format!("encoding the roots: {e}")))
    }

    /// Reads the stored form at `store_key`, opening the signer's key with
    /// `keys` (either KEK) or taking it in plain PEM from an older version;
    /// `reseal` says whether it should be written again.
    pub fn decode(
        bytes: &[u8],
        mod_revision: Revision,
        store_key: &str,
        keys: &Keyring,
    ) -> Result<Roots, CaError> {
        let corrupt = |reason: String| CaError::Corrupt {
            key: store_key.to_owned(),
            reason,
        };
        let stored: Stored = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
        let mut certs = stored.roots.into_iter();
        let first = certs.next().ok_or_else(|| corrupt("no roots".into()))?;
        let der = |pem: &str| {
            pem_to_der(pem, "CERTIFICATE").ok_or_else(|| corrupt("a root is not PEM".into()))
        };
        let cert_der = der(&first.cert_pem)?;
        let (key_pem, reseal) = match (first.key_sealed, first.key_pem) {
            (Some(sealed), _) => {
                let (plain, with) =
                    keys.open(&sealed, &aad(store_key, &cert_der))
                        .map_err(|source| CaError::Sealed {
                            key: store_key.to_owned(),
                            source,
                        })?;
                let pem = String::from_utf8(plain)
                    .map_err(|_| corrupt("the sealed key is not PEM".into()))?;
                let reseal = (with == OpenedWith::Previous).then_some(Reseal::PreviousKek);
                (pem, reseal)
            }
            (None, pem) if !pem.is_empty() => (pem, Some(Reseal::Plaintext)),
            (None, _) => return Err(corrupt("the signing root has no key".into())),
        };
        Ok(Roots {
            signer: RootPair { cert_der, key_pem },
            previous: certs.map(|r| der(&r.cert_pem)).collect::<Result<_, _>>()?,
            prune_at_unix_ms: stored.prune_at_unix_ms,
            mod_revision,
            reseal,
        })
    }

    /// The id of the KEK that sealed the stored signer key, without opening
    /// it (`None`: no sealed key, e.g. one stored in plain PEM).
    pub fn sealed_with(bytes: &[u8]) -> Option<String> {
        let stored: Stored = serde_json::from_slice(bytes).ok()?;
        Some(stored.roots.into_iter().next()?.key_sealed?.kek)
    }
}

/// What a sealed signer key is bound to: its purpose, where it is stored
/// and the certificate it belongs to (by SHA-256 fingerprint).
fn aad(store_key: &str, cert_der: &[u8]) -> Vec<u8> {
    let mut out = b"isdp ca root key v1\0".to_vec();
    out.extend_from_slice(store_key.as_bytes());
    out.push(0);
    out.extend_from_slice(&Sha256::digest(cert_der));
    out
}
