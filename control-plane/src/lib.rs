//! ISDP control plane: stores registrations, checks health, and streams
//! endpoint updates to sidecars over xDS.
//!
//! # Layout
//! - [`config`]: command-line flags (each also an `ISDP_*` variable).
//! - [`data_dir`]: the data directory and secret files: created private,
//!   refused at startup when others may read them.
//! - [`store`]: the durable key-value store trait and its backends:
//!   embedded (redb, one control plane) and etcd (several replicas).
//! - [`election`]: one leader among replicas for work that must run once.
//! - [`registry`]: registrations, validation, quotas, the in-memory view,
//!   and sidecar sessions (lease-backed, acting only as their principal).
//! - [`health`]: probes for operator-registered instances.
//! - [`publish`]: one translator per xDS resource family (endpoints,
//!   authorization policies, traffic policies, the trust bundle), each
//!   following its source into the `isdp_xds` engine's cache.
//! - [`api`]: the gRPC services for operators (`Registry`, `Tokens`,
//!   `Certificates`, `ProxyStatus` and its standard form, CSDS) and
//!   sidecars (`Sidecar/Session`, `Certificates/Sign`).
//! - [`ca`]: the mesh CA: roots in the store, CSR signing, rotation.
//! - [`tokens`]: bearer tokens (hashed in the store) and their roles.
//! - [`auth`]: authentication and per-method authorization of every call,
//!   what each xDS stream may read ([`auth::AdsAccess`]), and the end of
//!   every stream when the credential that opened it ends.
//! - [`tls`]: TLS on the gRPC listener, with a swappable certificate.
//! - [`authz`]: authorization rules between services, per destination.
//! - [`policy`]: traffic policies per destination, validated whole, versioned.
//! - [`admin`]: `/healthz`, `/ready`, `/metrics`.
//! - [`http`]: the HTTP/JSON API and the Consul-compatible reads, on their
//!   own TLS listener, calling the same service code as [`api`].
//! - [`metrics`]: Prometheus metrics and the xDS stream observer.
//! - [`ui`]: the dashboard at `/ui/` on the HTTP listener: a login form,
//!   session cookies, one page fed by Server-Sent Events.
//! - [`traffic`]: the sidecars' traffic reports (soft state per replica),
//!   as the topology graph's edges with rates, error rates and p99.
//! - [`load`]: sidecars' load reports, the summaries each session's
//!   replica writes to the store, and the endpoint weights every replica
//!   computes from them and pushes with the endpoints.
//! - [`proxies`]: what each connected xDS client holds, per stream and
//!   resource, and what kind of client it is (proxy status, CSDS).
//! - `server`: startup. [`Server::bind`] opens the store, loads the CA and
//!   the tokens and binds the listeners; [`Server::serve`] runs in named
//!   steps: the views of the store (registry, election, authorization
//!   rules, traffic policies), the publishers, TLS, health checks and the
//!   admin listener, the gRPC router until shutdown, then every task is
//!   awaited and the store closed.
//!
//! The xDS server itself is the `isdp_xds` engine (cache, state of the
//! world and delta streams); the control plane supplies its resources
//! (`publish`) and its access rules (`auth`).
//!
//! A registration flows: `api::registry` -> `registry` (validate, store
//! transaction) -> store watch -> registry view -> `publish::endpoints`
//! (debounced) -> `isdp_xds::Cache` -> every stream subscribed to that
//! service.

pub mod admin;
pub mod api;
pub mod auth;
pub mod authz;
pub mod ca;
pub mod config;
pub mod data_dir;
pub mod election;
pub mod health;
pub mod http;
pub mod load;
pub mod metrics;
pub mod policy;
pub mod proxies;
pub mod publish;
pub mod registry;
mod server;
pub mod store;
pub mod tls;
pub mod tokens;
pub mod traffic;
pub mod ui;

use std::{io::Write, net::SocketAddr};

use tokio::sync::watch;

pub use config::{Config, StoreKind};
pub use server::Server;

use crate::{
    ca::{CaError, KekError},
    data_dir::DataDirError,
    registry::RegistryError,
    store::StoreError,
    tls::TlsError,
    tokens::TokenError,
};

/// Key prefix of everything the control plane stores (the embedded store's,
/// and the default `--etcd-prefix`). The key layout under it is in
/// ARCHITECTURE.md.
pub const KEY_PREFIX: &str = "/isdp/";

/// Key (under the prefix) of the leader for control-plane health checks.
pub const HEALTH_LEADER_KEY: &str = "leader/health-checks";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("opening the store ({what}): {source}")]
    Store { what: String, source: StoreError },
    #[error("loading the registry: {0}")]
    Registry(#[from] RegistryError),
    #[error("loading authorization rules: {0}")]
    Authz(#[from] authz::AuthzError),
    #[error("loading traffic policies: {0}")]
    Policy(#[from] policy::PolicyError),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("certificate authority: {0}")]
    Ca(#[from] CaError),
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error("key-encryption key: {0}")]
    Kek(#[from] KekError),
    #[error("tokens: {0}")]
    Tokens(#[from] TokenError),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
}

/// Runs the control plane until `shutdown` turns true.
pub async fn run(config: Config, shutdown: watch::Receiver<bool>) -> Result<(), Error> {
    let server = Server::bind(config).await?;
    // One machine-readable line, for scripts and tests that bind port 0.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "isdp-control-plane listening: grpc={} admin={} http={}",
        server.grpc_addr, server.admin_addr, server.http_addr
    );
    let _ = out.flush();
    drop(out);
    server.serve(shutdown).await
}
