//! The roots as stored under `<prefix>ca/roots` (JSON: readable with
//! `etcdctl get`, and the keys are PEM like any operator-provided CA) and
//! the rules for rotating and pruning them.

use bytes::Bytes;
use isdp_proto::v1::TrustBundle;

use super::issue::{RootPair, der_to_pem, pem_to_der};
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
    /// Only the signing root keeps its key.
    #[serde(default)]
    key_pem: String,
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
}

// === impl Roots ===

impl Roots {
    pub fn new(signer: RootPair) -> Self {
        Roots {
            signer,
            previous: Vec::new(),
            prune_at_unix_ms: 0,
            mod_revision: 0,
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
        self.bundle_der()
            .iter()
            .map(|d| der_to_pem(d, "CERTIFICATE"))
            .collect()
    }

    /// A new signer in front; every root trusted now stays trusted until
    /// `prune_at_unix_ms`.
    pub fn rotated(&self, signer: RootPair, prune_at_unix_ms: i64) -> Roots {
        Roots {
            previous: self.bundle_der(),
            signer,
            prune_at_unix_ms,
            mod_revision: self.mod_revision,
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
            ..self.clone()
        }
    }

    pub fn encode(&self) -> Bytes {
        let mut roots = vec![StoredRoot {
            cert_pem: der_to_pem(&self.signer.cert_der, "CERTIFICATE"),
            key_pem: self.signer.key_pem.clone(),
        }];
        roots.extend(self.previous.iter().map(|d| StoredRoot {
            cert_pem: der_to_pem(d, "CERTIFICATE"),
            key_pem: String::new(),
        }));
        let stored = Stored {
            roots,
            prune_at_unix_ms: self.prune_at_unix_ms,
        };
        Bytes::from(serde_json::to_vec(&stored).unwrap_or_default())
    }

    pub fn decode(bytes: &[u8], mod_revision: Revision) -> Result<Roots, String> {
        let stored: Stored = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let mut certs = stored.roots.into_iter();
        let first = certs.next().ok_or("no roots")?;
        if first.key_pem.is_empty() {
            return Err("the signing root has no key".into());
        }
        let der = |pem: &str| pem_to_der(pem, "CERTIFICATE").ok_or("a root is not PEM");
        Ok(Roots {
            signer: RootPair {
                cert_der: der(&first.cert_pem)?,
                key_pem: first.key_pem,
            },
            previous: certs.map(|r| der(&r.cert_pem)).collect::<Result<_, _>>()?,
            prune_at_unix_ms: stored.prune_at_unix_ms,
            mod_revision,
        })
    }
}
