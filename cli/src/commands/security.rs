//! `isdpctl token ...` and `isdpctl ca ...`: tokens and the mesh CA.

use std::{io::Write, time::Duration};

use clap::Subcommand;
use isdp_core::dial::ControlChannel;
use isdp_proto::v1::{
    CreateTokenRequest, ListTokensRequest, RevokeTokenRequest, RotateRootRequest, TokenInfo,
    TrustBundle, TrustBundleRequest, certificates_client::CertificatesClient,
    tokens_client::TokensClient,
};
use serde_json::json;

use super::{CtlError, Format, api};
use isdp_core::{pem::cert_to_pem, role::Role};

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Mint a token and print its secret (shown only once).
    Create {
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// A service a join token may act as; repeat for more.
        #[arg(long = "service")]
        services: Vec<String>,
        /// A service a join token may discover over xDS besides its own;
        /// repeat for more. Without any, the token reads every service.
        #[arg(long = "upstream")]
        upstreams: Vec<String>,
        /// Expire after this long, e.g. 1h; never when omitted.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token by id; it stops working at once.
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Start signing with a new root; the old one stays trusted until
    /// --prune-after has passed (default: the longest leaf lifetime).
    Rotate {
        #[arg(long, value_parser = humantime::parse_duration)]
        prune_after: Option<Duration>,
    },
    /// Print the trust bundle (PEM).
    Bundle,
}

fn parse_role(name: &str) -> Result<Role, String> {
    Role::parse(name).ok_or_else(|| format!("{name:?} is not a role: read, write, admin or join"))
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

pub async fn token(
    channel: ControlChannel,
    fmt: Format,
    cmd: TokenCommand,
) -> Result<(), CtlError> {
    let mut client = TokensClient::new(channel);
    let mut out = std::io::stdout().lock();
    match cmd {
        TokenCommand::Create {
            role: r,
            services,
            upstreams,
            ttl,
            description,
        } => {
            let resp = client
                .create(CreateTokenRequest {
                    role: r.to_proto() as i32,
                    services,
                    upstreams,
                    description,
                    ttl_seconds: ttl.map_or(0, |t| t.as_secs().max(1)),
                })
                .await
                .map_err(api("token create"))?
                .into_inner();
            let info = resp.info.unwrap_or_default();
            match fmt {
                Format::Json => {
                    let mut v = token_json(&info);
                    v["secret"] = json!(resp.secret);
                    let _ = writeln!(out, "{v}");
                }
                Format::Table => {
                    // Only the secret on stdout, so `T=$(isdpctl token
                    // create ...)` captures exactly it; the note is for
                    // the person at the terminal.
                    let _ = writeln!(out, "{}", resp.secret);
                    eprintln!(
                        "token {} ({}) created; the secret is not shown again",
                        info.id,
                        role_name(info.role)
                    );
                }
            }
        }
        TokenCommand::List => {
            let resp = client
                .list(ListTokensRequest {})
                .await
                .map_err(api("token list"))?
                .into_inner();
            match fmt {
                Format::Json => {
                    let list: Vec<_> = resp.tokens.iter().map(token_json).collect();
                    let _ = writeln!(out, "{}", json!(list));
                }
                Format::Table => {
                    let _ = writeln!(
                        out,
                        "{:<18} {:<6} {:<20} {:<14} DESCRIPTION",
                        "ID", "ROLE", "SCOPE", "EXPIRES"
                    );
                    for t in &resp.tokens {
                        let expires = if t.expires_at_unix_ms == 0 {
                            "never".to_owned()
                        } else {
                            let left = t.expires_at_unix_ms - unix_ms();
                            if left <= 0 {
                                "expired".to_owned()
                            } else {
                                humantime::format_duration(Duration::from_secs(
                                    (left / 1000) as u64,
                                ))
                                .to_string()
                            }
                        };
                        let _ = writeln!(
                            out,
                            "{:<18} {:<6} {:<20} {:<14} {}",
                            t.id,
                            role_name(t.role),
                            scope(t),
                            expires,
                            t.description
                        );
                    }
                }
            }
        }
        TokenCommand::Revoke { id } => {
            let until = client
                .revoke(RevokeTokenRequest { id: id.clone() })
                .await
                .map_err(api("token revoke"))?
                .into_inner()
                .remembered_until_unix_ms;
            match fmt {
                Format::Json => {
                    let _ = writeln!(
                        out,
                        "{}",
                        json!({ "revoked": id, "remembered_until_unix_ms": until })
                    );
                }
                Format::Table => {
                    let left = (until - unix_ms()).max(0) as u64;
                    let _ = writeln!(
                        out,
                        "revoked {id}; sidecars refuse the certificates issued under it for {}",
                        humantime::format_duration(Duration::from_secs(left.div_ceil(1000)))
                    );
                }
            }
        }
    }
    Ok(())
}

pub async fn ca(channel: ControlChannel, fmt: Format, cmd: CaCommand) -> Result<(), CtlError> {
    let mut client = CertificatesClient::new(channel);
    let bundle = match cmd {
        CaCommand::Rotate { prune_after } => {
            client
                .rotate_root(RotateRootRequest {
                    prune_after_seconds: prune_after.map_or(0, |d| d.as_secs().max(1)),
                })
                .await
                .map_err(api("ca rotate"))?
                .into_inner()
                .bundle
        }
        CaCommand::Bundle => {
            client
                .trust_bundle(TrustBundleRequest {})
                .await
                .map_err(api("ca bundle"))?
                .into_inner()
                .bundle
        }
    };
    print_bundle(fmt, &bundle.unwrap_or_default());
    Ok(())
}

fn print_bundle(fmt: Format, bundle: &TrustBundle) {
    let pems: Vec<String> = bundle.roots_der.iter().map(|d| cert_to_pem(d)).collect();
    let mut out = std::io::stdout().lock();
    match fmt {
        Format::Json => {
            let _ = writeln!(
                out,
                "{}",
                json!({ "trust_domain": bundle.trust_domain, "roots_pem": pems })
            );
        }
        Format::Table => {
            let _ = write!(out, "{}", pems.concat());
        }
    }
}

fn role_name(r: i32) -> &'static str {
    Role::from_proto(r).map_or("?", Role::name)
}

/// A join token's services, and the upstreams it is narrowed to.
fn scope(t: &TokenInfo) -> String {
    if t.upstreams.is_empty() {
        t.services.join(",")
    } else {
        format!("{}->{}", t.services.join(","), t.upstreams.join(","))
    }
}

fn token_json(t: &TokenInfo) -> serde_json::Value {
    json!({
        "id": t.id,
        "role": role_name(t.role),
        "services": t.services,
        "upstreams": t.upstreams,
        "description": t.description,
        "created_at_unix_ms": t.created_at_unix_ms,
        "expires_at_unix_ms": t.expires_at_unix_ms,
    })
}
