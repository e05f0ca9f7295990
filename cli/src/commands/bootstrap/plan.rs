//! The flags of `bootstrap grpc`, checked before anything is touched: a
//! refused run creates no directory and no token.

use std::time::Duration;

use isdp_core::names::{ID_RULE, check_dns_label, is_valid_id};

use super::{BootstrapError, GrpcArgs, flag};
use crate::commands::Cli;

/// The flags, checked before anything is touched.
pub struct Plan<'a> {
    pub args: &'a GrpcArgs,
    /// `--server`, checked.
    pub server: Option<String>,
    /// `host:port` of `--control-plane`: the client's server unless
    /// `--server`, or on renewal the bootstrap, says otherwise.
    pub url_server: String,
    pub join_token: Option<String>,
}

// === impl Plan ===

impl<'a> Plan<'a> {
    pub fn check(cli: &Cli, args: &'a GrpcArgs) -> Result<Self, BootstrapError> {
        check_dns_label(&args.service).map_err(|e| flag("service", e))?;
        for u in &args.upstreams {
            check_dns_label(u).map_err(|e| flag("upstream", e))?;
        }
        let join_token = args.join_token.as_deref().map(str::trim);
        if join_token == Some("") {
            return Err(flag("join-token", "is empty"));
        }
        let scope_from = match (join_token, args.renew) {
            (Some(_), _) => Some("--join-token (or ISDP_JOIN_TOKEN)"),
            (None, true) => Some("--renew"),
            (None, false) => None,
        };
        if let Some(from) = scope_from {
            if !args.upstreams.is_empty() {
                return Err(flag(
                    "upstream",
                    format!(
                        "scopes only a join token this command creates; with {from} the scope is that token's"
                    ),
                ));
            }
            if args.ttl.is_some() {
                return Err(flag(
                    "ttl",
                    format!(
                        "sets the expiry of a join token this command creates; with {from} no token is created"
                    ),
                ));
            }
        }
        if args.ttl.is_some_and(|t| t < Duration::from_secs(1)) {
            return Err(flag("ttl", "must be at least 1s"));
        }
        if args
            .cert_lifetime
            .is_some_and(|l| l < Duration::from_secs(1))
        {
            return Err(flag("cert-lifetime", "must be at least 1s"));
        }
        if let Some(id) = &args.node_id
            && !is_valid_id(id)
        {
            return Err(flag("node-id", format!("must be {ID_RULE}, got {id:?}")));
        }
        if let Some(zone) = &args.zone {
            check_zone(zone).map_err(|e| flag("zone", e))?;
        }
        let server = match &args.server {
            Some(s) => Some(host_port(s).map_err(|e| flag("server", e))?),
            None => None,
        };
        let url_server = server_of_url(&cli.control_plane).map_err(|e| flag("control-plane", e))?;
        if join_token.is_none() && !args.renew && crate::commands::operator_token(cli).is_none() {
            return Err(flag(
                "join-token",
                "none given, so this command creates a join token, which needs an admin token \
                 (--token, ISDP_TOKEN or <data-dir>/admin.token); or pass a join token for the service",
            ));
        }
        Ok(Plan {
            args,
            server,
            url_server,
            join_token: join_token.map(str::to_owned),
        })
    }
}

/// Most bytes of a zone: as much as an instance's metadata value, since a
/// zone names the same thing there.
const MAX_ZONE_LEN: usize = 512;

fn check_zone(zone: &str) -> Result<(), String> {
    if zone.is_empty() || zone.len() > MAX_ZONE_LEN || zone.chars().any(char::is_control) {
        return Err(format!(
            "must be 1 to {MAX_ZONE_LEN} bytes without control characters, got {zone:?}"
        ));
    }
    Ok(())
}

/// `HOST:PORT`, as gRPC's `server_uri` takes it (an IPv6 host in brackets).
fn host_port(s: &str) -> Result<String, String> {
    let bad = || format!("expected HOST:PORT, got {s:?}");
    let authority: http::uri::Authority = s.parse().map_err(|_| bad())?;
    let host = authority.host();
    let port_ok = authority.port_u16().is_some_and(|p| p != 0);
    let host_ok = !host.is_empty()
        && !s.contains('@')
        && (host.starts_with('[')
            || host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-'));
    if !port_ok || !host_ok {
        return Err(bad());
    }
    Ok(authority.as_str().to_owned())
}

/// The `host:port` of the control plane URL isdpctl dials, which the
/// client dials too unless `--server` says otherwise.
fn server_of_url(url: &str) -> Result<String, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("not a URL ({e}): {url:?}"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!(
            "the control plane serves TLS only, and a gRPC client's bootstrap names it by an https:// URL, got {url:?}"
        ));
    }
    let host = uri.host().ok_or_else(|| format!("no host in {url:?}"))?;
    Ok(format!("{host}:{}", uri.port_u16().unwrap_or(443)))
}

/// A node id for `service` that follows the id rule: the service (at most
/// 63 characters) and 8 random hex digits.
pub fn default_node_id(service: &str) -> String {
    format!("{service}-{:08x}", rand::random::<u32>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_addresses() {
        assert_eq!(
            server_of_url("https://127.0.0.1:15010").unwrap(),
            "127.0.0.1:15010"
        );
        assert_eq!(server_of_url("https://[::1]:9").unwrap(), "[::1]:9");
        assert_eq!(
            server_of_url("https://cp.example").unwrap(),
            "cp.example:443"
        );
        for bad in ["http://127.0.0.1:15010", "127.0.0.1:15010", "https://"] {
            assert!(server_of_url(bad).is_err(), "{bad}");
        }
        for ok in ["cp.example:15010", "10.0.0.1:1", "[::1]:15010"] {
            assert_eq!(host_port(ok).unwrap(), ok);
        }
        for bad in [
            "cp.example",
            "cp.example:0",
            "https://cp:1",
            "u@cp:1",
            "cp_x:1",
            "cp:1/x",
            ":1",
            "",
        ] {
            assert!(host_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn default_node_ids_follow_the_id_rule() {
        let longest = "s".repeat(63);
        for service in ["a", "web", longest.as_str()] {
            let id = default_node_id(service);
            assert!(is_valid_id(&id), "{id}");
            assert!(id.starts_with(&format!("{service}-")), "{id}");
            assert_eq!(id.len(), service.len() + 9);
        }
        assert_ne!(default_node_id("web"), default_node_id("web"));
    }

    #[test]
    fn zones() {
        assert!(check_zone("eu-west-1a").is_ok());
        for bad in ["", "a\nb", "\u{1b}[31m", &"z".repeat(MAX_ZONE_LEN + 1)] {
            assert!(check_zone(bad).is_err(), "{bad:?}");
        }
    }
}
