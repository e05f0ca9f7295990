//! The control plane's startup: [`Server::bind`] opens the store, loads
//! the CA and the tokens and binds the listeners (so callers learn the
//! addresses first); [`Server::serve`] then runs in named steps: the views
//! of the store, the xDS publishers, TLS, health checks and the admin
//! listener, the HTTP/JSON API, the gRPC router until shutdown, and finally every task is
//! awaited before the store closes.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use isdp_xds::{AdsService, Cache};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

use crate::{
    Config, Error, HEALTH_LEADER_KEY, StoreKind, admin, api, auth, authz,
    ca::{self, Ca, CaSettings},
    data_dir, election, health, http, load, metrics, policy, proxies, publish,
    registry::{Registry, SessionTimeouts, session::Sessions},
    store::{Store, embedded::EmbeddedStore, etcd::EtcdStore},
    tls,
    tokens::Tokens,
};

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

/// A control plane whose store is open and whose listeners are bound, so
/// callers (tests, benchmarks) learn the addresses before it serves.
pub struct Server {
    config: Config,
    store: Backend,
    grpc: TcpListener,
    admin: TcpListener,
    http: TcpListener,
    ca: Ca,
    tokens: Tokens,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The HTTP/JSON API's address (`--http-listen`).
    pub http_addr: SocketAddr,
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
        let store = open_store(&config).await?;
        let (ca, tokens) = load_ca_and_tokens(&config, &store, operator, given_keys).await?;
        let (grpc, grpc_addr) = bind_listener(config.listen).await?;
        let (admin, admin_addr) = bind_listener(config.admin_listen).await?;
        let (http, http_addr) = bind_listener(config.http.http_listen).await?;
        Ok(Server {
            config,
            store,
            grpc,
            admin,
            http,
            ca,
            tokens,
            grpc_addr,
            admin_addr,
            http_addr,
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
            http,
            ca,
            tokens,
            grpc_addr,
            admin_addr,
            http_addr,
        } = self;
        let metrics = metrics::Metrics::new();
        metrics.follow_store_health(store.store());
        let mut tasks = Tasks::default();
        let views =
            Views::start(&config, &store, grpc_addr, &metrics, &shutdown, &mut tasks).await?;
        let cache = publish::cache();
        tasks.push(ca.follow(shutdown.clone()));
        tasks.push(tokens.follow(shutdown.clone()));
        let roots = start_publishers(
            &config, &views, &metrics, &ca, &tokens, &cache, &shutdown, &mut tasks,
        );
        let listeners = Listeners { grpc, http };
        let (incoming, http_incoming) = start_tls(
            &config, listeners, &ca, roots, &metrics, &shutdown, &mut tasks,
        )?;
        tasks.push(health::spawn(
            views.registry.clone(),
            metrics.clone(),
            views.leader.clone(),
            shutdown.clone(),
        ));
        start_http(
            &config,
            http_incoming,
            &views,
            &metrics,
            &tokens,
            &shutdown,
            &mut tasks,
        );
        tracing::info!(grpc = %grpc_addr, admin = %admin_addr, http = %http_addr, "control plane listening");
        let admin_task = tokio::spawn(admin::serve(
            admin,
            metrics.clone(),
            views.registry.clone(),
            store.store(),
            shutdown.clone(),
        ));
        let ads = AdsService::new(
            cache,
            Arc::new(auth::AdsAccess::new(
                config.xds_max_name_bytes_per_principal,
            )),
            Arc::new((metrics.clone(), views.proxies.clone())),
            shutdown.clone(),
        )
        .with_limits(config.xds_limits())
        .with_log_rate(metrics.client_log_rate());
        let router = Router {
            ads,
            metrics,
            ca,
            tokens,
            max_streams_per_principal: config.max_streams_per_principal,
            max_concurrent_streams: config.max_concurrent_streams,
        };
        serve_grpc(incoming, views, router, shutdown).await?;
        let _ = admin_task.await;
        tasks.join().await;
        store.close().await;
        tracing::info!("control plane stopped");
        Ok(())
    }
}

/// Tasks that run until shutdown; all are awaited before the store
/// closes.
#[derive(Default)]
struct Tasks(Vec<JoinHandle<()>>);

impl Tasks {
    fn push(&mut self, task: JoinHandle<()>) {
        self.0.push(task);
    }

    async fn join(self) {
        for task in self.0 {
            let _ = task.await;
        }
    }
}

/// What the handlers and publishers read: the views that follow the store,
/// and whether this replica leads the work that runs once.
struct Views {
    registry: Registry,
    sessions: Sessions,
    leader: watch::Receiver<bool>,
    authz: authz::Authz,
    policies: policy::Policies,
    /// What each connected sidecar acknowledged (fed by the ADS server).
    proxies: proxies::Proxies,
    /// What sidecars report of their outbound traffic (soft state).
    traffic: crate::traffic::Traffic,
    /// The load summaries every replica weighs endpoints with.
    load_weights: load::LoadWeights,
    /// Where this replica's sessions write their load summaries; None
    /// with `--load-weights false`.
    load_sink: Option<load::sink::Sink>,
}

impl Views {
    /// Loads the registry (every store call it makes counted and timed),
    /// the election, the authorization rules and the traffic policies.
    async fn start(
        config: &Config,
        store: &Backend,
        grpc_addr: SocketAddr,
        metrics: &metrics::Metrics,
        shutdown: &watch::Receiver<bool>,
        tasks: &mut Tasks,
    ) -> Result<Self, Error> {
        let prefix = config.key_prefix();
        let instrumented = metrics::InstrumentedStore::new(store.store(), metrics.clone());
        let registry = Registry::start_with(
            Arc::new(instrumented),
            prefix,
            config.quotas(),
            shutdown.clone(),
        )
        .await?;
        tracing::info!(instances = registry.len(), store = ?config.store, "registry loaded");
        let (sessions, leader) = elect(config, store, &registry, grpc_addr, shutdown, tasks);
        let authz = authz::Authz::start(store.store(), prefix, shutdown.clone()).await?;
        let policies =
            policy::Policies::start(store.store(), prefix, registry.clone(), shutdown.clone())
                .await?;
        let load_cfg = config.load.weight_config();
        let (load_weights, load_sink) = if load_cfg.enabled {
            let view = load::LoadView::start(store.store(), prefix, shutdown.clone())
                .await
                .map_err(|source| Error::Store {
                    what: "load summaries".into(),
                    source,
                })?;
            let (sink, task) = load::sink::Sink::spawn(store.store(), prefix, shutdown.clone());
            tasks.push(task);
            (load::LoadWeights::new(load_cfg, view), Some(sink))
        } else {
            (load::LoadWeights::operator_only(), None)
        };
        Ok(Views {
            load_weights,
            load_sink,
            registry,
            sessions,
            leader,
            authz,
            policies,
            proxies: proxies::Proxies::default(),
            traffic: crate::traffic::Traffic::default(),
        })
    }
}

/// Sidecar sessions, and whether this replica leads: one control plane
/// leads itself; replicas elect one through the store.
fn elect(
    config: &Config,
    store: &Backend,
    registry: &Registry,
    grpc_addr: SocketAddr,
    shutdown: &watch::Receiver<bool>,
    tasks: &mut Tasks,
) -> (Sessions, watch::Receiver<bool>) {
    let timeouts = SessionTimeouts {
        grace: config.session_grace,
        timeout: config.session_timeout,
    };
    match store {
        Backend::Embedded(_) => (
            Sessions::new(registry.clone(), timeouts),
            election::always(),
        ),
        Backend::Etcd(_) => {
            let (leader, task) = election::spawn(
                store.store(),
                format!("{}{HEALTH_LEADER_KEY}", config.key_prefix()),
                format!("{grpc_addr} pid {}", std::process::id()),
                config.leader_lease,
                shutdown.clone(),
            );
            tasks.push(task);
            (Sessions::replica(registry.clone(), timeouts), leader)
        }
    }
}

/// Starts one translator per resource family (`publish`). Returns the
/// roots the TLS listener may present a certificate from: the trust
/// bundle's publisher passes new roots on only once the bundle and
/// `ca.pem` trust them.
#[allow(clippy::too_many_arguments)]
fn start_publishers(
    config: &Config,
    views: &Views,
    metrics: &metrics::Metrics,
    ca: &Ca,
    tokens: &Tokens,
    cache: &Cache,
    shutdown: &watch::Receiver<bool>,
    tasks: &mut Tasks,
) -> watch::Receiver<Arc<ca::Roots>> {
    let (published_tx, published) = watch::channel(ca.roots());
    tasks.push(publish::bundle::spawn(
        ca.clone(),
        tokens.clone(),
        cache.clone(),
        config.data_dir.clone(),
        published_tx,
        shutdown.clone(),
    ));
    tasks.push(publish::endpoints::spawn(
        views.registry.clone(),
        cache.clone(),
        publish::endpoints::Weighing {
            weights: views.load_weights.clone(),
            observer: Some(Arc::new(metrics.clone())),
        },
        shutdown.clone(),
    ));
    tasks.push(publish::traffic::spawn(
        views.policies.clone(),
        cache.clone(),
        shutdown.clone(),
    ));
    tasks.push(publish::standard::spawn(
        publish::standard::Settings {
            trust_domain: config.trust_domain.clone(),
            envoy_outbound: config.envoy_outbound_listen,
        },
        views.registry.clone(),
        views.policies.clone(),
        views.load_weights.clone(),
        cache.clone(),
        shutdown.clone(),
    ));
    tasks.push(publish::authorization::spawn(
        views.authz.clone(),
        views.registry.clone(),
        cache.clone(),
        config.trust_domain.clone(),
        shutdown.clone(),
    ));
    published
}

/// The listeners served over TLS.
struct Listeners {
    grpc: TcpListener,
    http: TcpListener,
}

/// TLS on the gRPC and HTTP listeners: one server certificate, following
/// the published roots, for both; handshakes are accepted off the accept
/// loops, and each listener has its own connection cap.
fn start_tls(
    config: &Config,
    listeners: Listeners,
    ca: &Ca,
    roots: watch::Receiver<Arc<ca::Roots>>,
    metrics: &metrics::Metrics,
    shutdown: &watch::Receiver<bool>,
    tasks: &mut Tasks,
) -> Result<(tls::Incoming, tls::Incoming), Error> {
    // Bound by `Server::bind`, which reported these addresses already.
    let grpc_addr = listeners.grpc.local_addr().unwrap_or(config.listen);
    let http_addr = listeners
        .http
        .local_addr()
        .unwrap_or(config.http.http_listen);
    let mut names = tls::server_names(grpc_addr, &config.tls_san);
    for name in tls::server_names(http_addr, &[]) {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    let (tls_config, tls_task) = tls::follow_roots(ca.clone(), roots, names, shutdown.clone())?;
    tasks.push(tls_task);
    let grpc = tls::incoming(
        listeners.grpc,
        tls_config.clone(),
        config.trust_domain.clone(),
        tls::Admission::new(
            config.max_connections,
            config.first_request_timeout,
            metrics.grpc_connections(),
        ),
        metrics.client_log_rate(),
        shutdown.clone(),
    );
    let (http_config, alpn_task) =
        tls::with_alpn(tls_config, &[b"h2", b"http/1.1"], shutdown.clone());
    tasks.push(alpn_task);
    let http = tls::incoming(
        listeners.http,
        http_config,
        config.trust_domain.clone(),
        tls::Admission::new(
            config.http.http_max_connections,
            config.first_request_timeout,
            tls::ConnectionCounters::default(),
        ),
        metrics.client_log_rate(),
        shutdown.clone(),
    );
    Ok((grpc, http))
}

/// The HTTP/JSON API (`http`): the same gRPC services the router serves,
/// behind the HTTP route table, on its own listener.
fn start_http(
    config: &Config,
    incoming: tls::Incoming,
    views: &Views,
    metrics: &metrics::Metrics,
    tokens: &Tokens,
    shutdown: &watch::Receiver<bool>,
    tasks: &mut Tasks,
) {
    let services = http::Services {
        registry_api: api::registry::RegistryApi::new(
            views.registry.clone(),
            metrics.clone(),
            shutdown.clone(),
        )
        .with_weights(views.load_weights.clone()),
        policies_api: api::policies::PoliciesApi::new(views.policies.clone(), shutdown.clone()),
        authorization_api: api::authorization::AuthorizationApi::new(views.authz.clone()),
        tokens_api: api::tokens::TokensApi::new(tokens.clone()),
        status_api: api::status::ProxyStatusApi::new(views.proxies.clone()),
        tokens: tokens.clone(),
        registry: views.registry.clone(),
    };
    let (api, index_task) = http::Api::start(
        services,
        config.http.consul_datacenter.clone(),
        config.http.http_max_wait,
        shutdown.clone(),
    );
    let api = api.max_waits_per_principal(config.max_streams_per_principal);
    tasks.push(index_task);
    let mut routes = api.routes();
    let (dashboard, ui_task) = crate::ui::Dashboard::start(
        crate::ui::Views {
            registry: views.registry.clone(),
            proxies: views.proxies.clone(),
            policies: views.policies.clone(),
            authz: views.authz.clone(),
            traffic: views.traffic.clone(),
            tokens: tokens.clone(),
        },
        &config.ui,
        shutdown.clone(),
    );
    tasks.push(ui_task);
    dashboard.mount(&mut routes);
    let app = routes.router(config.http.http_max_body_bytes);
    let settings = http::Settings {
        header_timeout: config.http.http_header_timeout,
        idle_timeout: config.http.http_idle_timeout,
    };
    tasks.push(http::spawn(incoming, app, settings, shutdown.clone()));
}

/// What the gRPC router serves besides the views of the store.
struct Router {
    ads: AdsService,
    metrics: metrics::Metrics,
    ca: Ca,
    tokens: Tokens,
    /// `--max-streams-per-principal`, which the auth layer enforces.
    max_streams_per_principal: usize,
    /// `--max-concurrent-streams`, per connection.
    max_concurrent_streams: u32,
}

/// Largest header block a request may carry (a bearer token, a few
/// metadata entries): gRPC's own clients cap what they send at 8 KiB.
const MAX_HEADER_LIST_BYTES: u32 = 16 << 10;
/// Streams a client may make the server reset on one connection before
/// the connection is closed (hyper's default, which tonic removes).
const MAX_LOCAL_RESET_STREAMS: usize = 1024;
/// Streams a client may open and cancel before the server handles them
/// (the HTTP/2 rapid-reset bound; hyper's default).
const MAX_PENDING_RESET_STREAMS: usize = 20;

/// How long shutdown waits for open calls to finish once every handler
/// was told to stop. Handlers end at once, but a call's last frames go out
/// only when its client grants flow-control window: a client that stops
/// granting it would otherwise hold the control plane up forever.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(5);

/// The gRPC router (metrics, size limits and authentication in front of
/// every service, ADS included), served until shutdown, then drained for
/// at most [`SHUTDOWN_DRAIN`].
async fn serve_grpc(
    incoming: tls::Incoming,
    views: Views,
    router: Router,
    shutdown: watch::Receiver<bool>,
) -> Result<(), Error> {
    let Views {
        registry,
        sessions,
        authz,
        policies,
        proxies,
        traffic,
        load_weights,
        load_sink,
        ..
    } = views;
    let Router {
        ads,
        metrics,
        ca,
        tokens,
        max_streams_per_principal,
        max_concurrent_streams,
    } = router;
    let mut stop = shutdown.clone();
    let serve = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        // Notice a vanished sidecar even when its TCP connection lingers.
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        // What tonic leaves unset, hyper's bounds: streams per connection
        // in SETTINGS, headers per request, streams a client may make the
        // server reset (a rapid-reset flood), and pending reset streams.
        .max_concurrent_streams(Some(max_concurrent_streams))
        .http2_max_header_list_size(Some(MAX_HEADER_LIST_BYTES))
        .http2_max_local_error_reset_streams(Some(MAX_LOCAL_RESET_STREAMS))
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_RESET_STREAMS))
        .layer(metrics::GrpcMetricsLayer::new(metrics.clone()))
        .layer(api::SizeLimitStatusLayer)
        .layer(auth::AuthLayer::new(
            tokens.clone(),
            max_streams_per_principal,
            metrics.client_log_rate(),
        ))
        .add_service(
            api::registry::RegistryApi::new(registry, metrics.clone(), shutdown.clone())
                .with_weights(load_weights)
                .into_server(),
        )
        .add_service({
            let api = api::session::SessionApi::new(sessions, shutdown.clone())
                .with_loads(load::LoadReports::default(), metrics.clone())
                .with_traffic(traffic);
            match load_sink {
                Some(sink) => api.with_load_sink(sink),
                None => api,
            }
            .into_server()
        })
        .add_service(api::status::ProxyStatusApi::new(proxies.clone()).into_server())
        .add_service(api::csds::CsdsApi::new(proxies, shutdown.clone()).into_server())
        .add_service(api::authorization::AuthorizationApi::new(authz).into_server())
        .add_service(api::policies::PoliciesApi::new(policies, shutdown.clone()).into_server())
        .add_service(api::certificates::CertificatesApi::new(ca).into_server())
        .add_service(api::tokens::TokensApi::new(tokens).into_server())
        .add_service(ads)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.wait_for(|s| *s).await;
        });
    let mut stopping = shutdown;
    let drained = async move {
        let _ = stopping.wait_for(|s| *s).await;
        tokio::time::sleep(SHUTDOWN_DRAIN).await;
    };
    tokio::select! {
        served = serve => served?,
        () = drained => tracing::warn!(
            drain = ?SHUTDOWN_DRAIN,
            "calls still open after the shutdown drain (clients not reading); stopping without them"
        ),
    }
    Ok(())
}

/// The configured store backend, opened (embedded) or connected (etcd).
async fn open_store(config: &Config) -> Result<Backend, Error> {
    match config.store {
        StoreKind::Embedded => EmbeddedStore::open(&config.data_dir)
            .map(Backend::Embedded)
            .map_err(|source| Error::Store {
                what: format!("embedded, in {}", config.data_dir.display()),
                source,
            }),
        StoreKind::Etcd => EtcdStore::connect(&config.etcd_options())
            .await
            .map(Backend::Etcd)
            .map_err(|source| Error::Store {
                what: "etcd".into(),
                source,
            }),
    }
}

/// The CA (its key opened with the key-encryption key; created on first
/// start) with `ca.pem` written, and the tokens with the first admin
/// token minted.
async fn load_ca_and_tokens(
    config: &Config,
    store: &Backend,
    operator: Option<ca::RootPair>,
    given_keys: Option<ca::Keyring>,
) -> Result<(Ca, Tokens), Error> {
    let prefix = config.key_prefix();
    let embedded_dir = (config.store == StoreKind::Embedded).then_some(&*config.data_dir);
    let keys = ca::kek::resolve(given_keys, embedded_dir, store.store().as_ref(), prefix).await?;
    let settings = CaSettings {
        trust_domain: config.trust_domain.clone(),
        default_lifetime: config.cert_lifetime,
        max_lifetime: config.max_cert_lifetime,
    };
    let ca = Ca::load(store.store(), prefix, settings, operator, keys).await?;
    publish::bundle::write_ca_pem(&config.data_dir, &ca.roots().bundle_pem());
    let tokens = Tokens::load(store.store(), prefix, config.max_cert_lifetime).await?;
    tokens.bootstrap_admin(&config.data_dir).await?;
    Ok((ca, tokens))
}

/// A listener on `addr` and the address it got (port 0 picks one).
async fn bind_listener(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), Error> {
    let l = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })?;
    let local = l
        .local_addr()
        .map_err(|source| Error::Bind { addr, source })?;
    Ok((l, local))
}

fn read(path: &std::path::Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.display().to_string(),
        source,
    })
}
