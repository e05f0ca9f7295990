//! Reading who a certificate names: its one URI SAN, a SPIFFE ID in the
//! mesh's trust domain; and when it ends and which key it certifies. Only
//! meaningful on a certificate whose chain was verified; these functions
//! parse, they do not verify.

use x509_parser::{extensions::GeneralName, prelude::FromDer};

/// Why a certificate does not name one mesh identity.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("certificate does not parse")]
    Unparsable,
    #[error("certificate has {0} URI SANs, a mesh certificate has exactly one")]
    UriSanCount(usize),
    #[error("SPIFFE ID {0:?} is not in trust domain {1:?}")]
    ForeignTrustDomain(String, String),
}

fn parse(der: &[u8]) -> Result<x509_parser::certificate::X509Certificate<'_>, CertError> {
    x509_parser::certificate::X509Certificate::from_der(der)
        .map(|(_, cert)| cert)
        .map_err(|_| CertError::Unparsable)
}

/// A certificate's notAfter, unix ms.
pub fn not_after_unix_ms(der: &[u8]) -> Result<i64, CertError> {
    Ok(parse(der)?
        .validity()
        .not_after
        .timestamp()
        .saturating_mul(1000))
}

/// The public key a certificate certifies (the subjectPublicKey bits: for
/// ECDSA the encoded point), to check a certificate is for a key held.
pub fn public_key(der: &[u8]) -> Result<Vec<u8>, CertError> {
    Ok(parse(der)?.public_key().subject_public_key.data.to_vec())
}

/// The single URI SAN of a certificate.
pub fn uri_san(der: &[u8]) -> Result<String, CertError> {
    let cert = parse(der)?;
    let sans = cert
        .subject_alternative_name()
        .map_err(|_| CertError::Unparsable)?;
    let mut uris = sans
        .iter()
        .flat_map(|s| s.value.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        });
    match (uris.next(), uris.next()) {
        (Some(uri), None) => Ok(uri.to_owned()),
        (None, _) => Err(CertError::UriSanCount(0)),
        (Some(_), Some(_)) => Err(CertError::UriSanCount(2 + uris.count())),
    }
}

/// The certificate's SPIFFE ID, checked to be in `trust_domain`.
pub fn spiffe_id(der: &[u8], trust_domain: &str) -> Result<String, CertError> {
    let id = uri_san(der)?;
    let in_domain = id
        .strip_prefix("spiffe://")
        .and_then(|rest| rest.strip_prefix(trust_domain))
        .is_some_and(|path| path.starts_with('/') && path.len() > 1);
    if !in_domain {
        return Err(CertError::ForeignTrustDomain(id, trust_domain.to_owned()));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(uris: &[&str]) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(vec!["x.test".to_owned()]).unwrap();
        for uri in uris {
            params.subject_alt_names.push(rcgen::SanType::URI(
                rcgen::string::Ia5String::try_from(*uri).unwrap(),
            ));
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn one_spiffe_id_in_the_trust_domain() {
        let one = leaf(&["spiffe://mesh.local/svc/web"]);
        assert_eq!(uri_san(&one).unwrap(), "spiffe://mesh.local/svc/web");
        assert_eq!(
            spiffe_id(&one, "mesh.local").unwrap(),
            "spiffe://mesh.local/svc/web"
        );
        assert!(matches!(
            spiffe_id(&one, "other.local"),
            Err(CertError::ForeignTrustDomain(..))
        ));
        assert_eq!(uri_san(&leaf(&[])), Err(CertError::UriSanCount(0)));
        assert_eq!(
            uri_san(&leaf(&["spiffe://a/svc/x", "spiffe://a/svc/y"])),
            Err(CertError::UriSanCount(2))
        );
        assert_eq!(uri_san(b"junk"), Err(CertError::Unparsable));
    }

    #[test]
    fn end_and_key() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["x.test".to_owned()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2031, 1, 2);
        let der = params.self_signed(&key).unwrap().der().to_vec();
        assert_eq!(not_after_unix_ms(&der).unwrap(), 1_925_078_400_000);
        assert_eq!(public_key(&der).unwrap(), key.public_key_raw());
        assert_eq!(not_after_unix_ms(b"junk"), Err(CertError::Unparsable));
    }
}
