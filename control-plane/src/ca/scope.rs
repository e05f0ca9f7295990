//! The read scope a workload certificate carries: the upstreams its holder
//! may discover over xDS, copied from the join token that asked for it.
//! A sidecar that later authenticates with the certificate (its token
//! expired or revoked) keeps the token's scope rather than widening it.
//!
//! A non-critical X.509 extension (so other verifiers, the sidecars'
//! included, ignore it) whose value is a DER `SEQUENCE OF UTF8String`, one
//! service name each. Absent: every service. Only the control plane reads
//! it, and only on certificates that chain to its own root.

use x509_parser::prelude::{FromDer, X509Certificate};

/// The extension's OID, in the project's own arc: 1.3.6.1.4.1.61803.1.1.
pub const OID: &[u64] = &[1, 3, 6, 1, 4, 1, 61803, 1, 1];

/// The extension for `upstreams`.
pub fn extension(upstreams: &[String]) -> rcgen::CustomExtension {
    let mut items = Vec::new();
    for name in upstreams {
        items.push(0x0c); // UTF8String
        push_len(&mut items, name.len());
        items.extend_from_slice(name.as_bytes());
    }
    let mut seq = vec![0x30]; // SEQUENCE
    push_len(&mut seq, items.len());
    seq.extend(items);
    rcgen::CustomExtension::from_oid_content(OID, seq)
}

/// The scope in a certificate (DER): `None` when it has no such extension
/// (every service), the listed upstreams otherwise. A malformed value
/// reads as an empty list: nothing beyond the holder's own service.
pub fn of_certificate(der: &[u8]) -> Option<Vec<String>> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let oid = x509_parser::oid_registry::Oid::from(OID).ok()?;
    let ext = cert.extensions().iter().find(|e| e.oid == oid)?;
    Some(decode(ext.value).unwrap_or_default())
}

fn decode(value: &[u8]) -> Option<Vec<String>> {
    let (tag, body, rest) = tlv(value)?;
    if tag != 0x30 || !rest.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    let mut items = body;
    while !items.is_empty() {
        let (tag, name, rest) = tlv(items)?;
        if tag != 0x0c {
            return None;
        }
        out.push(std::str::from_utf8(name).ok()?.to_owned());
        items = rest;
    }
    Some(out)
}

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
    fn round_trips_short_and_long_lists() {
        for n in [0, 1, 3, 40] {
            let names: Vec<String> = (0..n).map(|i| format!("service-{i}")).collect();
            let ext = extension(&names);
            assert_eq!(decode(ext.content()), Some(names), "{n} names");
        }
    }

    #[test]
    fn malformed_values_are_refused() {
        assert_eq!(decode(&[]), None);
        assert_eq!(decode(&[0x30, 0x05, 0x0c]), None, "truncated");
        assert_eq!(decode(&[0x31, 0x00]), None, "a SET, not a SEQUENCE");
        assert_eq!(decode(&[0x30, 0x02, 0x04, 0x00]), None, "not a UTF8String");
        assert_eq!(decode(&[0x30, 0x00, 0x00]), None, "trailing bytes");
    }
}
