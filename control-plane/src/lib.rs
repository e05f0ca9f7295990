//! ISDP control plane: stores registrations, checks health, and streams
//! endpoint updates to sidecars over xDS.
//!
//! # Layout
//! - [`config`]: command-line flags (each also an `ISDP_*` variable).
//! - [`store`]: the durable key-value store trait and its embedded (redb)
//!   backend.
//! - [`registry`]: registrations, validation, the in-memory view, and
//!   sidecar sessions (lease-backed).
//! - [`health`]: probes for operator-registered instances.
//! - [`snapshot`]: turns registry changes into xDS resources, debounced.
//! - [`xds`]: the generic ADS server (state of the world and delta).
//! - [`api`]: the gRPC services for operators (`Registry`) and sidecars
//!   (`Sidecar/Session`).
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
pub mod config;
pub mod ctl;
pub mod health;
pub mod metrics;
pub mod proxies;
pub mod registry;
pub mod snapshot;
pub mod store;
pub mod xds;

use std::{io::Write, net::SocketAddr, sync::Arc, time::Duration};

use isdp_proto::v1::SERVICE_ENDPOINTS_TYPE_URL;
use tokio::{net::TcpListener, sync::watch};

pub use config::Config;

use crate::{
    registry::{Registry, RegistryError, SessionTimeouts, session::Sessions},
    store::{StoreError, embedded::EmbeddedStore},
};

/// Key prefix of everything the control plane stores.
pub const KEY_PREFIX: &str = "/isdp/";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("opening the store in {dir}: {source}")]
    Store { dir: String, source: StoreError },
    #[error("loading the registry: {0}")]
    Registry(#[from] RegistryError),
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
    store: EmbeddedStore,
    grpc: TcpListener,
    admin: TcpListener,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
}

impl Server {
    pub async fn bind(config: Config) -> Result<Self, Error> {
        config.validate().map_err(Error::Config)?;
        let store = EmbeddedStore::open(&config.data_dir).map_err(|source| Error::Store {
            dir: config.data_dir.display().to_string(),
            source,
        })?;
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
        let metrics = metrics::Metrics::new();
        let instrumented =
            metrics::InstrumentedStore::new(Arc::new(store.clone()), metrics.clone());
        let registry =
            Registry::start(Arc::new(instrumented), KEY_PREFIX, shutdown.clone()).await?;
        tracing::info!(instances = registry.len(), data_dir = %config.data_dir.display(), "registry loaded");
        let sessions = Sessions::new(
            registry.clone(),
            SessionTimeouts {
                grace: config.session_grace,
                timeout: config.session_timeout,
            },
        );
        let cache = xds::Cache::new(&[SERVICE_ENDPOINTS_TYPE_URL]);
        let builder = snapshot::spawn(registry.clone(), cache.clone(), shutdown.clone());
        let checker = health::spawn(registry.clone(), metrics.clone(), shutdown.clone());
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
        let _ = checker.await;
        drop(registry);
        store.close().await;
        tracing::info!("control plane stopped");
        Ok(())
    }
}
