//! The CA's private key at rest: sealed with AES-256-GCM (ring, already in
//! the build through rustls) under a key-encryption key (KEK) that the
//! operator keeps apart from the store, so a copied `store.redb`, an etcd
//! backup or `etcdctl get` yields no usable key.
//!
//! Each seal draws a fresh random 96-bit nonce (a root key is sealed a
//! handful of times in its life, far below GCM's random-nonce bound). The
//! additional authenticated data binds the ciphertext to its purpose (the
//! caller passes the store key and the root's fingerprint), so a sealed
//! value moved to another key, or paired with another certificate, does not
//! open. A sealed value names its KEK by id (a hash of the KEK, not the
//! KEK), which tells "this control plane has the wrong KEK" apart from
//! "the value was altered".

use base64::Engine as _;
use ring::{
    aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    rand::{SecureRandom as _, SystemRandom},
};
use sha2::{Digest as _, Sha256};

/// Length of a KEK in bytes (AES-256).
pub const KEK_LEN: usize = 32;
/// The only algorithm sealed values use today; stored so a later one can
/// be told apart.
pub const ALGORITHM: &str = "AES-256-GCM";

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error(
        "a key-encryption key is {KEK_LEN} random bytes in base64 (make one with \
         `head -c 32 /dev/urandom | base64`); {0}"
    )]
    BadKek(String),
    #[error("sealed with key-encryption key {sealed_with}, but this control plane has {have}")]
    UnknownKek { sealed_with: String, have: String },
    #[error(
        "does not open with key-encryption key {kek}: the sealed value was altered, \
         truncated or moved from another key"
    )]
    Tampered { kek: String },
    #[error("sealed with {0:?}, an algorithm this version does not know")]
    Algorithm(String),
    #[error("malformed sealed value: {0}")]
    Malformed(String),
    #[error("the system gave no randomness")]
    Random,
}

/// A key-encryption key. Its `Debug` shows the id only.
#[derive(Clone)]
pub struct Kek {
    key: [u8; KEK_LEN],
    id: String,
}

/// The KEK that seals, and an older one that still opens what it sealed
/// (during a rotation).
#[derive(Clone, Debug)]
pub struct Keyring {
    current: Kek,
    previous: Option<Kek>,
}

/// A sealed secret as stored (inside the JSON of `ca/roots`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Sealed {
    pub alg: String,
    /// Id of the KEK that sealed it.
    pub kek: String,
    /// Base64 of the 12-byte nonce.
    pub nonce: String,
    /// Base64 of the ciphertext followed by the 16-byte tag.
    pub ciphertext: String,
}

/// Which KEK of a [`Keyring`] opened a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenedWith {
    Current,
    Previous,
}

// === impl Kek ===

impl Kek {
    pub fn from_bytes(bytes: &[u8]) -> Result<Kek, SealError> {
        let key: [u8; KEK_LEN] = bytes
            .try_into()
            .map_err(|_| SealError::BadKek(format!("got {} bytes", bytes.len())))?;
        if key.iter().all(|b| *b == key[0]) {
            return Err(SealError::BadKek("got one byte repeated".into()));
        }
        let id = kek_id(&key);
        Ok(Kek { key, id })
    }

    /// Parses base64 text; surrounding whitespace (a trailing newline in a
    /// file) is ignored.
    pub fn from_base64(text: &str) -> Result<Kek, SealError> {
        let bytes = B64
            .decode(text.trim())
            .map_err(|e| SealError::BadKek(format!("not base64: {e}")))?;
        Kek::from_bytes(&bytes)
    }

    pub fn generate() -> Result<Kek, SealError> {
        let mut key = [0u8; KEK_LEN];
        SystemRandom::new()
            .fill(&mut key)
            .map_err(|_| SealError::Random)?;
        Kek::from_bytes(&key)
    }

    pub fn to_base64(&self) -> String {
        B64.encode(self.key)
    }

    /// A public name for this KEK (16 hex digits of a hash of it): stored
    /// beside each sealed value and shown in errors and logs.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn aead(&self) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &self.key).expect("32-byte AES-256 key"))
    }
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kek").field("id", &self.id).finish()
    }
}

fn kek_id(key: &[u8]) -> String {
    let digest = Sha256::new()
        .chain_update(b"isdp kek id v1\0")
        .chain_update(key)
        .finalize();
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

// === impl Keyring ===

impl Keyring {
    pub fn new(current: Kek, previous: Option<Kek>) -> Keyring {
        Keyring { current, previous }
    }

    pub fn current(&self) -> &Kek {
        &self.current
    }

    /// Seals `plaintext` under the current KEK, bound to `aad`.
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Sealed, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SealError::Random)?;
        let mut buf = plaintext.to_vec();
        self.current
            .aead()
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut buf,
            )
            .map_err(|_| SealError::Random)?;
        Ok(Sealed {
            alg: ALGORITHM.to_owned(),
            kek: self.current.id.clone(),
            nonce: B64.encode(nonce),
            ciphertext: B64.encode(buf),
        })
    }

    /// Opens a value sealed under either KEK with the same `aad`.
    pub fn open(&self, sealed: &Sealed, aad: &[u8]) -> Result<(Vec<u8>, OpenedWith), SealError> {
        if sealed.alg != ALGORITHM {
            return Err(SealError::Algorithm(sealed.alg.clone()));
        }
        let (kek, which) = if sealed.kek == self.current.id {
            (&self.current, OpenedWith::Current)
        } else {
            match &self.previous {
                Some(p) if sealed.kek == p.id => (p, OpenedWith::Previous),
                _ => {
                    return Err(SealError::UnknownKek {
                        sealed_with: sealed.kek.clone(),
                        have: self.to_string(),
                    });
                }
            }
        };
        let nonce: [u8; NONCE_LEN] = B64
            .decode(&sealed.nonce)
            .map_err(|e| SealError::Malformed(format!("nonce: {e}")))?
            .try_into()
            .map_err(|_| SealError::Malformed(format!("nonce is not {NONCE_LEN} bytes")))?;
        let mut buf = B64
            .decode(&sealed.ciphertext)
            .map_err(|e| SealError::Malformed(format!("ciphertext: {e}")))?;
        if buf.len() < AES_256_GCM.tag_len() {
            return Err(SealError::Malformed(
                "ciphertext is shorter than its tag (truncated)".into(),
            ));
        }
        let plain = kek
            .aead()
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut buf,
            )
            .map_err(|_| SealError::Tampered {
                kek: kek.id.clone(),
            })?;
        Ok((plain.to_vec(), which))
    }
}

impl std::fmt::Display for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KEK {} (current)", self.current.id)?;
        match &self.previous {
            Some(p) => write!(f, " and KEK {} (previous)", p.id),
            None => write!(f, " and no previous KEK"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AAD: &[u8] = b"/isdp/ca/roots\0fingerprint";

    fn ring(current: &Kek, previous: Option<&Kek>) -> Keyring {
        Keyring::new(current.clone(), previous.cloned())
    }

    #[test]
    fn round_trip_with_a_fresh_nonce_each_time() {
        let k = Kek::generate().unwrap();
        let keys = ring(&k, None);
        let a = keys.seal(b"-----BEGIN PRIVATE KEY-----", AAD).unwrap();
        let b = keys.seal(b"-----BEGIN PRIVATE KEY-----", AAD).unwrap();
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
        assert_eq!(a.kek, k.id());
        assert!(!a.ciphertext.contains("PRIVATE"));
        let (plain, with) = keys.open(&a, AAD).unwrap();
        assert_eq!(plain, b"-----BEGIN PRIVATE KEY-----");
        assert_eq!(with, OpenedWith::Current);
        // Through the stored (JSON) form too.
        let json = serde_json::to_string(&b).unwrap();
        let back: Sealed = serde_json::from_str(&json).unwrap();
        assert_eq!(keys.open(&back, AAD).unwrap().0, plain);
    }

    #[test]
    fn a_wrong_kek_is_named_not_mistaken_for_tampering() {
        let k1 = Kek::generate().unwrap();
        let k2 = Kek::generate().unwrap();
        let sealed = ring(&k1, None).seal(b"secret", AAD).unwrap();
        let err = ring(&k2, None).open(&sealed, AAD).unwrap_err();
        assert!(
            matches!(&err, SealError::UnknownKek { sealed_with, .. } if sealed_with == k1.id()),
            "{err}"
        );
        assert!(err.to_string().contains(k2.id()), "{err}");
        // A previous KEK still opens it, and says so.
        let (plain, with) = ring(&k2, Some(&k1)).open(&sealed, AAD).unwrap();
        assert_eq!(plain, b"secret");
        assert_eq!(with, OpenedWith::Previous);
        // A KEK claiming another's id (an edited value) fails the tag.
        let forged = Sealed {
            kek: k2.id().to_owned(),
            ..sealed
        };
        let err = ring(&k2, None).open(&forged, AAD).unwrap_err();
        assert!(matches!(err, SealError::Tampered { .. }), "{err}");
    }

    #[test]
    fn tampered_ciphertext_nonce_or_aad_do_not_open() {
        let k = Kek::generate().unwrap();
        let keys = ring(&k, None);
        let sealed = keys.seal(b"secret key material", AAD).unwrap();
        let flip = |s: &str| {
            let mut bytes = B64.decode(s).unwrap();
            bytes[0] ^= 1;
            B64.encode(bytes)
        };
        let cases = [
            Sealed {
                ciphertext: flip(&sealed.ciphertext),
                ..sealed.clone()
            },
            Sealed {
                nonce: flip(&sealed.nonce),
                ..sealed.clone()
            },
        ];
        for bad in &cases {
            let err = keys.open(bad, AAD).unwrap_err();
            assert!(matches!(err, SealError::Tampered { .. }), "{err}");
        }
        for aad in [
            &b"/other/ca/roots\0fingerprint"[..],
            b"",
            b"/isdp/ca/roots\0other",
        ] {
            let err = keys.open(&sealed, aad).unwrap_err();
            assert!(matches!(err, SealError::Tampered { .. }), "{err}");
        }
        let err = keys
            .open(
                &Sealed {
                    alg: "ROT13".into(),
                    ..sealed.clone()
                },
                AAD,
            )
            .unwrap_err();
        assert!(matches!(err, SealError::Algorithm(_)), "{err}");
    }

    #[test]
    fn truncated_or_malformed_values_are_errors_not_panics() {
        let k = Kek::generate().unwrap();
        let keys = ring(&k, None);
        let sealed = keys.seal(b"secret key material", AAD).unwrap();
        let raw = B64.decode(&sealed.ciphertext).unwrap();
        // Shorter by one byte: fails the tag; shorter than a tag: malformed.
        for (len, tampered) in [(raw.len() - 1, true), (10, false), (0, false)] {
            let cut = Sealed {
                ciphertext: B64.encode(&raw[..len]),
                ..sealed.clone()
            };
            let err = keys.open(&cut, AAD).unwrap_err();
            match tampered {
                true => assert!(matches!(err, SealError::Tampered { .. }), "{err}"),
                false => assert!(matches!(err, SealError::Malformed(_)), "{err}"),
            }
        }
        let bad_nonce = Sealed {
            nonce: B64.encode([0u8; 8]),
            ..sealed.clone()
        };
        assert!(matches!(
            keys.open(&bad_nonce, AAD),
            Err(SealError::Malformed(_))
        ));
        let not_b64 = Sealed {
            ciphertext: "%%%".into(),
            ..sealed
        };
        assert!(matches!(
            keys.open(&not_b64, AAD),
            Err(SealError::Malformed(_))
        ));
    }

    #[test]
    fn keks_parse_from_base64_and_refuse_anything_else() {
        let k = Kek::generate().unwrap();
        let text = format!("{}\n", k.to_base64());
        let back = Kek::from_base64(&text).unwrap();
        assert_eq!(back.id(), k.id());
        assert_eq!(kek_id(&k.key), k.id());
        assert!(!format!("{k:?}").contains(&k.to_base64()));
        for bad in [
            "",
            "not base64!",
            &B64.encode([7u8; 16]),
            &B64.encode([0u8; 32]),
        ] {
            let err = Kek::from_base64(bad).unwrap_err();
            assert!(matches!(err, SealError::BadKek(_)), "{bad:?}: {err}");
            assert!(err.to_string().contains("head -c 32 /dev/urandom"), "{err}");
        }
    }
}
