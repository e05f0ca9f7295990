//! The grant a workload certificate carries: the id of the token it was
//! issued under and that token's read scope (the upstreams its holder may
//! discover over xDS). The control plane's CA writes it (`ca::grant`, which
//! wraps [`encode`] in an rcgen extension) and reads it back when a sidecar
//! authenticates with its certificate; sidecars read it from their peers'
//! certificates to refuse those issued under a revoked token
//! (`proxy::transport::revoked`). Both sides use this one codec.
//!
//! A non-critical X.509 extension (so verifiers that do not know it, webpki
//! included, ignore it) whose value is the DER of
//! `SEQUENCE { token UTF8String, upstreams SEQUENCE OF UTF8String OPTIONAL }`;
//! no upstreams: every service. It is only meaningful on a certificate that
//! chains to the mesh's roots, so it is read after the chain is verified.

use x509_parser::prelude::{FromDer, X509Certificate};

/// The extension's OID, in the project's own arc: 1.3.6.1.4.1.61803.1.1.
pub const OID: &[u64] = &[1, 3, 6, 1, 4, 1, 61803, 1, 1];

/// Who vouched for a certificate, and what it may read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The id of the token the first certificate of the chain of renewals
    /// was signed for.
    pub token: String,
    /// `None`: every service.
    pub upstreams: Option<Vec<String>>,
}

/// The extension's value (DER) for `grant`.
pub fn encode(grant: &Grant) -> Vec<u8> {
    let mut body = Vec::new();
    push_tlv(&mut body, UTF8_STRING, grant.token.as_bytes());
    if let Some(upstreams) = &grant.upstreams {
        let mut items = Vec::new();
        for name in upstreams {
            push_tlv(&mut items, UTF8_STRING, name.as_bytes());
        }
        push_tlv(&mut body, SEQUENCE, &items);
    }
    let mut seq = Vec::new();
    push_tlv(&mut seq, SEQUENCE, &body);
    seq
}

/// The grant in a certificate (DER): `None` when it has none, or an
/// unreadable one.
pub fn of_certificate(der: &[u8]) -> Option<Grant> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let oid = x509_parser::oid_registry::Oid::from(OID).ok()?;
    let ext = cert.extensions().iter().find(|e| e.oid == oid)?;
    decode(ext.value)
}

/// The grant in an extension value; `None` if it is malformed.
pub fn decode(value: &[u8]) -> Option<Grant> {
    let (tag, body, rest) = tlv(value)?;
    if tag != SEQUENCE || !rest.is_empty() {
        return None;
    }
    let (tag, token, rest) = tlv(body)?;
    if tag != UTF8_STRING || token.is_empty() {
        return None;
    }
    let token = std::str::from_utf8(token).ok()?.to_owned();
    if rest.is_empty() {
        return Some(Grant {
            token,
            upstreams: None,
        });
    }
    let (tag, mut items, rest) = tlv(rest)?;
    if tag != SEQUENCE || !rest.is_empty() {
        return None;
    }
    let mut upstreams = Vec::new();
    while !items.is_empty() {
        let (tag, name, rest) = tlv(items)?;
        if tag != UTF8_STRING {
            return None;
        }
        upstreams.push(std::str::from_utf8(name).ok()?.to_owned());
        items = rest;
    }
    Some(Grant {
        token,
        upstreams: Some(upstreams),
    })
}

const UTF8_STRING: u8 = 0x0c;
const SEQUENCE: u8 = 0x30;

/// One DER tag-length-value: (tag, value, what follows).
fn tlv(buf: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, buf) = buf.split_first()?;
    let (&first, mut buf) = buf.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || buf.len() < n {
            return None;
        }
        let (bytes, rest) = buf.split_at(n);
        buf = rest;
        bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
    };
    (buf.len() >= len).then(|| (tag, &buf[..len], &buf[len..]))
}

fn push_tlv(out: &mut Vec<u8>, tag: u8, value: &[u8]) {
    out.push(tag);
    push_len(out, value.len());
    out.extend_from_slice(value);
}

fn push_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_and_without_upstreams() {
        for n in [None, Some(0), Some(1), Some(40)] {
            let grant = Grant {
                token: "0123456789abcdef".into(),
                upstreams: n.map(|n| (0..n).map(|i| format!("service-{i}")).collect()),
            };
            assert_eq!(decode(&encode(&grant)), Some(grant), "{n:?} upstreams");
        }
    }

    #[test]
    fn malformed_values_are_refused() {
        assert_eq!(decode(&[]), None);
        assert_eq!(decode(&[0x30, 0x05, 0x0c]), None, "truncated");
        assert_eq!(decode(&[0x31, 0x00]), None, "a SET, not a SEQUENCE");
        assert_eq!(decode(&[0x30, 0x00]), None, "no token");
        assert_eq!(
            decode(&[0x30, 0x03, 0x0c, 0x01, b't', 0x00]),
            None,
            "trailing bytes"
        );
        let bad_item = [0x30, 0x07, 0x0c, 0x01, b't', 0x30, 0x02, 0x04, 0x00];
        assert_eq!(
            decode(&bad_item),
            None,
            "an upstream that is not a UTF8String"
        );
    }

    #[test]
    fn read_from_a_certificate() {
        let cert = |grant: Option<&Grant>| {
            let mut params = rcgen::CertificateParams::new(vec!["web.test".to_owned()]).unwrap();
            if let Some(grant) = grant {
                params
                    .custom_extensions
                    .push(rcgen::CustomExtension::from_oid_content(OID, encode(grant)));
            }
            let key = rcgen::KeyPair::generate().unwrap();
            params.self_signed(&key).unwrap().der().to_vec()
        };
        let grant = Grant {
            token: "0123456789abcdef".into(),
            upstreams: Some(vec!["payments".into()]),
        };
        assert_eq!(of_certificate(&cert(Some(&grant))), Some(grant));
        assert_eq!(of_certificate(&cert(None)), None);
        assert_eq!(of_certificate(b"not a certificate"), None);
    }
}
