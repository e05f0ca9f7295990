//! The commands: flags, connecting, and the registry commands; the
//! others in a file each.
//!
//! # Layout
//! - `authz`: `isdpctl authz`, authorization rules.
//! - `bootstrap`: `isdpctl bootstrap grpc`, a key, certificate, trust
//!   bundle and xDS bootstrap for a proxyless gRPC client, renewed in place.
//! - `endpoints`: `isdpctl proxy-status --sidecar`, one sidecar's
//!   endpoints with the weight in force and why.
//! - `policy`: `isdpctl policy`, traffic policies from YAML documents.
//! - `security`: `token` and `ca` commands.

mod authz;
mod bootstrap;
mod endpoints;
mod policy;
mod security;

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};
use isdp_core::dial::{ControlAuth, ControlChannel};
use isdp_proto::v1::{
    DeregisterRequest, HealthCheck, Instance, ListInstancesRequest, ListProxiesRequest,
    ListServicesRequest, RegisterRequest, WatchServiceRequest,
    authorization_client::AuthorizationClient, policies_client::PoliciesClient,
    proxy_status_client::ProxyStatusClient, registry_client::RegistryClient,
};

use crate::output;
pub use crate::output::Format;
pub use bootstrap::{BootstrapCommand, BootstrapError};
pub use security::{CaCommand, TokenCommand};

#[derive(Debug, Parser)]
#[command(name = "isdpctl", version, about = "Operate an ISDP mesh")]
pub struct Cli {
    /// Control plane gRPC address.
    #[arg(
        long,
        global = true,
        env = "ISDP_CONTROL_PLANE",
        default_value = "https://127.0.0.1:15010"
    )]
    pub control_plane: String,

    /// The mesh CA (PEM) to check the control plane's certificate against
    /// [default: <data-dir>/ca.pem].
    #[arg(long, global = true, env = "ISDP_CA_FILE")]
    pub ca_file: Option<PathBuf>,

    /// Bearer token [default: the contents of <data-dir>/admin.token].
    /// Prefer the variable: flags show in `ps`.
    #[arg(long, global = true, env = "ISDP_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// The control plane's data dir, where a local control plane writes
    /// ca.pem and admin.token.
    #[arg(
        long,
        global = true,
        env = "ISDP_DATA_DIR",
        default_value = "./isdp-data"
    )]
    pub data_dir: PathBuf,

    /// Output format.
    #[arg(
        short = 'o',
        long = "output",
        global = true,
        value_enum,
        default_value = "table"
    )]
    pub output: Format,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Register an instance and print its id.
    Register {
        #[arg(long)]
        service: String,
        #[arg(long)]
        address: String,
        #[arg(long)]
        port: u32,
        /// Instance id; generated from the service name when omitted.
        #[arg(long)]
        id: Option<String>,
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// Metadata as KEY=VALUE; repeat for more.
        #[arg(long = "meta", value_parser = parse_kv)]
        meta: Vec<(String, String)>,
        /// The zone the instance runs in (a DNS label); callers in the
        /// same zone prefer it.
        #[arg(long)]
        zone: Option<String>,
        /// Failover priority, 0 (the highest) to 7: callers use higher
        /// numbers only for what lower ones cannot carry (standby
        /// instances, a DR site).
        #[arg(long, default_value_t = 0)]
        priority: u32,
        /// Health check: http://HOST:PORT/PATH, tcp://HOST:PORT or grpc://HOST:PORT[/SERVICE].
        #[arg(long)]
        check: Option<String>,
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        interval: Duration,
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Consecutive passes to turn healthy.
        #[arg(long, default_value_t = 1)]
        rise: u32,
        /// Consecutive failures to turn unhealthy.
        #[arg(long, default_value_t = 1)]
        fall: u32,
    },
    /// Remove an instance by id.
    Deregister { id: String },
    /// List services with instance counts.
    Services,
    /// List a service's instances with their health.
    Instances { service: String },
    /// Print a service's instances now and after every change.
    Watch { service: String },
    /// List the sidecars connected to this control plane and the versions
    /// each has acknowledged, to see that a change landed everywhere. With
    /// --sidecar: that sidecar's endpoints, each with the weight its
    /// balancer uses and why (load, outlier ejection, zone).
    ProxyStatus {
        /// A sidecar's admin address (HOST:PORT, e.g. 127.0.0.1:15000):
        /// show its endpoints instead, read from its `/config`.
        #[arg(long)]
        sidecar: Option<String>,
        /// With --sidecar: this upstream's endpoints only.
        #[arg(long, requires = "sidecar")]
        upstream: Option<String>,
    },
    /// Authorization rules: which services may call which.
    #[command(subcommand)]
    Authz(authz::AuthzCommand),
    /// Traffic policies: timeouts, retries, breakers, outlier detection,
    /// balancing, splits, fault injection.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Create, list and revoke bearer tokens (admin).
    #[command(subcommand)]
    Token(TokenCommand),
    /// The mesh CA: rotate the root, print the trust bundle.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Files that let a client join the mesh without a sidecar.
    #[command(subcommand)]
    Bootstrap(BootstrapCommand),
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

/// A one-line, user-facing failure.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("cannot reach the control plane at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("{op}: {code:?}: {message}")]
    Api {
        op: &'static str,
        code: tonic::Code,
        message: String,
    },
    #[error("{0}")]
    Usage(String),
    #[error("sidecar admin {addr}: {reason}")]
    Sidecar { addr: String, reason: String },
    #[error(transparent)]
    Bootstrap(#[from] BootstrapError),
}

fn api(op: &'static str) -> impl Fn(tonic::Status) -> CtlError {
    move |s| CtlError::Api {
        op,
        code: s.code(),
        message: s.message().to_owned(),
    }
}

/// The CA file and token: flags, then variables, then the local control
/// plane's data dir.
fn credentials(cli: &Cli) -> Result<ControlAuth, CtlError> {
    let ca_pem = if cli.control_plane.starts_with("https://") {
        Some(ca_pem(cli)?)
    } else {
        None
    };
    Ok(ControlAuth {
        ca_pem,
        token: operator_token(cli),
        identity: Default::default(),
        learned: Default::default(),
    })
}

/// The CA file to trust the control plane with: `--ca-file` /
/// `ISDP_CA_FILE`, else `<data-dir>/ca.pem`.
fn ca_file(cli: &Cli) -> PathBuf {
    cli.ca_file
        .clone()
        .unwrap_or_else(|| cli.data_dir.join("ca.pem"))
}

fn ca_pem(cli: &Cli) -> Result<String, CtlError> {
    let path = ca_file(cli);
    std::fs::read_to_string(&path).map_err(|e| {
        CtlError::Usage(format!(
            "reading the CA file {}: {e} (pass --ca-file or ISDP_CA_FILE)",
            path.display()
        ))
    })
}

/// The operator's bearer token: `--token` / `ISDP_TOKEN`, else the local
/// control plane's `<data-dir>/admin.token`.
fn operator_token(cli: &Cli) -> Option<String> {
    let token = match &cli.token {
        Some(t) => Some(t.trim().to_owned()),
        None => std::fs::read_to_string(cli.data_dir.join("admin.token"))
            .ok()
            .map(|t| t.trim().to_owned()),
    };
    token.filter(|t| !t.is_empty())
}

async fn connect(url: &str, auth: &ControlAuth) -> Result<ControlChannel, CtlError> {
    isdp_core::dial::connect(url, auth)
        .await
        .map_err(|e| CtlError::Connect {
            url: url.to_owned(),
            reason: match e {
                isdp_core::dial::DialError::Connect { reason, .. }
                | isdp_core::dial::DialError::InvalidUrl { reason, .. } => reason,
            },
        })
}

fn millis(d: Duration) -> Result<u32, CtlError> {
    u32::try_from(d.as_millis()).map_err(|_| CtlError::Usage(format!("duration too long: {d:?}")))
}

/// Runs one command, writing its output to stdout.
pub async fn run(cli: Cli) -> Result<(), CtlError> {
    // The bootstrap picks its credentials per step (an operator token to
    // mint a join token, the join token or the client's certificate to
    // sign), so it does not share the one channel below.
    if let Command::Bootstrap(cmd) = &cli.command {
        return Ok(bootstrap::run(&cli, cmd).await?);
    }
    // A sidecar's endpoints come from the sidecar, not the control plane.
    if let Command::ProxyStatus {
        sidecar: Some(admin),
        upstream,
    } = &cli.command
    {
        return endpoints::run(admin, upstream.as_deref(), cli.output).await;
    }
    let auth = credentials(&cli)?;
    let channel = connect(&cli.control_plane, &auth).await?;
    // A service's instance list may be as large as its xDS resource,
    // which sidecars decode up to this size.
    let mut client = RegistryClient::new(channel.clone())
        .max_decoding_message_size(isdp_core::dial::MAX_RESPONSE_BYTES);
    let fmt = cli.output;
    match cli.command {
        Command::Token(cmd) => security::token(channel, fmt, cmd).await?,
        Command::Ca(cmd) => security::ca(channel, fmt, cmd).await?,
        Command::Bootstrap(_) => unreachable!("handled above"),
        Command::Register {
            service,
            address,
            port,
            id,
            weight,
            meta,
            zone,
            priority,
            check,
            interval,
            timeout,
            rise,
            fall,
        } => {
            let check = match check {
                Some(target) => Some(HealthCheck {
                    target,
                    interval_ms: millis(interval)?,
                    timeout_ms: millis(timeout)?,
                    rise,
                    fall,
                }),
                None => None,
            };
            let instance = Instance {
                id: id.unwrap_or_default(),
                service,
                address,
                port,
                weight,
                metadata: meta.into_iter().collect::<BTreeMap<_, _>>(),
                zone: zone.unwrap_or_default(),
                priority,
                check,
                ..Default::default()
            };
            let resp = client
                .register(RegisterRequest {
                    instance: Some(instance),
                })
                .await
                .map_err(api("register"))?
                .into_inner();
            let i = resp.instance.unwrap_or_default();
            output::registered(fmt, &i);
        }
        Command::Deregister { id } => {
            client
                .deregister(DeregisterRequest { id: id.clone() })
                .await
                .map_err(api("deregister"))?;
            output::deregistered(fmt, &id);
        }
        Command::Services => {
            let resp = client
                .list_services(ListServicesRequest {})
                .await
                .map_err(api("services"))?
                .into_inner();
            output::services(fmt, &resp.services);
        }
        Command::Instances { service } => {
            let resp = client
                .list_instances(ListInstancesRequest { service })
                .await
                .map_err(api("instances"))?
                .into_inner();
            output::instances(fmt, &resp.instances, &resp.weights);
        }
        Command::ProxyStatus { .. } => {
            let resp = ProxyStatusClient::new(channel)
                .list_proxies(ListProxiesRequest {})
                .await
                .map_err(api("proxy-status"))?
                .into_inner();
            output::proxies(fmt, &resp.proxies);
        }
        Command::Policy(cmd) => {
            policy::run(PoliciesClient::new(channel), cmd, fmt).await?;
        }
        Command::Authz(cmd) => {
            authz::run(AuthorizationClient::new(channel), cmd, fmt).await?;
        }
        Command::Watch { service } => {
            let mut stream = client
                .watch_service(WatchServiceRequest { service })
                .await
                .map_err(api("watch"))?
                .into_inner();
            while let Some(msg) = stream.message().await.map_err(api("watch"))? {
                output::watch_update(fmt, &msg.instances);
            }
        }
    }
    Ok(())
}
