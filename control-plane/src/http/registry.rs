//! The registry over HTTP: `POST /v1/instances` (an `Instance`),
//! `DELETE /v1/instances/{id}`, `GET /v1/services`, and
//! `GET /v1/services/{service}/instances`, which with `?index=N` blocks
//! until the service's instances change from what index `N` saw (or
//! `?wait=`, default 5 minutes, passes) and returns the list with its new
//! index in `X-Isdp-Index`: the HTTP form of `WatchService`.

use std::time::Duration;

use axum::{
    Extension,
    extract::{Path, Query, State},
    response::{IntoResponse, Response},
    routing::{delete, get, post},
};
use isdp_proto::v1::{
    DeregisterRequest, Instance, ListInstancesRequest, ListServicesRequest, RegisterRequest,
    registry_server::Registry as _,
};
use serde::Deserialize;

use super::{Api, HttpError, Routes, grpc_request, json};
use crate::auth::Principal;

/// The header carrying a blocking read's index.
pub const INDEX_HEADER: &str = "x-isdp-index";

/// `?wait=` when a blocking read gives none (Consul's default).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(300);

pub fn mount(routes: &mut Routes, api: &Api) {
    let s = api.clone();
    routes.add(
        "POST",
        "/v1/instances",
        post(register).with_state(s.clone()),
    );
    routes.add(
        "DELETE",
        "/v1/instances/{id}",
        delete(deregister).with_state(s.clone()),
    );
    routes.add(
        "GET",
        "/v1/services",
        get(list_services).with_state(s.clone()),
    );
    routes.add(
        "GET",
        "/v1/services/{service}/instances",
        get(list_instances).with_state(s),
    );
}

async fn register(
    State(api): State<Api>,
    Extension(p): Extension<Principal>,
    json::Body(body): json::Body,
) -> Result<Response, HttpError> {
    let instance: Instance = json::decode(&body)?;
    let req = RegisterRequest {
        instance: Some(instance),
    };
    let res = api
        .inner
        .registry_api
        .register(grpc_request(p, req))
        .await?;
    Ok(json::reply(&res.into_inner().instance.unwrap_or_default()))
}

async fn deregister(
    State(api): State<Api>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, HttpError> {
    let req = DeregisterRequest { id };
    let res = api
        .inner
        .registry_api
        .deregister(grpc_request(p, req))
        .await?;
    Ok(json::reply(res.get_ref()))
}

async fn list_services(
    State(api): State<Api>,
    Extension(p): Extension<Principal>,
) -> Result<Response, HttpError> {
    let index = api.inner.index.current(None);
    let req = grpc_request(p, ListServicesRequest {});
    let res = api.inner.registry_api.list_services(req).await?;
    Ok(with_index(json::reply(res.get_ref()), INDEX_HEADER, index))
}

/// A blocking read's parameters.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Blocking {
    /// The index the client saw; absent: answer at once.
    pub index: Option<u64>,
    /// How long to wait for a change (`10s`, `5m`, `1500ms`).
    pub wait: Option<String>,
}

impl Blocking {
    /// The wait asked for, within `max`; a malformed one is a 400 naming it.
    pub fn wait(&self, max: Duration) -> Result<Duration, HttpError> {
        match &self.wait {
            None => Ok(DEFAULT_WAIT.min(max)),
            Some(w) => parse_wait(w).map(|d| d.min(max)).ok_or_else(|| {
                HttpError::invalid(format!(
                    "wait: expected a duration such as `30s` or `5m` (at most {}), got {:?}",
                    humantime::format_duration(max),
                    w.chars().take(40).collect::<String>()
                ))
            }),
        }
    }
}

/// A duration as Consul's clients write it: Go's `1m30s`, `120000ms`, or
/// a bare number of seconds.
fn parse_wait(w: &str) -> Option<Duration> {
    if let Ok(secs) = w.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    humantime::parse_duration(w).ok()
}

async fn list_instances(
    State(api): State<Api>,
    Extension(p): Extension<Principal>,
    Path(service): Path<String>,
    query: Result<Query<Blocking>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, HttpError> {
    let Query(blocking) = query.map_err(|e| HttpError::invalid(e.body_text()))?;
    let wait = blocking.wait(api.inner.max_wait)?;
    let req = || {
        grpc_request(
            p.clone(),
            ListInstancesRequest {
                service: service.clone(),
            },
        )
    };
    // The index is read before the list, so the list is at least as new
    // as the index it is sent with; the first call also validates (400)
    // before any wait.
    let mut index = api.inner.index.current(Some(&service));
    let mut res = api.inner.registry_api.list_instances(req()).await?;
    if let Some(seen) = blocking.index
        && seen == index
    {
        index = api.wait_change(&p, Some(&service), seen, wait).await?;
        res = api.inner.registry_api.list_instances(req()).await?;
    }
    Ok(with_index(json::reply(res.get_ref()), INDEX_HEADER, index))
}

/// `res` with `header: index`.
pub fn with_index(res: Response, header: &'static str, index: u64) -> Response {
    let mut res = res.into_response();
    res.headers_mut()
        .insert(header, http::HeaderValue::from(index));
    res
}
