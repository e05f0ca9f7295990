//! PEM, the text form of certificates and keys that files, tonic and the
//! CA's store speak.

use base64::Engine as _;

/// A certificate chain and its private key, PEM-encoded: a workload's
/// identity as tonic and rustls take it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainPem {
    pub chain: String,
    pub key: String,
}

/// DER as one PEM block of `label` (`CERTIFICATE`, `PRIVATE KEY`, ...).
pub fn der_to_pem(der: &[u8], label: &str) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// A DER certificate as PEM.
pub fn cert_to_pem(der: &[u8]) -> String {
    der_to_pem(der, "CERTIFICATE")
}

/// The DER of the first PEM block of `label` in `text`.
pub fn pem_to_der(text: &str, label: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)? + begin.len();
    let stop = start + text[start..].find(&end)?;
    let b64: String = text[start..stop]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let der: Vec<u8> = (0..=255u8).cycle().take(700).collect();
        let pem = cert_to_pem(&der);
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert!(pem.lines().all(|l| l.len() <= 64));
        assert_eq!(pem_to_der(&pem, "CERTIFICATE"), Some(der));
        assert_eq!(pem_to_der(&pem, "PRIVATE KEY"), None);
        assert_eq!(
            pem_to_der("-----BEGIN X-----\n!!\n-----END X-----", "X"),
            None
        );
    }
}
