//! Authorization rules and tokens over HTTP, calling
//! `isdp.v1.Authorization` and `isdp.v1.Tokens`:
//! - `GET /v1/authorization/rules` (`?destination=` narrows),
//!   `PUT|DELETE /v1/authorization/rules/{destination}/{name}` (the body
//!   of a PUT is an `AuthzRule`; its `destination` and `name` are the
//!   path's when absent and must equal them when present),
//!   `GET|PUT /v1/authorization/default` (`{"action": "ACTION_DENY"}`).
//! - `GET /v1/tokens`, `POST /v1/tokens` (a `CreateTokenRequest`; the
//!   answer carries the secret, once), `DELETE /v1/tokens/{id}`.

use axum::{
    Extension,
    extract::{Path, Query, State},
    response::Response,
    routing::{delete, get, post, put},
};
use isdp_proto::v1::{
    AuthzRule, CreateTokenRequest, DeleteRuleRequest, GetDefaultRequest, ListRulesRequest,
    ListTokensRequest, PutRuleRequest, RevokeTokenRequest, SetDefaultRequest,
    authorization_server::Authorization as _, tokens_server::Tokens as _,
};
use serde::Deserialize;

use super::{Api, HttpError, Routes, grpc_request, json};
use crate::auth::Principal;

const RULE: &str = "/v1/authorization/rules/{destination}/{name}";

pub fn mount(routes: &mut Routes, api: &Api) {
    let s = api.clone();
    routes.add(
        "GET",
        "/v1/authorization/rules",
        get(list_rules).with_state(s.clone()),
    );
    routes.add("PUT", RULE, put(put_rule).with_state(s.clone()));
    routes.add("DELETE", RULE, delete(delete_rule).with_state(s.clone()));
    routes.add(
        "GET",
        "/v1/authorization/default",
        get(get_default).with_state(s.clone()),
    );
    routes.add(
        "PUT",
        "/v1/authorization/default",
        put(set_default).with_state(s.clone()),
    );
    routes.add("GET", "/v1/tokens", get(list_tokens).with_state(s.clone()));
    routes.add(
        "POST",
        "/v1/tokens",
        post(create_token).with_state(s.clone()),
    );
    routes.add(
        "DELETE",
        "/v1/tokens/{id}",
        delete(revoke_token).with_state(s),
    );
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesQuery {
    #[serde(default)]
    destination: String,
}

async fn list_rules(
    State(api): State<Api>,
    Extension(p): Extension<Principal>,
    q: Result<Query<RulesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, HttpError> {
    let Query(q) = q.map_err(|e| HttpError::invalid(e.body_text()))?;
    let req = ListRulesRequest {
        destination: q.destination,
    };
    let res = api
        .inner
        .authorization_api
        .list_rules(grpc_request(p, req))
        .await?;
    Ok(json::reply(res.get_ref()))
}

async fn put_rule(
    State(api): State<Api>,
    Extension(p): Extension<Principal>,
    Path((destination, name)): Path<(String, String)>,
    json::Body(body): json::Body,
) -> Result<Response, HttpError> {
    let mut rule: AuthzRule = json::decode(&body)?;
    for (field, given, path) in [
        ("destination", &mut rule.destination, &destination),
        ("name", &mut rule.name, &name),
    ] {
        if given.is_empty() {
            given.clone_from(path);
        } else if given != path {
            return Err(HttpError::invalid(format!(
                "{field}: the body names {given:?}, the path {path:?}; they must agree"
            )));
        }
    }
    let req = PutRuleRequest { rule: Some(rule) };
    let res = api
        .inner
        .authorization_api
        .put_rule(grpc_request(p, req))
        .await?;
    Ok(json::reply(res.get_ref()))
}

async fn delete_rule(
    State(api): State<Api>,
    Extension(p): Extension<Principal>,
    Path((destination, name)): Path<(String, String)>,
) -> Result<Response, HttpError> {
    let req = DeleteRuleRequest { destination, name };
    let res = api
        .inner
        .authorization_api
        .delete_rule(grpc_request(p, req))
        .await?;
    Ok(json::reply(res.get_ref()))
}

async fn get_default(
    State(api): State<Api>,
    Extension(p): Extension<Principal>,
) -> Result<Response, HttpError> {
    let req = grpc_request(p, GetDefaultRequest {});
    let res = api.inner.authorization_api.get_default(req).await?;
    Ok(json::reply(res.get_ref()))
}

async fn set_default(
    State(api): State<Api>,
    Extension(p): Extension<Principal>,
    json::Body(body): json::Body,
) -> Result<Response, HttpError> {
    let req: SetDefaultRequest = json::decode(&body)?;
    let res = api
        .inner
        .authorization_api
        .set_default(grpc_request(p, req))
        .await?;
    Ok(json::reply(res.get_ref()))
}

async fn list_tokens(
    State(api): State<Api>,
    Extension(p): Extension<Principal>,
) -> Result<Response, HttpError> {
    let req = grpc_request(p, ListTokensRequest {});
    let res = api.inner.tokens_api.list(req).await?;
    Ok(json::reply(res.get_ref()))
}

async fn create_token(
    State(api): State<Api>,
    Extension(p): Extension<Principal>,
    json::Body(body): json::Body,
) -> Result<Response, HttpError> {
    let req: CreateTokenRequest = json::decode(&body)?;
    let res = api.inner.tokens_api.create(grpc_request(p, req)).await?;
    Ok(json::reply(res.get_ref()))
}

async fn revoke_token(
    State(api): State<Api>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, HttpError> {
    let req = RevokeTokenRequest { id };
    let res = api.inner.tokens_api.revoke(grpc_request(p, req)).await?;
    Ok(json::reply(res.get_ref()))
}
