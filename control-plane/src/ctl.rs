//! `isdpctl`, the operator CLI: registry commands against the control
//! plane's gRPC API.
//!
//! # Layout
//! - `output`: table and JSON rendering.
//! - `authz`: `isdpctl authz`, authorization rules.
//! - `policy`: `isdpctl policy`, traffic policies from YAML documents.

mod authz;
mod output;
mod policy;

use std::{collections::BTreeMap, time::Duration};

use clap::{Parser, Subcommand};
use isdp_proto::v1::{
    DeregisterRequest, HealthCheck, Instance, ListInstancesRequest, ListProxiesRequest,
    ListServicesRequest, RegisterRequest, WatchServiceRequest,
    authorization_client::AuthorizationClient, policies_client::PoliciesClient,
    proxy_status_client::ProxyStatusClient, registry_client::RegistryClient,
};
use tonic::transport::{Channel, Endpoint};

pub use output::Format;

#[derive(Debug, Parser)]
#[command(name = "isdpctl", version, about = "Operate an ISDP mesh")]
pub struct Cli {
    /// Control plane gRPC address.
    #[arg(
        long,
        global = true,
        env = "ISDP_CONTROL_PLANE",
        default_value = "http://127.0.0.1:15010"
    )]
    pub control_plane: String,

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
    /// each has acknowledged, to see that a change landed everywhere.
    ProxyStatus,
    /// Authorization rules: which services may call which.
    #[command(subcommand)]
    Authz(authz::AuthzCommand),
    /// Traffic policies: timeouts, retries, breakers, outlier detection,
    /// balancing, splits, fault injection.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
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
}

fn api(op: &'static str) -> impl Fn(tonic::Status) -> CtlError {
    move |s| CtlError::Api {
        op,
        code: s.code(),
        message: s.message().to_owned(),
    }
}

async fn connect(url: &str) -> Result<Channel, CtlError> {
    let err = |reason: String| CtlError::Connect {
        url: url.to_owned(),
        reason,
    };
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| err(e.to_string()))?
        .connect_timeout(Duration::from_secs(3));
    let channel = endpoint.connect().await.map_err(|e| {
        let mut reason = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            reason = s.to_string();
            src = s.source();
        }
        err(reason)
    })?;
    Ok(channel)
}

fn millis(d: Duration) -> Result<u32, CtlError> {
    u32::try_from(d.as_millis()).map_err(|_| CtlError::Usage(format!("duration too long: {d:?}")))
}

/// Runs one command, writing its output to stdout.
pub async fn run(cli: Cli) -> Result<(), CtlError> {
    let channel = connect(&cli.control_plane).await?;
    let mut client = RegistryClient::new(channel.clone());
    let fmt = cli.output;
    match cli.command {
        Command::Register {
            service,
            address,
            port,
            id,
            weight,
            meta,
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
            output::instances(fmt, &resp.instances);
        }
        Command::ProxyStatus => {
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
