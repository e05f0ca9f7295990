//! Names both sides of the mesh must agree on: what a service name may be,
//! what an id (an instance's, a node's) may be, the SPIFFE ID a service's
//! certificates carry, and the TLS server name (SNI and DNS SAN) its
//! sidecars answer to. The CA writes them, sidecars and the control plane's
//! TLS listener read them back; the control plane checks ids with the rule
//! `isdpctl` checks a node id with before writing it into a gRPC bootstrap.

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

/// Longest id (instance id, node id).
pub const MAX_ID_LEN: usize = 128;

/// What an id (an instance's, a sidecar's or gRPC client's node id) must
/// be, for messages; [`is_valid_id`] checks it.
pub const ID_RULE: &str = "1 to 128 characters of letters, digits, '.', '_', '-' or ':'";

/// Whether `id` follows [`ID_RULE`]. Ids are shown in logs, spans and
/// `isdpctl proxy-status`, so they hold nothing that needs quoting.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-' | b':'))
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

/// The trust domain and service of a service identity
/// (`spiffe://<trust-domain>/svc/<service>`), whatever its trust domain:
/// for a client that learns the trust domain from its first certificate.
pub fn split_service_spiffe_id(id: &str) -> Option<(&str, &str)> {
    let (trust_domain, service) = id.strip_prefix("spiffe://")?.split_once("/svc/")?;
    let valid =
        !trust_domain.is_empty() && !trust_domain.contains('/') && check_dns_label(service).is_ok();
    valid.then_some((trust_domain, service))
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
    fn ids() {
        for ok in ["a", "web-1.pod_2:x", &"n".repeat(MAX_ID_LEN)] {
            assert!(is_valid_id(ok), "{ok}");
        }
        for bad in ["", "a b", "a/b", "é", "a\n", &"n".repeat(MAX_ID_LEN + 1)] {
            assert!(!is_valid_id(bad), "{bad:?}");
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
        assert_eq!(split_service_spiffe_id(&id), Some(("mesh.local", "web")));
        for bad in [
            "spiffe://mesh.local/svc/a/b",
            "spiffe:///svc/web",
            "spiffe://a/b/svc/web",
            "spiffe://mesh.local/svc/Web",
            "https://mesh.local/svc/web",
        ] {
            assert_eq!(split_service_spiffe_id(bad), None, "{bad}");
        }
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
