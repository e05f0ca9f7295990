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
//! - [`snapshot`]: turns registry changes into xDS resources, debounced.
//! - [`xds`]: the generic ADS server (state of the world and delta).
//! - [`api`]: the gRPC services for operators (`Registry`, `Tokens`,
//!   `Certificates`) and sidecars (`Sidecar/Session`, `Certificates/Sign`).
//! - [`ca`]: the mesh CA: roots in the store, CSR signing, rotation.
//! - [`tokens`]: bearer tokens (hashed in the store) and their roles.
//! - [`auth`]: authentication and per-method authorization of every call.
//! - [`tls`]: TLS on the gRPC listener, with a swappable certificate.
//! - [`authz`]: authorization rules between services, per destination.
//! - [`policy`]: traffic policies per destination, validated whole, versioned.
//! - [`admin`]: `/healthz`, `/ready`, `/metrics`.
//! - [`metrics`]: Prometheus metrics and the xDS stream observer.
//! - [`proxies`]: what each connected sidecar acknowledged (proxy status).
//!
//! A registration flows: `api::registry` -> `registry` (validate, store
//! transaction) -> store watch -> registry view -> `snapshot` (debounced)
//! -> `xds::Cache` -> every stream subscribed to that service.

pub mod admin;
pub mod api;
pub mod auth;
pub mod authz;
pub mod ca;
pub mod config;
pub mod data_dir;
pub mod election;
pub mod health;
pub mod metrics;
pub mod policy;
pub mod proxies;
pub mod registry;
pub mod snapshot;
pub mod store;
pub mod tls;
pub mod tokens;
pub mod xds;

use std::{io::Write, net::SocketAddr, sync::Arc, time::Duration};

use isdp_proto::v1::{
    AUTHORIZATION_POLICY_TYPE_URL, SERVICE_ENDPOINTS_TYPE_URL, TRAFFIC_POLICY_TYPE_URL,
    TRUST_BUNDLE_NAME, TRUST_BUNDLE_TYPE_URL,
};
use prost::Message as _;
use tokio::{net::TcpListener, sync::watch};

pub use config::{Config, StoreKind};

use crate::{
    ca::{Ca, CaError, CaSettings, KekError},
    data_dir::DataDirError,
    registry::{Registry, RegistryError, SessionTimeouts, session::Sessions},
    store::{Store, StoreError, embedded::EmbeddedStore, etcd::EtcdStore},
    tls::TlsError,
    tokens::{TokenError, Tokens},
};

/// Key prefix of everything the control plane stores (the embedded store's,
/// and the default `--etcd-prefix`). The key layout under it is in
/// ARCHITECTURE.md.
pub const KEY_PREFIX: &str = "/isdp/";

use data_dir::CA_FILE;

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
    ca: Ca,
    tokens: Tokens,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
}

impl Server {
    pub async fn bind(config: Config) -> Result<Self, Error> {
        config.validate().map_err(Error::Config)?;
        // Secrets first: a data directory or key file others can read is
        // refused before anything is opened or written.
        data_dir::prepare(&config.data_dir)?;
        let operator = match (&config.ca_cert, &config.ca_key) {
            (Some(cert), Some(key)) => Some(ca::load_root(
                &read(cert)?,
                &data_dir::read_secret_file(key, "--ca-key file")?,
            )?),
            _ => None,
        };
        let given_keys = config.kek_sources().explicit()?;
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
        let prefix = config.key_prefix().to_owned();
        let embedded_dir = (config.store == StoreKind::Embedded).then_some(&*config.data_dir);
        let keys =
            ca::kek::resolve(given_keys, embedded_dir, store.store().as_ref(), &prefix).await?;
        let settings = CaSettings {
            trust_domain: config.trust_domain.clone(),
            default_lifetime: config.cert_lifetime,
            max_lifetime: config.max_cert_lifetime,
        };
        let ca = Ca::load(store.store(), &prefix, settings, operator, keys).await?;
        write_bundle(&config.data_dir, &ca.roots().bundle_pem());
        let tokens = Tokens::load(store.store(), &prefix, config.max_cert_lifetime).await?;
        tokens.bootstrap_admin(&config.data_dir).await?;
        let (grpc, grpc_addr) = bind(config.listen).await?;
        let (admin, admin_addr) = bind(config.admin_listen).await?;
        Ok(Server {
            config,
            store,
            grpc,
            admin,
            ca,
            tokens,
            grpc_addr,
            admin_addr,
        })
    }

    /// The CA (tests and benches sign with it in-process).
    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// The tokens (tests and benches mint credentials in-process).
    pub fn tokens(&self) -> &Tokens {
        &self.tokens
    }

    /// Serves until `shutdown` turns true, then closes the store.
    pub async fn serve(self, shutdown: watch::Receiver<bool>) -> Result<(), Error> {
        let Server {
            config,
            store,
            grpc,
            admin,
            ca,
            tokens,
            grpc_addr,
            admin_addr,
        } = self;
        let prefix = config.key_prefix().to_owned();
        let metrics = metrics::Metrics::new();
        // Every store call the registry makes is counted and timed, on
        // either backend.
        let instrumented = metrics::InstrumentedStore::new(store.store(), metrics.clone());
        let registry = Registry::start_with(
            Arc::new(instrumented),
            &prefix,
            config.quotas(),
            shutdown.clone(),
        )
        .await?;
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
            TRUST_BUNDLE_TYPE_URL,
            AUTHORIZATION_POLICY_TYPE_URL,
            TRAFFIC_POLICY_TYPE_URL,
        ]);
        let ca_follow = ca.follow(shutdown.clone());
        let tokens_follow = tokens.follow(shutdown.clone());
        let (published_tx, published) = watch::channel(ca.roots());
        let bundle_task = tokio::spawn(publish_bundle(
            ca.clone(),
            tokens.clone(),
            cache.clone(),
            config.data_dir.clone(),
            published_tx,
            shutdown.clone(),
        ));
        let (tls_config, tls_task) = tls::follow_roots(
            ca.clone(),
            published,
            tls::server_names(grpc_addr, &config.tls_san),
            shutdown.clone(),
        )?;
        let incoming = tls::incoming(
            grpc,
            tls_config,
            config.trust_domain.clone(),
            shutdown.clone(),
        );
        let builder = snapshot::spawn(registry.clone(), cache.clone(), shutdown.clone());
        let policy_publisher =
            policy::spawn_publisher(policies.clone(), cache.clone(), shutdown.clone());
        let authz_publisher = authz::spawn_publisher(
            authz.clone(),
            registry.clone(),
            cache.clone(),
            config.trust_domain.clone(),
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
        )
        .revocable(tokens.clone());
        let mut stop = shutdown.clone();
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            // Notice a vanished sidecar even when its TCP connection lingers.
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)))
            .layer(metrics::GrpcMetricsLayer::new(metrics.clone()))
            .layer(api::SizeLimitStatusLayer)
            .layer(auth::AuthLayer::new(tokens.clone()))
            .add_service(
                api::registry::RegistryApi::new(
                    registry.clone(),
                    metrics.clone(),
                    shutdown.clone(),
                )
                .into_server(),
            )
            .add_service(
                api::session::SessionApi::new(sessions, shutdown.clone())
                    .revocable(tokens.clone())
                    .into_server(),
            )
            .add_service(api::status::ProxyStatusApi::new(proxies).into_server())
            .add_service(api::authorization::AuthorizationApi::new(authz).into_server())
            .add_service(api::policies::PoliciesApi::new(policies, shutdown.clone()).into_server())
            .add_service(api::certificates::CertificatesApi::new(ca.clone()).into_server())
            .add_service(api::tokens::TokensApi::new(tokens.clone()).into_server())
            .add_service(ads)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await?;
        let _ = admin_task.await;
        for task in [ca_follow, tokens_follow, bundle_task, tls_task] {
            let _ = task.await;
        }
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

fn read(path: &std::path::Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Writes `<data-dir>/ca.pem` (0644: the bundle is public); a failure is
/// logged, not fatal: the bundle is also served over the API and xDS.
fn write_bundle(data_dir: &std::path::Path, pem: &str) {
    let path = data_dir.join(CA_FILE);
    if let Err(e) = data_dir::write_file(&path, pem.as_bytes(), data_dir::PUBLIC_MODE) {
        tracing::warn!(path = %path.display(), error = %e, "writing the trust bundle failed");
    }
}

/// Puts the trust bundle into the xDS cache whenever the roots or the
/// revoked tokens change, and the roots into `ca.pem` when they change; then
/// passes new roots on to `published` (the TLS listener), so the control
/// plane presents a certificate from a new root only once both trust it.
async fn publish_bundle(
    ca: Ca,
    tokens: Tokens,
    cache: xds::Cache,
    data_dir: std::path::PathBuf,
    published: watch::Sender<Arc<ca::Roots>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut roots = ca.subscribe();
    let mut revoked = tokens.subscribe_revoked();
    let mut roots_changed = true;
    loop {
        let current = roots.borrow_and_update().clone();
        let mut bundle = current.bundle(&ca.settings().trust_domain);
        bundle.revoked_grants = revoked.borrow_and_update().ids();
        cache.set(
            TRUST_BUNDLE_TYPE_URL,
            TRUST_BUNDLE_NAME,
            bytes::Bytes::from(bundle.encode_to_vec()),
        );
        if roots_changed {
            write_bundle(&data_dir, &current.bundle_pem());
            published.send_if_modified(|p| {
                let new = !Arc::ptr_eq(p, &current);
                *p = current.clone();
                new
            });
        }
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            changed = roots.changed() => {
                if changed.is_err() { return }
                roots_changed = true;
            }
            changed = revoked.changed() => {
                if changed.is_err() { return }
                roots_changed = false;
            }
        }
    }
}
