//! The HTTP/JSON API (`--http-listen`), for tools that do not link ISDP's
//! protos, and the Consul-compatible read endpoints discovery tools
//! (Prometheus `consul_sd_configs`, consul-template, ...) poll, and the
//! same registry as Prometheus' HTTP service discovery reads it.
//!
//! Every route calls the same gRPC service code (`crate::api`) that
//! `isdpctl` reaches: a handler builds the service's request message,
//! puts the authenticated principal into its extensions as the gRPC auth
//! layer does, calls the service trait method and maps the `Status` to an
//! HTTP status (`error`). Validation and error texts are therefore those
//! of the gRPC API, byte for byte; only the blocking reads (`?index=`)
//! and the Consul shapes are this module's own.
//!
//! # Layout
//! - `routes`: the one route -> role table ([`ROUTES`], and the
//!   dashboard's [`UI_ROUTES`]); anything unlisted is refused.
//! - `router`: [`Routes`], handlers mounted on the tables' rows (the
//!   dashboard, `crate::ui`, mounts its own the same way), and the router
//!   built from them.
//! - `auth`: the middleware that authenticates (`Authorization: Bearer`
//!   or `X-Consul-Token`) and checks each route's row.
//! - `error`: `Status` and request-parsing errors as HTTP statuses and a
//!   JSON body `{"code", "message"}`.
//! - `json`: the protobuf JSON mapping of `isdp.v1` messages, read from
//!   their descriptors (unknown fields refused).
//! - `index`: per-service change indexes for blocking reads.
//! - `waiting`: blocking reads counted per principal
//!   (`--max-streams-per-principal`) and ended with their token.
//! - `registry`, `policies`, `security` (authorization rules, tokens),
//!   `status` (proxy status), `consul`, `prometheus` (HTTP service
//!   discovery targets), `openapi`: one file per resource group.
//! - `catalog`: the registry as discovery clients read it (a join
//!   principal within its xDS scope), for `consul` and `prometheus`.
//! - `conn`: serving TLS connections: HTTP/1.1 and HTTP/2, header-read
//!   and idle timeouts, graceful shutdown.

mod auth;
mod catalog;
mod conn;
mod consul;
mod error;
mod index;
pub mod json;
mod openapi;
mod policies;
mod prometheus;
mod registry;
mod router;
mod routes;
mod security;
mod status;
mod waiting;

pub use conn::{Settings, spawn};
pub use error::HttpError;
pub use router::Routes;
pub use routes::{Credential, ROUTES, Route, SessionAuth, UI_ROUTES};

use std::{sync::Arc, time::Duration};

use tokio::{sync::watch, task::JoinHandle};

use crate::{
    api::{
        authorization::AuthorizationApi, policies::PoliciesApi, registry::RegistryApi,
        status::ProxyStatusApi, tokens::TokensApi,
    },
    registry::Registry,
    tokens::Tokens,
};

/// Blocking reads one principal may have waiting unless
/// [`Api::max_waits_per_principal`] says otherwise (the default of
/// `--max-streams-per-principal`).
pub const DEFAULT_MAX_WAITS: usize = 1000;

/// What the handlers call: the gRPC services themselves, and the views
/// the blocking reads wait on.
#[derive(Clone)]
pub struct Api {
    inner: Arc<Inner>,
}

struct Inner {
    registry_api: RegistryApi,
    policies_api: PoliciesApi,
    authorization_api: AuthorizationApi,
    tokens_api: TokensApi,
    status_api: ProxyStatusApi,
    /// Authenticates bearer tokens.
    tokens: Tokens,
    index: index::Index,
    /// The datacenter the Consul endpoints report.
    datacenter: String,
    /// Longest `?wait=` a blocking read may ask for.
    max_wait: Duration,
    /// Blocking reads waiting, per principal.
    waits: waiting::Waits,
}

/// The services and views [`Api::start`] needs.
pub struct Services {
    pub registry_api: RegistryApi,
    pub policies_api: PoliciesApi,
    pub authorization_api: AuthorizationApi,
    pub tokens_api: TokensApi,
    pub status_api: ProxyStatusApi,
    pub tokens: Tokens,
    pub registry: Registry,
}

// === impl Api ===

impl Api {
    /// The API over `services`, and the task that numbers registry changes
    /// for blocking reads (it runs until `shutdown`).
    pub fn start(
        services: Services,
        datacenter: String,
        max_wait: Duration,
        shutdown: watch::Receiver<bool>,
    ) -> (Self, JoinHandle<()>) {
        let (index, task) = index::Index::spawn(services.registry.clone(), shutdown);
        let api = Api {
            inner: Arc::new(Inner {
                registry_api: services.registry_api,
                policies_api: services.policies_api,
                authorization_api: services.authorization_api,
                tokens_api: services.tokens_api,
                status_api: services.status_api,
                index,
                waits: waiting::Waits::new(services.tokens.clone(), DEFAULT_MAX_WAITS),
                tokens: services.tokens,
                datacenter,
                max_wait,
            }),
        };
        (api, task)
    }

    /// At most `max` blocking reads waiting per principal
    /// (`--max-streams-per-principal`); set before the routes are taken.
    pub fn max_waits_per_principal(mut self, max: usize) -> Self {
        let inner = Arc::get_mut(&mut self.inner).expect("set before the routes are taken");
        inner.waits = waiting::Waits::new(inner.tokens.clone(), max);
        self
    }

    /// Waits as [`index::Index::wait`] does, counted and ended as
    /// `waiting` says.
    async fn wait_change(
        &self,
        p: &crate::auth::Principal,
        service: Option<&str>,
        seen: u64,
        wait: Duration,
    ) -> Result<u64, HttpError> {
        let inner = &self.inner;
        inner.waits.wait(&inner.index, p, service, seen, wait).await
    }

    /// Every route of this module, to be mounted with [`Routes::router`].
    pub fn routes(&self) -> Routes {
        let mut routes = Routes::new(self.inner.tokens.clone());
        registry::mount(&mut routes, self);
        policies::mount(&mut routes, self);
        security::mount(&mut routes, self);
        status::mount(&mut routes, self);
        consul::mount(&mut routes, self);
        prometheus::mount(&mut routes, self);
        openapi::mount(&mut routes);
        routes
    }
}

/// `router` with the auth middleware in front of each of its routes
/// (`auth::authorize`: the route's row, its credential, its need). Here
/// rather than in `routes`, which `auth` reads the table from.
fn guarded(
    router: axum::Router,
    tokens: Tokens,
    sessions: Option<Arc<dyn SessionAuth>>,
) -> axum::Router {
    router.route_layer(axum::middleware::from_fn_with_state(
        auth::Gate { tokens, sessions },
        auth::authorize,
    ))
}

/// A gRPC request carrying `principal` as the auth layer would have put
/// it there, for the service methods the handlers call.
fn grpc_request<T>(principal: crate::auth::Principal, message: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.extensions_mut().insert(principal);
    req
}

#[cfg(test)]
mod tests;
