//! Proxy status over HTTP: `GET /v1/proxies`, calling
//! `isdp.v1.ProxyStatus/ListProxies` (every open discovery stream and what
//! it acknowledged, per resource).

use axum::{Extension, extract::State, response::Response, routing::get};
use isdp_proto::v1::{ListProxiesRequest, proxy_status_server::ProxyStatus as _};

use super::{Api, HttpError, Routes, grpc_request, json};
use crate::auth::Principal;

pub fn mount(routes: &mut Routes, api: &Api) {
    routes.add("GET", "/v1/proxies", get(list).with_state(api.clone()));
}

async fn list(
    State(api): State<Api>,
    Extension(p): Extension<Principal>,
) -> Result<Response, HttpError> {
    let req = grpc_request(p, ListProxiesRequest {});
    let res = api.inner.status_api.list_proxies(req).await?;
    Ok(json::reply(res.get_ref()))
}
