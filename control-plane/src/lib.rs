//! ISDP control plane: stores registrations, checks health, and streams
//! endpoint updates to sidecars over xDS.
//!
//! # Layout
//! - [`config`]: command-line flags (each also an `ISDP_*` variable).
//! - [`store`]: the durable key-value store trait and its backends:
//!   embedded (redb, one control plane) and etcd (several replicas).
//! - [`election`]: one leader among replicas for work that must run once.
//! - [`registry`]: registrations, validation, the in-memory view, and
//!   sidecar sessions (lease-backed).
//! - [`health`]: probes for operator-registered instances.
//! - [`snapshot`]: turns registry changes into xDS resources, debounced.
//! - [`xds`]: the generic ADS server (state of the world and delta).
//! - [`api`]: the gRPC services for operators (`Registry`) and sidecars
//!   (`Sidecar/Session`).
//! - [`authz`]: authorization rules between services, per destination.
//! - [`policy`]: traffic policies per destination, validated whole, versioned.
//! - [`admin`]: `/healthz`, `/ready`, `/metrics`.
//! - [`metrics`]: Prometheus metrics and the xDS stream observer.
//! - [`proxies`]: what each connected sidecar acknowledged (proxy status).
//! - [`ctl`]: the `isdpctl` operator CLI.
//!
//! A registration flows: `api::registry` -> `registry` (validate, store
//! transaction) -> store watch -> registry view -> `snapshot` (debounced)
//! -> `xds::Cache` -> every stream subscribed to that service.

pub mod admin;
pub mod api;
pub mod authz;
pub mod config;
pub mod ctl;
pub mod election;
pub mod health;
pub mod metrics;
pub mod policy;
pub mod proxies;
pub mod registry;
pub mod snapshot;
pub mod store;
pub mod xds;

use std::{io::Write, net::SocketAddr, sync::Arc, time::Duration};

use isdp_proto::v1::{
    AUTHORIZATION_POLICY_TYPE_URL, SERVICE_ENDPOINTS_TYPE_URL, TRAFFIC_POLICY_TYPE_URL,
};
use tokio::{net::TcpListener, sync::watch};

pub use config::{Config, StoreKind};

use crate::{
    registry::{Registry, RegistryError, SessionTimeouts, session::Sessions},
    store::{Store, StoreError, embedded::EmbeddedStore, etcd::EtcdStore},
};

/// Key prefix of everything the control plane stores (the embedded store's,
/// and the default `--etcd-prefix`). The key layout under it is in
/// ARCHITECTURE.md.
pub const KEY_PREFIX: &str = "/isdp/";

/// Key (under the prefix) of the leader for control-plane health checks.
pub const HEALTH_LEADER_KEY: &str = "leader/health-checks";

/// The store backend in use.
#[derive(Clone)]
enum Backend {
    Embedded(EmbeddedStore),
    Etcd(EtcdStore),
}

impl Backend {
    fn store(&self) -> Arc<dyn Store> {
        match self {
            Backend::Embedded(s) => Arc::new(s.clone()),
            Backend::Etcd(s) => Arc::new(s.clone()),
        }
    }

    async fn close(self) {
        match self {
            Backend::Embedded(s) => s.close().await,
            Backend::Etcd(_) => {}
        }
    }
}

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
}

/// Runs the control plane until `shutdown` turns true.
pub async fn run(config: Config, shutdown: watch::Receiver<bool>) -> Result<(), Error> {
    let server = Server::bind(config).await?;
    // One machine-readable line, for scripts and tests that bind port 0.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "isdp-control-plane listening: grpc={} admin={}",
        server.grpc_addr, server.admin_addr
    );
    let _ = out.flush();
    drop(out);
    server.serve(shutdown).await
}

/// A control plane whose store is open and whose listeners are bound, so
/// callers (tests, benchmarks) learn the addresses before it serves.
pub struct Server {
    config: Config,
    store: Backend,
    grpc: TcpListener,
    admin: TcpListener,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
}

impl Server {
    pub async fn bind(config: Config) -> Result<Self, Error> {
        config.validate().map_err(Error::Config)?;
        let store = match config.store {
            StoreKind::Embedded => EmbeddedStore::open(&config.data_dir)
                .map(Backend::Embedded)
                .map_err(|source| Error::Store {
                    what: format!("embedded, in {}", config.data_dir.display()),
                    source,
                })?,
            StoreKind::Etcd => EtcdStore::connect(&config.etcd_options())
                .await
                .map(Backend::Etcd)
                .map_err(|source| Error::Store {
                    what: "etcd".into(),
                    source,
                })?,
        };
        let bind = |addr: SocketAddr| async move {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Bind { addr, source })?;
            let local = l
                .local_addr()
                .map_err(|source| Error::Bind { addr, source })?;
            Ok::<_, Error>((l, local))
        };
        let (grpc, grpc_addr) = bind(config.listen).await?;
        let (admin, admin_addr) = bind(config.admin_listen).await?;
        Ok(Server {
            config,
            store,
            grpc,
            admin,
            grpc_addr,
            admin_addr,
        })
    }

    /// Serves until `shutdown` turns true, then closes the store.
    pub async fn serve(self, shutdown: watch::Receiver<bool>) -> Result<(), Error> {
        let Server {
            config,
            store,
            grpc,
            admin,
            grpc_addr,
            admin_addr,
        } = self;
        let prefix = config.key_prefix().to_owned();
        let metrics = metrics::Metrics::new();
        // Every store call the registry makes is counted and timed, on
        // either backend.
        let instrumented = metrics::InstrumentedStore::new(store.store(), metrics.clone());
        let registry = Registry::start(Arc::new(instrumented), &prefix, shutdown.clone()).await?;
        tracing::info!(instances = registry.len(), store = ?config.store, "registry loaded");
        let timeouts = SessionTimeouts {
            grace: config.session_grace,
            timeout: config.session_timeout,
        };
        // One control plane leads itself; replicas elect one through the store.
        let (sessions, leader, election) = match &store {
            Backend::Embedded(_) => (
                Sessions::new(registry.clone(), timeouts),
                election::always(),
                None,
            ),
            Backend::Etcd(_) => {
                let (leader, task) = election::spawn(
                    store.store(),
                    format!("{prefix}{HEALTH_LEADER_KEY}"),
                    format!("{grpc_addr} pid {}", std::process::id()),
                    config.leader_lease,
                    shutdown.clone(),
                );
                (
                    Sessions::replica(registry.clone(), timeouts),
                    leader,
                    Some(task),
                )
            }
        };
        let authz = authz::Authz::start(store.store(), &prefix, shutdown.clone()).await?;
        let policies =
            policy::Policies::start(store.store(), &prefix, registry.clone(), shutdown.clone())
                .await?;
        let cache = xds::Cache::new(&[
            SERVICE_ENDPOINTS_TYPE_URL,
            AUTHORIZATION_POLICY_TYPE_URL,
            TRAFFIC_POLICY_TYPE_URL,
        ]);
        let builder = snapshot::spawn(registry.clone(), cache.clone(), shutdown.clone());
        let policy_publisher =
            policy::spawn_publisher(policies.clone(), cache.clone(), shutdown.clone());
        let authz_publisher = authz::spawn_publisher(
            authz.clone(),
            registry.clone(),
            cache.clone(),
            "isdp.local".to_owned(),
            shutdown.clone(),
        );
        let checker = health::spawn(registry.clone(), metrics.clone(), leader, shutdown.clone());
        tracing::info!(grpc = %grpc_addr, admin = %admin_addr, "control plane listening");

        let admin_task = tokio::spawn(admin::serve(
            admin,
            metrics.clone(),
            registry.clone(),
            shutdown.clone(),
        ));
        let proxies = proxies::Proxies::default();
        let ads = xds::AdsService::new(
            cache,
            Arc::new((metrics.clone(), proxies.clone())),
            shutdown.clone(),
        );
        let mut stop = shutdown.clone();
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            // Notice a vanished sidecar even when its TCP connection lingers.
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)))
            .layer(metrics::GrpcMetricsLayer::new(metrics.clone()))
            .layer(api::SizeLimitStatusLayer)
            .add_service(
                api::registry::RegistryApi::new(
                    registry.clone(),
                    metrics.clone(),
                    shutdown.clone(),
                )
                .into_server(),
            )
            .add_service(api::session::SessionApi::new(sessions, shutdown.clone()).into_server())
            .add_service(api::status::ProxyStatusApi::new(proxies).into_server())
            .add_service(api::authorization::AuthorizationApi::new(authz).into_server())
            .add_service(api::policies::PoliciesApi::new(policies, shutdown.clone()).into_server())
            .add_service(ads)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(grpc),
                async move {
                    let _ = stop.wait_for(|s| *s).await;
                },
            )
            .await?;
        let _ = admin_task.await;
        let _ = builder.await;
        let _ = authz_publisher.await;
        let _ = policy_publisher.await;
        let _ = checker.await;
        if let Some(election) = election {
            let _ = election.await;
        }
        drop(registry);
        store.close().await;
        tracing::info!("control plane stopped");
        Ok(())
    }
}
