//! The grant a workload certificate carries: the join token it was issued
//! under and that token's read scope (the upstreams its holder may
//! discover over xDS). A caller that authenticates with the certificate
//! keeps the token's scope rather than widening it; revoking the token cuts
//! the certificate off too (here, and on every sidecar, which learns the
//! revoked tokens with the trust bundle), and the token's expiry ends it
//! (the certificate is issued to end by then, and refused past it).
//!
//! The extension's DER lives in `isdp_core::grant`, which both sides read
//! it with; this module only wraps it for rcgen.
//! The control plane reads it only on certificates that chain to its own
//! root.

pub use isdp_core::grant::{Grant, OID, of_certificate};

/// The extension for `grant`: non-critical, so verifiers that do not know
/// it ignore it.
pub fn extension(grant: &Grant) -> rcgen::CustomExtension {
    rcgen::CustomExtension::from_oid_content(OID, isdp_core::grant::encode(grant))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_extension_holds_the_shared_encoding() {
        let grant = Grant {
            token: "0123456789abcdef".into(),
            upstreams: Some(vec!["payments".into()]),
        };
        let ext = extension(&grant);
        assert!(!ext.criticality());
        assert_eq!(isdp_core::grant::decode(ext.content()), Some(grant));
    }
}
