//! `isdpctl bootstrap grpc`: everything a proxyless gRPC client (grpcio,
//! grpc-go, grpc-java dialling `xds:///<service>`) needs to join the mesh,
//! written into one directory: its key, a mesh certificate, the trust
//! bundle and a gRPC xDS bootstrap (gRFC A27) that authenticates to the
//! control plane with that certificate (gRFC A65) and hands the same files
//! to gRPC's xDS credentials for mTLS to sidecars (gRFC A29).
//!
//! Such a client cannot send a bearer token to the xDS server, so its
//! credential is the certificate: the control plane takes a mesh
//! certificate as the join principal of its service, with the read scope
//! of the token it was issued under. A join token is therefore used once,
//! to sign the first certificate, and never written down: `--renew` signs
//! the next certificate on the strength of the current one, as a sidecar
//! renews, so the directory holds no secret but the key.
//!
//! # Layout
//! - `plan`: the flags, checked before anything is touched.
//! - `files`: the output directory and atomic writes.
//! - `document`: the bootstrap JSON, written and read back.
//! - `identity`: the key, its CSR and `Certificates/Sign`.
//! - `token`: the join token created when none is given.

mod document;
mod files;
mod identity;
mod plan;
mod token;

use std::{
    io::Write as _,
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use clap::{Args, Subcommand};
use isdp_core::{
    dial::{ClientIdentity, ControlAuth},
    pem::ChainPem,
};
use serde_json::json;

use super::{Cli, Format};
use files::{BOOTSTRAP, CA, CERT, KEY, OutDir};
use plan::Plan;

#[derive(Debug, Subcommand)]
pub enum BootstrapCommand {
    /// Write a key, a mesh certificate, the trust bundle and a gRPC xDS
    /// bootstrap for a proxyless gRPC client into --out, and print
    /// `export GRPC_XDS_BOOTSTRAP=...`. Rerun with --renew (from cron or a
    /// systemd timer) to renew the certificate in place.
    Grpc(GrpcArgs),
}

#[derive(Debug, Args)]
pub struct GrpcArgs {
    /// The service the client is (a DNS label): its certificate's SPIFFE
    /// ID and its node's cluster.
    #[arg(long)]
    service: String,
    /// A service the client calls; repeat for more. Scopes the join token
    /// this command creates: the client then reads over xDS only its own
    /// service and these. Without any it reads every service. Not with
    /// --join-token or --renew, whose scope is the token's.
    #[arg(long = "upstream")]
    upstreams: Vec<String>,
    /// The directory to write (created 0700 if missing; its parent must
    /// exist).
    #[arg(long)]
    out: PathBuf,
    /// A join token for --service to sign the certificate with, instead of
    /// creating one (which needs an admin token). Used once, never written
    /// down. Prefer the variable: flags show in `ps`.
    #[arg(long, env = "ISDP_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// Expiry of the join token this command creates, e.g. 90days
    /// [default: never]. The certificate, and every renewal of it, ends no
    /// later than its token: past it, only a renewal with a new token
    /// (--renew --join-token) keeps the client in the mesh.
    #[arg(long, value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,
    /// How long the certificate should live [default: the control plane's
    /// --cert-lifetime]; capped at its --max-cert-lifetime and at the
    /// token's expiry. Renew well within it.
    #[arg(long, value_parser = humantime::parse_duration)]
    cert_lifetime: Option<Duration>,
    /// The client's xDS node id [default: <service>-<8 random hex digits>;
    /// with --renew, the one in the bootstrap].
    #[arg(long)]
    node_id: Option<String>,
    /// The client's locality zone [with --renew: the one in the bootstrap].
    #[arg(long)]
    zone: Option<String>,
    /// The control plane's address as the client dials it, HOST:PORT
    /// [default: the host and port of --control-plane; with --renew, the
    /// one in the bootstrap]. HOST must be one of the control plane's
    /// certificate names (see its --tls-san).
    #[arg(long)]
    server: Option<String>,
    /// Renew the certificate in an existing --out, keeping its key, node
    /// and server, authenticated by the current certificate (or by
    /// --join-token).
    /// A running client picks the new files up without a restart.
    #[arg(long)]
    renew: bool,
}

/// Why a bootstrap was refused or failed; each names the flag, file or
/// call at fault.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("--{flag}: {reason}")]
    Flag { flag: &'static str, reason: String },
    #[error("{}: {reason}", path.display())]
    Files { path: PathBuf, reason: String },
    #[error("--renew: {0}")]
    Renew(String),
    #[error("generating the key or CSR: {0}")]
    Key(String),
    #[error("cannot reach the control plane at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("{op}: {code:?}: {message}{hint}")]
    Api {
        op: &'static str,
        code: tonic::Code,
        message: String,
        hint: String,
    },
    #[error("the control plane sent an unusable certificate: {0}")]
    BadResponse(String),
}

fn flag(flag: &'static str, reason: impl Into<String>) -> BootstrapError {
    BootstrapError::Flag {
        flag,
        reason: reason.into(),
    }
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn rfc3339(unix_ms: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(u64::try_from(unix_ms).unwrap_or_default());
    humantime::format_rfc3339_seconds(at).to_string()
}

/// What a bootstrap did, for the output.
struct Outcome {
    dir: PathBuf,
    node_id: String,
    spiffe_id: String,
    not_after_unix_ms: i64,
    token_id: Option<String>,
}

pub async fn run(cli: &Cli, cmd: &BootstrapCommand) -> Result<(), BootstrapError> {
    let BootstrapCommand::Grpc(args) = cmd;
    let plan = Plan::check(cli, args)?;
    let dir = OutDir::open(&args.out, !args.renew)?;
    let outcome = match bootstrap(cli, &plan, &dir).await {
        Ok(o) => o,
        Err(e) => {
            dir.abandon();
            return Err(e);
        }
    };
    report(cli.output, args, &outcome);
    Ok(())
}

async fn bootstrap(cli: &Cli, plan: &Plan<'_>, dir: &OutDir) -> Result<Outcome, BootstrapError> {
    let args = plan.args;
    let existing = if args.renew {
        Some(identity::Existing::read(dir, &args.service)?)
    } else {
        dir.refuse_existing()?;
        None
    };
    let node_id = args
        .node_id
        .clone()
        .or_else(|| existing.as_ref().map(|e| e.saved.node_id.clone()))
        .unwrap_or_else(|| plan::default_node_id(&args.service));
    let zone = args
        .zone
        .clone()
        .or_else(|| existing.as_ref().and_then(|e| e.saved.zone.clone()));
    let server_uri = plan
        .server
        .clone()
        .or_else(|| existing.as_ref().map(|e| e.saved.server_uri.clone()))
        .unwrap_or_else(|| plan.url_server.clone());
    let key = match &existing {
        Some(e) => e.key(),
        None => identity::new_key(),
    }?;
    let ca_pem = trusted_roots(cli, existing.as_ref())?;
    let anonymous = ControlAuth {
        ca_pem: Some(ca_pem),
        ..Default::default()
    };

    let mut minted = None;
    let auth = match (&plan.join_token, &existing) {
        (Some(token), _) => ControlAuth {
            token: Some(token.clone()),
            ..anonymous
        },
        (None, Some(e)) => {
            e.check_current()?;
            ControlAuth {
                identity: ClientIdentity::fixed(ChainPem {
                    chain: e.cert_pem.clone(),
                    key: e.key_pem.clone(),
                }),
                ..anonymous
            }
        }
        (None, None) => {
            let m = token::mint(cli, args, &node_id, anonymous.clone()).await?;
            let auth = ControlAuth {
                token: Some(m.secret.clone()),
                ..anonymous
            };
            minted = Some(m);
            auth
        }
    };
    let written = async {
        let signed = identity::sign(
            &cli.control_plane,
            &auth,
            &args.service,
            &key,
            args.cert_lifetime,
        )
        .await?;
        let doc = document::render(&document::Bootstrap {
            server_uri: &server_uri,
            dir: dir.path(),
            node_id: &node_id,
            cluster: &args.service,
            zone: zone.as_deref(),
        });
        let mut staged = dir.stage();
        if existing.is_none() {
            staged.add(KEY, key.serialize_pem().as_bytes(), 0o600)?;
        }
        // The roots before the certificate they verify; the bootstrap last,
        // once every file it names is in place.
        staged.add(CA, signed.roots_pem.as_bytes(), 0o644)?;
        staged.add(CERT, signed.chain_pem.as_bytes(), 0o644)?;
        staged.add(BOOTSTRAP, doc.as_bytes(), 0o644)?;
        staged.commit()?;
        Ok(signed)
    }
    .await;
    let signed = match (written, minted.as_ref()) {
        (Ok(s), _) => s,
        (Err(e), Some(m)) => {
            token::revoke(cli, m).await;
            return Err(e);
        }
        (Err(e), None) => return Err(e),
    };
    Ok(Outcome {
        dir: dir.path().to_owned(),
        node_id,
        spiffe_id: signed.spiffe_id,
        not_after_unix_ms: signed.not_after_unix_ms,
        token_id: minted.map(|m| m.id),
    })
}

/// The roots to trust the control plane with. A first bootstrap uses the
/// operator's CA file. A renewal trusts the bundle it wrote last time as
/// well, so a client host needs no CA file of its own; after a root
/// rotation the control plane's certificate comes from the new root, which
/// that bundle lacks, so there the operator's CA file (`--ca-file`, or
/// `<data-dir>/ca.pem` when present) is added to it.
fn trusted_roots(
    cli: &Cli,
    existing: Option<&identity::Existing>,
) -> Result<String, BootstrapError> {
    let Some(e) = existing else {
        return super::ca_pem(cli).map_err(|e| flag("ca-file", e.to_string()));
    };
    let mut pem = e.ca_pem.clone();
    let operator = super::ca_file(cli);
    match std::fs::read_to_string(&operator) {
        Ok(more) => pem.push_str(&more),
        Err(err) if cli.ca_file.is_some() => {
            return Err(flag(
                "ca-file",
                format!("reading {}: {err}", operator.display()),
            ));
        }
        Err(_) => {}
    }
    Ok(pem)
}

/// The export line on stdout (or one JSON object), notes on stderr.
fn report(fmt: Format, args: &GrpcArgs, o: &Outcome) {
    let bootstrap = o.dir.join(BOOTSTRAP);
    let mut out = std::io::stdout().lock();
    match fmt {
        Format::Json => {
            let _ = writeln!(
                out,
                "{}",
                json!({
                    "bootstrap": bootstrap,
                    "dir": o.dir,
                    "node_id": o.node_id,
                    "spiffe_id": o.spiffe_id,
                    "not_after_unix_ms": o.not_after_unix_ms,
                    "token_id": o.token_id,
                    "renewed": args.renew,
                })
            );
        }
        Format::Table => {
            let _ = writeln!(
                out,
                "export GRPC_XDS_BOOTSTRAP={}",
                shell_quote(&bootstrap.display().to_string())
            );
        }
    }
    if let Some(id) = &o.token_id {
        let expiry = args.ttl.map_or("never expires".to_owned(), |t| {
            format!("expires in {}", humantime::format_duration(t))
        });
        let scope = if args.upstreams.is_empty() {
            "every service".to_owned()
        } else {
            args.upstreams.join(", ")
        };
        eprintln!(
            "created join token {id} for {} (reads {scope}; {expiry}); its secret is not kept: `isdpctl token revoke {id}` cuts this client off",
            args.service
        );
    }
    let left = Duration::from_secs(((o.not_after_unix_ms - unix_ms()).max(0) / 1000) as u64);
    eprintln!(
        "{} {}: {} (node {}) until {} ({}); renew before then, e.g. from cron: isdpctl bootstrap grpc --service {} --out {} --renew",
        if args.renew { "renewed" } else { "wrote" },
        o.dir.display(),
        o.spiffe_id,
        o.node_id,
        rfc3339(o.not_after_unix_ms),
        humantime::format_duration(left),
        args.service,
        shell_quote(&o.dir.display().to_string()),
    );
}

/// `s` as one shell word: as is when it holds only safe characters.
fn shell_quote(s: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "/._-+=:,@%".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words() {
        assert_eq!(
            shell_quote("/tmp/x/bootstrap.json"),
            "/tmp/x/bootstrap.json"
        );
        assert_eq!(shell_quote("/tmp/a b/it's"), r"'/tmp/a b/it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
