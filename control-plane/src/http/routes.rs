//! What each HTTP route needs of its caller: one explicit row per route,
//! like the gRPC table (`crate::auth::methods`), and nothing open by
//! default.
//!
//! A route served by a gRPC method names it, and needs exactly what that
//! method needs (the tests check it); Consul's read endpoints and the
//! Prometheus targets need any principal, as ADS does, and narrow a join
//! principal to its read scope in the handler. A handler can only be mounted on a path with a row
//! (`super::Routes::add` panics otherwise), and the router is only built
//! once every row has a handler, so the table and the router cannot
//! drift; the auth middleware refuses a route it finds no row for all the
//! same.
//!
//! The dashboard (`crate::ui`) has its rows here too, in [`UI_ROUTES`]:
//! its pages take a session cookie ([`Credential::Session`], resolved by
//! the [`SessionAuth`] it installs with [`super::Routes::sessions`]) and its login
//! form and static assets none ([`Credential::Public`]: they show nothing
//! of the mesh; the form's POST checks the token itself).

use axum::{extract::Request, response::Response};

use crate::{
    auth::{Need, Principal},
    tokens::Role,
};

/// One route: method, path (axum's `{param}` syntax, also OpenAPI's), what
/// it needs, how the caller proves who it is, and the gRPC method whose
/// code it calls, if any.
#[derive(Clone, Copy, Debug)]
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub need: Need,
    pub credential: Credential,
    pub grpc: Option<&'static str>,
}

/// How a route's caller authenticates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Credential {
    /// A bearer token in `Authorization` or `X-Consul-Token`.
    Bearer,
    /// The dashboard's session cookie, through [`SessionAuth`].
    Session,
    /// None: the handler serves nothing of the mesh, or checks a token
    /// itself.
    Public,
}

/// Resolves a [`Credential::Session`] request to its principal, or the
/// answer that refuses it (the dashboard sends a page to its login form).
pub trait SessionAuth: Send + Sync + 'static {
    fn principal(&self, req: &Request) -> Result<Principal, Box<Response>>;
}

const READ: Need = Need::Role(Role::Read);
const WRITE: Need = Need::Role(Role::Write);
const ADMIN: Need = Need::Role(Role::Admin);
/// Any principal; a join principal reads within its scope.
const JOIN_OR_READ: Need = Need::JoinOr(Role::Read);

const fn row(method: &'static str, path: &'static str, need: Need, grpc: &'static str) -> Route {
    Route {
        method,
        path,
        need,
        credential: Credential::Bearer,
        grpc: if grpc.is_empty() { None } else { Some(grpc) },
    }
}

const fn ui(method: &'static str, path: &'static str, credential: Credential) -> Route {
    Route {
        method,
        path,
        need: READ,
        credential,
        grpc: None,
    }
}

/// Every route the HTTP listener serves.
pub const ROUTES: &[Route] = &[
    // Registry.
    row("POST", "/v1/instances", WRITE, "/isdp.v1.Registry/Register"),
    row(
        "DELETE",
        "/v1/instances/{id}",
        WRITE,
        "/isdp.v1.Registry/Deregister",
    ),
    row(
        "GET",
        "/v1/services",
        READ,
        "/isdp.v1.Registry/ListServices",
    ),
    // With `?index=` it blocks like `WatchService` (which needs the same).
    row(
        "GET",
        "/v1/services/{service}/instances",
        READ,
        "/isdp.v1.Registry/ListInstances",
    ),
    // Traffic policies.
    row(
        "GET",
        "/v1/policies",
        JOIN_OR_READ,
        "/isdp.v1.Policies/List",
    ),
    row(
        "GET",
        "/v1/policies/{service}",
        JOIN_OR_READ,
        "/isdp.v1.Policies/Get",
    ),
    row(
        "PUT",
        "/v1/policies/{service}",
        WRITE,
        "/isdp.v1.Policies/Put",
    ),
    row(
        "DELETE",
        "/v1/policies/{service}",
        WRITE,
        "/isdp.v1.Policies/Delete",
    ),
    // Authorization rules.
    row(
        "GET",
        "/v1/authorization/rules",
        READ,
        "/isdp.v1.Authorization/ListRules",
    ),
    row(
        "PUT",
        "/v1/authorization/rules/{destination}/{name}",
        WRITE,
        "/isdp.v1.Authorization/PutRule",
    ),
    row(
        "DELETE",
        "/v1/authorization/rules/{destination}/{name}",
        WRITE,
        "/isdp.v1.Authorization/DeleteRule",
    ),
    row(
        "GET",
        "/v1/authorization/default",
        READ,
        "/isdp.v1.Authorization/GetDefault",
    ),
    row(
        "PUT",
        "/v1/authorization/default",
        WRITE,
        "/isdp.v1.Authorization/SetDefault",
    ),
    // Tokens.
    row("GET", "/v1/tokens", ADMIN, "/isdp.v1.Tokens/List"),
    row("POST", "/v1/tokens", ADMIN, "/isdp.v1.Tokens/Create"),
    row("DELETE", "/v1/tokens/{id}", ADMIN, "/isdp.v1.Tokens/Revoke"),
    // Proxy status.
    row(
        "GET",
        "/v1/proxies",
        READ,
        "/isdp.v1.ProxyStatus/ListProxies",
    ),
    // Consul-compatible reads: endpoints, as ADS serves them.
    row("GET", "/v1/catalog/services", JOIN_OR_READ, ""),
    row("GET", "/v1/catalog/service/{name}", JOIN_OR_READ, ""),
    row("GET", "/v1/health/service/{name}", JOIN_OR_READ, ""),
    row("GET", "/v1/agent/self", JOIN_OR_READ, ""),
    // Prometheus HTTP service discovery: the same reads, its format.
    row("GET", "/v1/prometheus/targets", JOIN_OR_READ, ""),
    // The API's description.
    row("GET", "/v1/openapi.json", JOIN_OR_READ, ""),
];

/// The dashboard's routes (`crate::ui`): read-only, so a forged
/// cross-site request can change nothing. A public row's need is what its
/// handler asks of the token it checks.
pub const UI_ROUTES: &[Route] = &[
    ui("GET", "/ui/login", Credential::Public),
    ui("POST", "/ui/login", Credential::Public),
    ui("GET", "/ui/assets/{file}", Credential::Public),
    ui("POST", "/ui/logout", Credential::Public),
    ui("GET", "/ui/", Credential::Session),
    ui("GET", "/ui/events", Credential::Session),
];

/// Every row: the API's and the dashboard's.
pub fn all() -> impl Iterator<Item = &'static Route> {
    ROUTES.iter().chain(UI_ROUTES)
}

/// The row of `method` on the matched route `path`.
pub fn lookup(method: &str, path: &str) -> Option<&'static Route> {
    all().find(|r| r.method == method && r.path == path)
}

/// What `need` asks for, as the refusals and the OpenAPI document say it.
pub fn need_name(need: Need) -> String {
    match need {
        Need::Role(r) => r.name().to_owned(),
        Need::JoinOr(r) => format!("join or {}", r.name()),
    }
}
