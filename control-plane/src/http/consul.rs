//! Consul-compatible reads for discovery clients (Prometheus
//! `consul_sd_configs`, consul-template, Traefik, Fabio): only the
//! endpoints and fields they read, from the registry the gRPC API lists.
//!
//! - `GET /v1/catalog/services`: `{"<service>": []}` (ISDP has no tags).
//! - `GET /v1/catalog/service/{name}`: one entry per instance with `ID`,
//!   `Node`, `Address`, `Datacenter`, `ServiceID`, `ServiceName`,
//!   `ServiceAddress`, `ServicePort`, `ServiceTags`, `ServiceMeta`.
//! - `GET /v1/health/service/{name}`: `{"Node": {ID, Node, Address,
//!   Datacenter}, "Service": {ID, Service, Tags, Address, Port, Meta},
//!   "Checks": [{Node, CheckID, Name, Status, ServiceID, ServiceName}]}`,
//!   `Status` `passing` (healthy, or not checked yet: routable, as for
//!   sidecars) or `critical`; `?passing` keeps the passing ones.
//! - `GET /v1/agent/self`: `{"Config": {"Datacenter", "NodeName"}}`, which
//!   Prometheus asks for when its config names no datacenter.
//!
//! Blocking queries: `?index=N&wait=D` (Consul's `X-Consul-Index`, default
//! wait 5 minutes, at most `--http-max-wait`). Every answer carries
//! `X-Consul-Index`, `X-Consul-KnownLeader` and `X-Consul-LastContact`,
//! which Consul's client library requires. `?tag=` matches nothing (no
//! instance has tags); `?filter=` is refused; `dc` must be
//! `--consul-datacenter`; other parameters (`stale`, `consistent`,
//! `cached`, `near`, ...) are accepted and change nothing.
//!
//! The node of an instance is its sidecar's node id, or `isdp` for an
//! instance an operator registered. A join principal reads only the
//! services its token may read over xDS, as `Policies/Get` does.

use axum::{
    Extension, Json,
    extract::{Path, Query, State},
    response::{IntoResponse, Response},
    routing::get,
};
use isdp_proto::v1::Instance;
use serde_json::{Value, json};

use super::{
    Api, HttpError, Routes,
    catalog::{self, CONTROL_PLANE_NODE, health_name, node, passing},
    registry::Blocking,
    registry::with_index,
};
use crate::auth::Principal;

pub fn mount(routes: &mut Routes, api: &Api) {
    let s = api.clone();
    routes.add(
        "GET",
        "/v1/catalog/services",
        get(catalog_services).with_state(s.clone()),
    );
    routes.add(
        "GET",
        "/v1/catalog/service/{name}",
        get(catalog_service).with_state(s.clone()),
    );
    routes.add(
        "GET",
        "/v1/health/service/{name}",
        get(health_service).with_state(s.clone()),
    );
    routes.add("GET", "/v1/agent/self", get(agent_self).with_state(s));
}

/// The query parameters these endpoints read.
#[derive(Debug, Default)]
struct Params {
    blocking: Blocking,
    passing: bool,
    tagged: bool,
}

/// Query pairs; a bare key (`?passing`, `?stale`) has an empty value.
type Pairs = Result<Query<Vec<(String, String)>>, axum::extract::rejection::QueryRejection>;

fn params(api: &Api, pairs: Pairs) -> Result<Params, HttpError> {
    let Query(pairs) = pairs.map_err(|e| HttpError::invalid(e.body_text()))?;
    let mut p = Params::default();
    for (k, v) in pairs {
        match k.as_str() {
            "index" => {
                p.blocking.index = Some(v.parse().map_err(|_| {
                    HttpError::invalid(format!(
                        "index: expected a non-negative integer, got {:?}",
                        v.chars().take(40).collect::<String>()
                    ))
                })?)
            }
            "wait" => p.blocking.wait = Some(v),
            "passing" => p.passing = !matches!(v.as_str(), "false" | "0"),
            "tag" => p.tagged = true,
            "filter" => return Err(HttpError::invalid("filter: not supported by ISDP")),
            "dc" if v != api.inner.datacenter => {
                return Err(HttpError::invalid(format!(
                    "dc: this control plane serves datacenter {:?} (--consul-datacenter), not {:?}",
                    api.inner.datacenter,
                    v.chars().take(64).collect::<String>()
                )));
            }
            _ => {}
        }
    }
    Ok(p)
}

/// A Consul answer: `body` with the query meta headers.
fn consul(body: Value, index: u64) -> Response {
    let mut res = with_index(Json(body).into_response(), "x-consul-index", index);
    let h = res.headers_mut();
    h.insert(
        "x-consul-knownleader",
        http::HeaderValue::from_static("true"),
    );
    h.insert("x-consul-lastcontact", http::HeaderValue::from_static("0"));
    res
}

async fn catalog_services(
    State(api): State<Api>,
    Extension(p): Extension<Principal>,
    pairs: Pairs,
) -> Result<Response, HttpError> {
    let q = params(&api, pairs)?;
    let wait = q.blocking.wait(api.inner.max_wait)?;
    let mut index = api.inner.index.current(None);
    if q.blocking.index == Some(index) {
        index = api.wait_change(&p, None, index, wait).await?;
    }
    let services: serde_json::Map<String, Value> = catalog::services(&api, &p)
        .await?
        .into_iter()
        .map(|name| (name, json!([])))
        .collect();
    Ok(consul(Value::Object(services), index))
}

/// The instances of `name` the caller may read, after waiting as the
/// query asks; with their index.
async fn instances(
    api: &Api,
    p: Principal,
    name: String,
    q: &Params,
) -> Result<(Vec<Instance>, u64), HttpError> {
    const METHOD: &str = "Consul catalog";
    // The index before the list: the list is at least that new.
    let mut index = api.inner.index.current(Some(&name));
    let mut list = catalog::instances(api, &p, METHOD, &name).await?;
    let wait = q.blocking.wait(api.inner.max_wait)?;
    if q.blocking.index == Some(index) {
        index = api.wait_change(&p, Some(&name), index, wait).await?;
        list = catalog::instances(api, &p, METHOD, &name).await?;
    }
    if q.tagged {
        list.clear();
    }
    Ok((list, index))
}

async fn catalog_service(
    State(api): State<Api>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    pairs: Pairs,
) -> Result<Response, HttpError> {
    let q = params(&api, pairs)?;
    let (list, index) = instances(&api, p, name, &q).await?;
    let dc = &api.inner.datacenter;
    let entries: Vec<Value> = list
        .iter()
        .map(|i| {
            json!({
                "ID": node(i),
                "Node": node(i),
                "Address": i.address,
                "Datacenter": dc,
                "ServiceID": i.id,
                "ServiceName": i.service,
                "ServiceAddress": i.address,
                "ServicePort": i.port,
                "ServiceTags": [],
                "ServiceMeta": i.metadata,
            })
        })
        .collect();
    Ok(consul(Value::Array(entries), index))
}

async fn health_service(
    State(api): State<Api>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    pairs: Pairs,
) -> Result<Response, HttpError> {
    let q = params(&api, pairs)?;
    let (list, index) = instances(&api, p, name, &q).await?;
    let dc = &api.inner.datacenter;
    let entries: Vec<Value> = list
        .iter()
        .filter(|i| !q.passing || passing(i))
        .map(|i| {
            json!({
                "Node": {
                    "ID": node(i),
                    "Node": node(i),
                    "Address": i.address,
                    "Datacenter": dc,
                },
                "Service": {
                    "ID": i.id,
                    "Service": i.service,
                    "Tags": [],
                    "Address": i.address,
                    "Port": i.port,
                    "Meta": i.metadata,
                },
                "Checks": [{
                    "Node": node(i),
                    "CheckID": format!("service:{}", i.id),
                    "Name": format!("ISDP health of {}", i.id),
                    "Status": health_name(i),
                    "ServiceID": i.id,
                    "ServiceName": i.service,
                }],
            })
        })
        .collect();
    Ok(consul(Value::Array(entries), index))
}

async fn agent_self(State(api): State<Api>) -> Response {
    Json(json!({
        "Config": {
            "Datacenter": api.inner.datacenter,
            "NodeName": CONTROL_PLANE_NODE,
        }
    }))
    .into_response()
}
