//! Names both sides of the mesh must agree on: what a service name may be,
//! the SPIFFE ID a service's certificates carry, and the TLS server name
//! (SNI and DNS SAN) its sidecars answer to. The CA writes them, sidecars
//! and the control plane's TLS listener read them back.

/// Checks a DNS label: lowercase a-z, 0-9 and '-', 1 to 63 characters, not
/// starting or ending with '-'. Service names are labels, so they fit in a
/// server name and a SPIFFE path segment unescaped.
pub fn check_dns_label(name: &str) -> Result<(), String> {
    let valid = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "must be a DNS label (1-63 of a-z, 0-9, '-', not starting or ending with '-'), got {name:?}"
        ))
    }
}

/// `spiffe://<trust-domain>/svc/<service>`: the identity in every workload
/// certificate of `service`.
pub fn service_spiffe_id(trust_domain: &str, service: &str) -> String {
    format!("spiffe://{trust_domain}/svc/{service}")
}

/// The service a SPIFFE ID names, if it is a service identity in
/// `trust_domain`.
pub fn service_of_spiffe_id(trust_domain: &str, id: &str) -> Option<String> {
    let rest = id.strip_prefix("spiffe://")?.strip_prefix(trust_domain)?;
    let service = rest.strip_prefix("/svc/")?;
    check_dns_label(service).ok()?;
    Some(service.to_owned())
}

/// `<service>.svc.<trust-domain>`: the TLS server name (SNI, and the
/// certificate's DNS SAN) of a service's sidecars.
pub fn server_name(trust_domain: &str, service: &str) -> String {
    format!("{service}.svc.{trust_domain}")
}

/// The service a server name names, if it is in `trust_domain`.
pub fn service_of_server_name(server_name: &str, trust_domain: &str) -> Option<String> {
    let service = server_name
        .strip_suffix(trust_domain)?
        .strip_suffix(".svc.")?;
    (!service.is_empty() && !service.contains('.')).then(|| service.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        for ok in ["a", "web", "pay-1", &"x".repeat(63)] {
            assert!(check_dns_label(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "Web", "a.b", "a_b", &"x".repeat(64)] {
            let err = check_dns_label(bad).unwrap_err();
            assert!(err.contains("DNS label"), "{bad}: {err}");
        }
    }

    #[test]
    fn spiffe_ids_round_trip() {
        let id = service_spiffe_id("mesh.local", "web");
        assert_eq!(id, "spiffe://mesh.local/svc/web");
        assert_eq!(
            service_of_spiffe_id("mesh.local", &id).as_deref(),
            Some("web")
        );
        assert_eq!(service_of_spiffe_id("other", &id), None);
        assert_eq!(
            service_of_spiffe_id("mesh.local", "spiffe://mesh.local/ns/x"),
            None
        );
        assert_eq!(
            service_of_spiffe_id("mesh.local", "spiffe://mesh.local/svc/a/b"),
            None
        );
    }

    #[test]
    fn server_names_round_trip() {
        assert_eq!(server_name("mesh.local", "web"), "web.svc.mesh.local");
        assert_eq!(
            service_of_server_name("web.svc.mesh.local", "mesh.local").as_deref(),
            Some("web")
        );
        assert_eq!(
            service_of_server_name("a.b.svc.mesh.local", "mesh.local"),
            None
        );
        assert_eq!(service_of_server_name("web.svc.other", "mesh.local"), None);
        assert_eq!(
            service_of_server_name(".svc.mesh.local", "mesh.local"),
            None
        );
    }
}
