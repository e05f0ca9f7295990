//! The DNS server's keys: where it listens (off unless `dns_listen` is
//! set), the domain it answers for, the TTL of its records, how many
//! addresses one answer carries and how many TCP connections it serves.
//!
//! Off by default: several sidecars may share a host, and only one of them
//! can have port 53 (or any given port).

use std::net::SocketAddr;

use super::ConfigError;

/// The domain answered for unless `dns_domain` says otherwise:
/// `payments.service.isdp`.
pub const DEFAULT_DNS_DOMAIN: &str = "isdp";
/// Seconds a client may cache an answer unless `dns_ttl` says otherwise:
/// short, since instances come and go with their health.
pub const DEFAULT_DNS_TTL_SECS: u32 = 5;
/// The longest `dns_ttl`: an hour. Past it a dead instance would be
/// cached for longer than anyone would wait for it.
pub const MAX_DNS_TTL_SECS: u32 = 3600;
/// Records one answer carries unless `dns_max_answers` says otherwise
/// (A/AAAA records, or SRV records each with its address).
pub const DEFAULT_DNS_MAX_ANSWERS: usize = 8;
/// The most `dns_max_answers` may be: 256 SRV records with their
/// addresses stay well inside one TCP message (64 KiB).
pub const MAX_DNS_MAX_ANSWERS: usize = 256;
/// TCP connections the DNS server serves at once unless
/// `dns_max_tcp_connections` says otherwise: DNS is mostly UDP, TCP is
/// for the rare truncated answer, so a few hundred are plenty.
pub const DEFAULT_DNS_MAX_TCP_CONNECTIONS: usize = 256;
/// The most `dns_max_tcp_connections` may be.
pub const MAX_DNS_MAX_TCP_CONNECTIONS: usize = 65536;
/// The longest `dns_domain`, leaving room in a 255-byte name for
/// `<63-byte label>.service.` or an instance id before it.
const MAX_DOMAIN_LEN: usize = 120;

/// The DNS server, when on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dns {
    /// UDP and TCP, on the same address and port (port 0 picks one).
    pub listen: SocketAddr,
    /// Lowercase labels without the trailing dot, e.g. `isdp` or
    /// `mesh.example`.
    pub domain: String,
    /// TTL of every record, in seconds; 0 asks clients not to cache.
    pub ttl: u32,
    /// Records per answer; more instances are sampled at random.
    pub max_answers: usize,
    /// TCP connections served at once; one over it is closed at accept.
    pub max_tcp_connections: usize,
}

/// The keys as written (file, flag or variable).
#[derive(Debug, Default)]
pub(super) struct DnsKeys<'a> {
    pub listen: Option<&'a str>,
    pub domain: Option<&'a str>,
    pub ttl: Option<&'a str>,
    pub max_answers: Option<i64>,
    pub max_tcp_connections: Option<i64>,
}

/// Validates the keys together: the others mean something only with a
/// listener, so they are refused without one rather than ignored.
pub(super) fn validate(keys: DnsKeys<'_>) -> Result<Option<Dns>, ConfigError> {
    let Some(listen) = keys.listen else {
        let stray = [
            ("dns_domain", keys.domain.is_some()),
            ("dns_ttl", keys.ttl.is_some()),
            ("dns_max_answers", keys.max_answers.is_some()),
            (
                "dns_max_tcp_connections",
                keys.max_tcp_connections.is_some(),
            ),
        ];
        if let Some((key, _)) = stray.iter().find(|(_, set)| *set) {
            return Err(ConfigError::invalid(
                *key,
                "set without dns_listen: the DNS server is off",
            ));
        }
        return Ok(None);
    };
    let listen: SocketAddr = listen.trim().parse().map_err(|e| {
        ConfigError::invalid(
            "dns_listen",
            format!("invalid address {listen:?}: {e} (expected ADDR:PORT, e.g. 127.0.0.1:15053)"),
        )
    })?;
    let domain = match keys.domain {
        Some(d) => check_domain(d).map_err(|r| ConfigError::invalid("dns_domain", r))?,
        None => DEFAULT_DNS_DOMAIN.to_owned(),
    };
    let ttl = match keys.ttl {
        Some(t) => ttl_secs(t).map_err(|r| ConfigError::invalid("dns_ttl", r))?,
        None => DEFAULT_DNS_TTL_SECS,
    };
    let max_answers = count(
        "dns_max_answers",
        keys.max_answers,
        DEFAULT_DNS_MAX_ANSWERS,
        MAX_DNS_MAX_ANSWERS,
    )?;
    let max_tcp_connections = count(
        "dns_max_tcp_connections",
        keys.max_tcp_connections,
        DEFAULT_DNS_MAX_TCP_CONNECTIONS,
        MAX_DNS_MAX_TCP_CONNECTIONS,
    )?;
    Ok(Some(Dns {
        listen,
        domain,
        ttl,
        max_answers,
        max_tcp_connections,
    }))
}

/// `key`'s value in `1..=max`, or `default` when unset.
fn count(
    key: &'static str,
    n: Option<i64>,
    default: usize,
    max: usize,
) -> Result<usize, ConfigError> {
    let Some(n) = n else {
        return Ok(default);
    };
    usize::try_from(n)
        .ok()
        .filter(|n| (1..=max).contains(n))
        .ok_or_else(|| ConfigError::invalid(key, format!("must be 1..={max}, got {n}")))
}

/// One or more DNS labels (the service-name rule), dot-separated, at most
/// [`MAX_DOMAIN_LEN`] bytes; a trailing dot is accepted and dropped.
fn check_domain(text: &str) -> Result<String, String> {
    let domain = text.trim().trim_end_matches('.').to_ascii_lowercase();
    if domain.is_empty() || domain.len() > MAX_DOMAIN_LEN {
        return Err(format!(
            "must be 1 to {MAX_DOMAIN_LEN} bytes of dot-separated labels, got {text:?}"
        ));
    }
    for label in domain.split('.') {
        isdp_core::names::check_dns_label(label)
            .map_err(|r| format!("label {label:?} of {text:?}: {r}"))?;
    }
    Ok(domain)
}

/// A duration in whole seconds (`5s`, `1m`, `0s`), at most
/// [`MAX_DNS_TTL_SECS`].
fn ttl_secs(text: &str) -> Result<u32, String> {
    let d = humantime::parse_duration(text.trim())
        .map_err(|e| format!("invalid duration {text:?}: {e}"))?;
    if d.subsec_nanos() != 0 {
        return Err(format!("must be whole seconds, got {text:?}"));
    }
    u32::try_from(d.as_secs())
        .ok()
        .filter(|s| *s <= MAX_DNS_TTL_SECS)
        .ok_or_else(|| format!("must be at most {MAX_DNS_TTL_SECS}s, got {text:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(listen: &str) -> DnsKeys<'_> {
        DnsKeys {
            listen: Some(listen),
            ..DnsKeys::default()
        }
    }

    #[test]
    fn off_by_default_and_defaults_when_on() {
        assert_eq!(validate(DnsKeys::default()).unwrap(), None);
        let dns = validate(keys("127.0.0.1:15053")).unwrap().unwrap();
        assert_eq!(dns.domain, "isdp");
        assert_eq!(dns.ttl, 5);
        assert_eq!(dns.max_answers, DEFAULT_DNS_MAX_ANSWERS);
        assert_eq!(dns.max_tcp_connections, 256);
    }

    #[test]
    fn errors_name_the_key_and_the_limit() {
        let err = |k: DnsKeys<'_>| validate(k).unwrap_err().to_string();
        let e = err(DnsKeys {
            domain: Some("x"),
            ..DnsKeys::default()
        });
        assert!(e.contains("dns_domain") && e.contains("dns_listen"), "{e}");
        let e = err(DnsKeys {
            max_answers: Some(0),
            ..keys("127.0.0.1:0")
        });
        assert!(
            e.contains("dns_max_answers") && e.contains("1..=256"),
            "{e}"
        );
        let e = err(DnsKeys {
            max_answers: Some(257),
            ..keys("127.0.0.1:0")
        });
        assert!(e.contains("dns_max_answers"), "{e}");
        let e = err(DnsKeys {
            max_tcp_connections: Some(0),
            ..keys("127.0.0.1:0")
        });
        assert!(
            e.contains("dns_max_tcp_connections") && e.contains("1..=65536"),
            "{e}"
        );
        let e = err(DnsKeys {
            max_tcp_connections: Some(8),
            ..DnsKeys::default()
        });
        assert!(
            e.contains("dns_max_tcp_connections") && e.contains("dns_listen"),
            "{e}"
        );
        let e = err(DnsKeys {
            ttl: Some("2h"),
            ..keys("127.0.0.1:0")
        });
        assert!(e.contains("dns_ttl") && e.contains("3600s"), "{e}");
        let e = err(DnsKeys {
            ttl: Some("1500ms"),
            ..keys("127.0.0.1:0")
        });
        assert!(e.contains("whole seconds"), "{e}");
        let e = err(DnsKeys {
            domain: Some("bad_label.x"),
            ..keys("127.0.0.1:0")
        });
        assert!(e.contains("dns_domain"), "{e}");
        let e = err(keys("nowhere"));
        assert!(e.contains("dns_listen"), "{e}");
    }

    #[test]
    fn ttl_zero_and_multi_label_domains_are_accepted() {
        let dns = validate(DnsKeys {
            ttl: Some("0s"),
            domain: Some("Mesh.Example."),
            ..keys("[::1]:0")
        })
        .unwrap()
        .unwrap();
        assert_eq!(dns.ttl, 0);
        assert_eq!(dns.domain, "mesh.example");
    }
}
