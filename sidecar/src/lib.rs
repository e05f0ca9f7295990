//! ISDP sidecar: registers and probes the local services, keeps a session
//! with the control plane for them, and follows the endpoints of its
//! upstreams over xDS for the data plane.
//!
//! # Layout
//! Dependencies point up this list (a module uses only those above it,
//! plus `isdp-core`), so no two modules import each other.
//! - `balance`: load-balancing algorithms (round robin, P2C, peak EWMA,
//!   ring hash, Maglev), health filtering, outlier detection, and the
//!   locality levels (zones, failover, overprovisioning) picked before them.
//! - `config`: TOML file + flags/env, validated into [`Config`].
//! - `metrics`: Prometheus families and per-route request metrics; imports
//!   no other module.
//! - `listener`: what every listener holds its clients to (the `[limits]`
//!   table): connection and TLS handshake caps, HTTP serving with header
//!   and idle timeouts and HTTP/2 bounds, idle timeouts of byte streams.
//! - `tls`: mTLS as data: rustls contexts, SPIFFE verifiers, the revoked
//!   tokens of the trust bundle (and, in tests, `tls::test_pki`).
//! - `identity`: workload keys and certificates (CSR signed by the control
//!   plane's CA), renewed before expiry, published as a `watch`.
//! - `xds`: delta-ADS client publishing a `watch` of [`xds::Snapshot`]
//!   (endpoints, traffic policies, trust bundle, authorization policies).
//! - `authz`: inbound authorization: a destination's rules compiled for
//!   per-request checks of the caller's SPIFFE ID, method and path.
//! - `session`: the `isdp.v1.Sidecar/Session` stream registering local services.
//! - `proxy`: the data plane: inbound, outbound and per-upstream listeners,
//!   each request path as tower layers, TCP, and `proxy::transport` (the
//!   handshakes between sidecars).
//! - `relay`: the optional local ADS relay, carrying the streams of xDS
//!   clients that cannot authenticate to the control plane with this
//!   sidecar's credentials.
//! - `dns`: the optional DNS server, answering for the upstreams'
//!   instances from the discovery snapshot (A, AAAA, SRV over UDP and TCP).
//! - `admin`: `/live`, `/ready`, `/config`, `/metrics` over HTTP, and the
//!   scrape-time collector of state metrics (it reads every module above).
//!
//! Probes, backoff, dialing the control plane, telemetry, the names both
//! sides agree on and the grant codec come from `isdp-core`.
//!
//! [`run`] wires them together, one step per function; `main.rs` adds
//! flags, logging and signals.

pub mod admin;
pub mod authz;
pub mod balance;
pub mod config;
pub mod dns;
pub mod identity;
pub mod listener;
pub mod load_report;
pub mod metrics;
pub mod proxy;
pub mod relay;
pub mod session;
pub mod tls;
pub mod xds;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;

use isdp_core::{dial, probe};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use config::{Cli, Config, ConfigError};

/// Why the sidecar stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bind admin listener {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("admin server: {0}")]
    Admin(std::io::Error),
    #[error("bind {what} listener {addr}: {source}")]
    Listen {
        what: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Relay(#[from] relay::BindError),
    #[error(transparent)]
    Dns(#[from] dns::BindError),
    #[error("read ca_file {path}: {source}")]
    CaFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Runs the sidecar until `shutdown` becomes true (or its sender is
/// dropped), then closes the session, stops probes and xDS, and returns.
///
/// Binds every listener first and prints
/// `isdp-sidecar listening: admin=<addr> inbound=<addr> outbound=<addr>`
/// (plus `upstream.<name>=<addr>` per dedicated upstream listener, and
/// `relay=<addr>` or `relay=unix:<path>` when the xDS relay is on, and
/// `dns=<addr>` when the DNS server is) on
/// stdout once bound, so scripts and tests can use port 0.
///
/// The steps, in order: [`bind`] the listeners, [`control_auth`] (how to
/// reach the control plane), [`start_session`] (registration and probes),
/// [`start_discovery`] (xDS), [`start_identity`] (workload certificates),
/// [`start_data_plane`] (mTLS, authorization, balancing, the proxy's
/// listeners), [`start_relay`] (the xDS relay, when on), [`start_dns`]
/// (the DNS server, when on), [`start_admin`],
/// then [`stop`] on shutdown. Nothing after
/// binding waits on the control plane: until it answers, the admin
/// endpoint serves and `/ready` says what is missing.
pub async fn run(mut config: Config, shutdown: watch::Receiver<bool>) -> Result<(), Error> {
    let bound = bind(&mut config).await?;
    tracing::info!(node_id = %config.node_id, admin = %bound.admin_addr, "sidecar starting");
    let auth = control_auth(&config)?;
    let mut tasks = Vec::new();
    let session = start_session(&config, &auth, &shutdown, &mut tasks);
    let snapshots = start_discovery(&config, &auth, &shutdown, &mut tasks);
    let identities = start_identity(&config, &auth, &shutdown, &mut tasks);
    let metrics = metrics::Metrics::new();
    session.report_traffic(metrics.clone());
    let upstreams = start_data_plane(
        &config,
        bound.data_plane,
        DataPlaneInputs {
            identities: identities.clone(),
            snapshots: snapshots.clone(),
            metrics: metrics.clone(),
            loads: session.loads().to_vec(),
        },
        &shutdown,
        &mut tasks,
    );
    let relay = start_relay(&config, bound.relay, &auth, &metrics, &shutdown, &mut tasks);
    start_dns(
        &config, bound.dns, &snapshots, &metrics, &shutdown, &mut tasks,
    );
    let state = admin::AdminState {
        session,
        xds: snapshots,
        has_upstreams: !config.upstreams.is_empty(),
        identities: Some(identities),
        listeners: Some(bound.addrs),
        upstreams: Some(upstreams),
        relay,
        metrics,
    };
    let admin = start_admin(&config, bound.admin, state, &shutdown);
    stop(admin, tasks, shutdown).await
}

/// Every listener, bound before anything is registered.
struct Bound {
    admin: TcpListener,
    admin_addr: SocketAddr,
    data_plane: proxy::Listeners,
    addrs: proxy::Addrs,
    /// The xDS relay's, when it is on.
    relay: Option<relay::Listener>,
    /// The DNS server's UDP and TCP sockets, when it is on.
    dns: Option<dns::Listener>,
}

/// Binds the admin, data-plane and xDS relay listeners, records the
/// inbound port actually bound in `config` (registrations carry it), and
/// prints the `isdp-sidecar listening:` line.
async fn bind(config: &mut Config) -> Result<Bound, Error> {
    let admin = TcpListener::bind(config.admin_listen)
        .await
        .map_err(|source| Error::Bind {
            addr: config.admin_listen,
            source,
        })?;
    let admin_addr = admin.local_addr().map_err(Error::Admin)?;
    let data_plane = proxy::Listeners::bind(config).await?;
    let addrs = data_plane.addrs();
    config.inbound_listen = addrs.inbound;
    let mut line = format!(
        "isdp-sidecar listening: admin={admin_addr} inbound={} outbound={}",
        addrs.inbound, addrs.outbound
    );
    for (name, addr) in &addrs.upstreams {
        line.push_str(&format!(" upstream.{name}={addr}"));
    }
    let relay = match &config.xds_relay {
        Some(r) => Some(relay::Listener::bind(&r.listen).await?),
        None => None,
    };
    if let Some(relay) = &relay {
        line.push_str(&format!(" relay={}", relay.local()));
    }
    let dns = match &config.dns {
        Some(d) => Some(dns::Listener::bind(d.listen).await?),
        None => None,
    };
    if let Some(dns) = &dns {
        line.push_str(&format!(" dns={}", dns.local_addr()));
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    Ok(Bound {
        admin,
        admin_addr,
        data_plane,
        addrs,
        relay,
        dns,
    })
}

/// How every connection to the control plane authenticates: the CA file
/// (plus roots learned over xDS later), the join token, and from its
/// first certificate on the sidecar's primary identity.
fn control_auth(config: &Config) -> Result<dial::ControlAuth, Error> {
    let ca_pem = match &config.ca_file {
        Some(path) => Some(
            std::fs::read_to_string(path).map_err(|source| Error::CaFile {
                path: path.clone(),
                source,
            })?,
        ),
        None => None,
    };
    Ok(dial::ControlAuth {
        ca_pem,
        token: config.join_token.clone(),
        identity: dial::ClientIdentity::default(),
        learned: dial::LearnedRoots::default(),
    })
}

/// The session registering the local services, and a checker per service
/// with a health check reporting on it.
fn start_session(
    config: &Config,
    auth: &dial::ControlAuth,
    shutdown: &watch::Receiver<bool>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> session::Session {
    let session = session::Session::new(config);
    for (index, service) in config.services.iter().enumerate() {
        if let Some(spec) = service.check_spec() {
            let handle = session.clone();
            tasks.push(probe::spawn_checker(
                spec,
                move |health| handle.set_health(index, health),
                shutdown.clone(),
            ));
        }
    }
    tasks.push(session::spawn(
        session.clone(),
        config.control_plane.clone(),
        auth.clone(),
        config.drain_timeout,
        shutdown.clone(),
    ));
    session
}

/// The xDS client, and the task that keeps the control-plane dialer's
/// roots in step with the trust bundle it brings.
fn start_discovery(
    config: &Config,
    auth: &dial::ControlAuth,
    shutdown: &watch::Receiver<bool>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> watch::Receiver<Arc<xds::Snapshot>> {
    let (snapshots, xds_task) = xds::spawn(
        xds::XdsSettings {
            node_id: config.node_id.clone(),
            control_plane: config.control_plane.clone(),
            upstreams: config.upstreams.iter().map(|u| u.name.clone()).collect(),
            local_services: config.services.iter().map(|s| s.name.clone()).collect(),
            auth: auth.clone(),
        },
        shutdown.clone(),
    );
    tasks.push(xds_task);
    tasks.push(tokio::spawn(learn_roots(
        snapshots.clone(),
        auth.learned.clone(),
        shutdown.clone(),
    )));
    snapshots
}

/// One certificate per local service, plus the `identity` a sidecar
/// without services calls others as; and the task presenting the primary
/// one to the control plane. Nothing here blocks startup.
fn start_identity(
    config: &Config,
    auth: &dial::ControlAuth,
    shutdown: &watch::Receiver<bool>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> watch::Receiver<Arc<identity::Identities>> {
    let mut certified: Vec<String> = config.services.iter().map(|s| s.name.clone()).collect();
    if let Some(id) = &config.identity
        && !certified.contains(id)
    {
        certified.push(id.clone());
    }
    let (identities, identity_task) = identity::spawn(
        identity::IdentitySettings {
            services: certified,
            primary: config.identity.clone(),
            lifetime: None,
        },
        Arc::new(identity::grpc::DialSigner::new(
            config.control_plane.clone(),
            auth.clone(),
        )),
        shutdown.clone(),
    );
    tasks.push(identity_task);
    tasks.push(tokio::spawn(present_identity(
        identities.clone(),
        auth.identity.clone(),
        shutdown.clone(),
    )));
    identities
}

/// What the data plane follows.
struct DataPlaneInputs {
    identities: watch::Receiver<Arc<identity::Identities>>,
    snapshots: watch::Receiver<Arc<xds::Snapshot>>,
    metrics: metrics::Metrics,
    /// Each local service's load meter, in config order (the session reports them).
    loads: Vec<Arc<load_report::LocalLoad>>,
}

/// mTLS (contexts rebuilt as identities and roots change, revocations
/// enforced), the compiled authorization policies, the upstreams'
/// balancing state, and the proxy serving every listener. Returns the
/// upstreams for the admin pages.
fn start_data_plane(
    config: &Config,
    listeners: proxy::Listeners,
    inputs: DataPlaneInputs,
    shutdown: &watch::Receiver<bool>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> proxy::upstreams::Upstreams {
    let DataPlaneInputs {
        identities,
        snapshots,
        metrics,
        loads,
    } = inputs;
    let revocations = tls::Revocations::new(metrics.clone());
    let (tls_contexts, tls_task) = proxy::transport::follow(
        identities,
        snapshots.clone(),
        revocations.clone(),
        shutdown.clone(),
    );
    tasks.push(tls_task);
    let tls = proxy::transport::Tls::new(tls_contexts, revocations, metrics.clone());
    let (policies, authz_task) = authz::follow(snapshots.clone(), shutdown.clone());
    tasks.push(authz_task);
    let upstreams = proxy::upstreams::Upstreams::spawn(
        &config.upstreams,
        &metrics,
        snapshots,
        shutdown.clone(),
    );
    let config = config.clone();
    let shutdown = shutdown.clone();
    let serving = upstreams.clone();
    tasks.push(tokio::spawn(async move {
        listeners
            .serve(
                &config,
                serving,
                &metrics,
                tls,
                proxy::LocalInputs { policies, loads },
                shutdown,
            )
            .await
    }));
    upstreams
}

/// The xDS relay on its bound listener, dialling the control plane with
/// the sidecar's credentials (the token, and the primary certificate and
/// learned roots as `auth` keeps them current); None when it is off.
fn start_relay(
    config: &Config,
    listener: Option<relay::Listener>,
    auth: &dial::ControlAuth,
    metrics: &metrics::Metrics,
    shutdown: &watch::Receiver<bool>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Option<relay::Relay> {
    let (listener, settings) = listener.zip(config.xds_relay.as_ref())?;
    let (relay, task) = relay::spawn(
        listener,
        relay::RelaySettings {
            control_plane: config.control_plane.clone(),
            auth: auth.clone(),
            max_streams: settings.max_streams,
            drain: config.drain_timeout,
        },
        metrics,
        shutdown.clone(),
    );
    tasks.push(task);
    Some(relay)
}

/// The DNS server on its bound sockets, answering for the upstreams from
/// the discovery snapshot; nothing when it is off.
fn start_dns(
    config: &Config,
    listener: Option<dns::Listener>,
    snapshots: &watch::Receiver<Arc<xds::Snapshot>>,
    metrics: &metrics::Metrics,
    shutdown: &watch::Receiver<bool>,
    tasks: &mut Vec<JoinHandle<()>>,
) {
    let Some((listener, settings)) = listener.zip(config.dns.as_ref()) else {
        return;
    };
    tasks.push(dns::spawn(
        listener,
        settings,
        config.upstreams.iter().map(|u| u.name.clone()).collect(),
        &config.limits,
        snapshots.clone(),
        metrics,
        shutdown.clone(),
    ));
}

/// The scrape-time state metrics, and the admin endpoint on the listener
/// bound first. `state` holds every identity; `/ready` waits for one only
/// when the sidecar has an `identity` to call others as.
fn start_admin(
    config: &Config,
    listener: TcpListener,
    mut state: admin::AdminState,
    shutdown: &watch::Receiver<bool>,
) -> JoinHandle<()> {
    state.metrics.register_collector(admin::StateCollector {
        identities: state.identities.clone(),
        snapshots: state.xds.clone(),
        session: state.session.clone(),
        upstreams: state.upstreams.clone(),
    });
    if config.identity.is_none() {
        state.identities = None;
    }
    tokio::spawn(admin::serve(
        listener,
        state,
        config.limits.clone(),
        shutdown.clone(),
    ))
}

/// Waits for shutdown (or the admin server ending early, which only a
/// panic makes it do), then for every task to finish: the session closes,
/// probes and xDS stop, and the proxy drains its connections.
async fn stop(
    mut admin: JoinHandle<()>,
    tasks: Vec<JoinHandle<()>>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), Error> {
    let admin_result = tokio::select! {
        biased;
        _ = shutdown.wait_for(|stop| *stop) => None,
        result = &mut admin => Some(result),
    };
    if let Some(result) = admin_result {
        // The admin server stops on its own only by panicking (or because
        // shutdown began at the same moment).
        if !*shutdown.borrow() {
            return Err(Error::Admin(match result {
                Ok(()) => std::io::Error::other("admin server stopped"),
                Err(e) => std::io::Error::other(e),
            }));
        }
    }
    tracing::info!("shutting down");
    for task in tasks {
        let _ = task.await;
    }
    if !admin.is_finished() {
        let _ = admin.await;
    }
    tracing::info!("sidecar stopped");
    Ok(())
}

/// Keeps the roots used to dial the control plane in step with the trust
/// bundle over xDS, so a root rotation needs no restart: the control
/// plane's certificate moves to the new root while the CA file still
/// holds only the old one.
async fn learn_roots(
    mut snapshots: watch::Receiver<std::sync::Arc<xds::Snapshot>>,
    learned: dial::LearnedRoots,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut held = None;
    loop {
        let bundle = snapshots.borrow_and_update().trust_bundle.clone();
        if bundle != held {
            learned.replace(
                bundle
                    .as_ref()
                    .map(|b| b.roots_der.clone())
                    .unwrap_or_default(),
            );
            held = bundle;
        }
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            changed = snapshots.changed() => if changed.is_err() { return },
        }
    }
}

/// Keeps the client certificate the control-plane dialer presents at the
/// sidecar's primary identity: from its first certificate on, every new
/// connection to the control plane authenticates with it too.
async fn present_identity(
    mut identities: watch::Receiver<std::sync::Arc<identity::Identities>>,
    presented: dial::ClientIdentity,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let pem = identities
            .borrow_and_update()
            .primary()
            .and_then(|id| id.pem.clone());
        presented.replace(pem);
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            changed = identities.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn run_stops_promptly_on_shutdown() {
        let mut config = Config::from_toml(
            "node_id = \"n\"\nadmin_listen = \"127.0.0.1:0\"\ncontrol_plane = [\"http://127.0.0.1:1\"]\n\
             inbound_listen = \"127.0.0.1:0\"\noutbound_listen = \"127.0.0.1:0\"\n\
             [[service]]\nname = \"web\"\nport = 1\ncheck = \"tcp://127.0.0.1:1\"\n\
             [[upstream]]\nname = \"payments\"\n",
        )
        .unwrap();
        config.drain_timeout = Duration::from_secs(1);
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(run(config, shutdown));
        tokio::time::sleep(Duration::from_millis(300)).await;
        if stop.send(true).is_err() {
            panic!("run ended early: {:?}", task.await);
        }
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("stops in time")
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn bind_errors_name_the_address() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let mut config =
            Config::from_toml("node_id = \"n\"\nca_file = \"/ca.pem\"\njoin_token = \"t\"")
                .unwrap();
        config.admin_listen = addr;
        let (_stop, shutdown) = watch::channel(false);
        let err = run(config, shutdown).await.unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("bind admin listener {addr}")),
            "{err}"
        );
    }

    /// The relay's listener is bound with the others, before anything
    /// starts; a failure names the key.
    #[tokio::test]
    async fn relay_bind_errors_name_the_key() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let config = Config::from_toml(&format!(
            "node_id = \"n\"\nca_file = \"/ca.pem\"\njoin_token = \"t\"\n\
             admin_listen = \"127.0.0.1:0\"\ninbound_listen = \"127.0.0.1:0\"\n\
             outbound_listen = \"127.0.0.1:0\"\nxds_relay_listen = \"{addr}\"\n"
        ))
        .unwrap();
        let (_stop, shutdown) = watch::channel(false);
        let err = run(config, shutdown).await.unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("bind xds_relay_listen {addr}: ")),
            "{err}"
        );
    }
}
