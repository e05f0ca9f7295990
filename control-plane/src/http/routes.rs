//! What each HTTP route needs of its caller: one explicit row per route,
//! like the gRPC table (`crate::auth::methods`), and nothing open by
//! default.
//!
//! A route served by a gRPC method names it, and needs exactly what that
//! method needs (the tests check it); Consul's read endpoints need any
//! principal, as ADS does, and narrow a join principal to its read scope
//! in the handler. A handler can only be mounted on a path with a row
//! (`super::Routes::add` panics otherwise), and the router is only built
//! once every row has a handler, so the table and the router cannot
//! drift; the auth middleware refuses a route it finds no row for all the
//! same.
//!
//! Another module (the dashboard) adds its rows here and mounts its
//! handlers with `Routes::add` on the same `Routes`.

use crate::{auth::Need, tokens::Role};

/// One route: method, path (axum's `{param}` syntax, also OpenAPI's), what
/// it needs, and the gRPC method whose code it calls, if any.
#[derive(Clone, Copy, Debug)]
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub need: Need,
    pub grpc: Option<&'static str>,
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
        grpc: if grpc.is_empty() { None } else { Some(grpc) },
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
    // The API's description.
    row("GET", "/v1/openapi.json", JOIN_OR_READ, ""),
];

/// The row of `method` on the matched route `path`.
pub fn lookup(method: &str, path: &str) -> Option<&'static Route> {
    ROUTES.iter().find(|r| r.method == method && r.path == path)
}

/// What `need` asks for, as the refusals and the OpenAPI document say it.
pub fn need_name(need: Need) -> String {
    match need {
        Need::Role(r) => r.name().to_owned(),
        Need::JoinOr(r) => format!("join or {}", r.name()),
    }
}
