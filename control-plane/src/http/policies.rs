//! Traffic policies over HTTP, calling `isdp.v1.Policies`:
//! - `PUT /v1/policies/{service}`: the body is the policy document (the
//!   JSON `isdpctl policy apply` sends); its `service` is the path's when
//!   absent, and must equal it when present. `?version=N` stores only if
//!   the stored version is still `N` (409 otherwise; `0`: only if there is
//!   none); `?dryRun=true` validates and answers without storing.
//! - `GET /v1/policies`, `GET /v1/policies/{service}`: join principals
//!   read within their scope, as on gRPC.
//! - `DELETE /v1/policies/{service}` (`?version=N` likewise).

use axum::{
    Extension,
    extract::{Path, Query, State},
    response::Response,
    routing::{delete, get, put},
};
use isdp_proto::v1::{
    DeletePolicyRequest, GetPolicyRequest, ListPoliciesRequest, PutPolicyRequest,
    policies_server::Policies as _,
};
use serde::Deserialize;

use super::{Api, HttpError, Routes, grpc_request, json};
use crate::auth::Principal;

pub fn mount(routes: &mut Routes, api: &Api) {
    let s = api.clone();
    routes.add("GET", "/v1/policies", get(list).with_state(s.clone()));
    routes.add(
        "GET",
        "/v1/policies/{service}",
        get(get_one).with_state(s.clone()),
    );
    routes.add(
        "PUT",
        "/v1/policies/{service}",
        put(put_one).with_state(s.clone()),
    );
    routes.add(
        "DELETE",
        "/v1/policies/{service}",
        delete(delete_one).with_state(s),
    );
}

/// `?version=` and `?dryRun=`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Write {
    version: Option<u64>,
    #[serde(default)]
    dry_run: bool,
}

fn query<T>(q: Result<Query<T>, axum::extract::rejection::QueryRejection>) -> Result<T, HttpError> {
    q.map(|Query(q)| q)
        .map_err(|e| HttpError::invalid(e.body_text()))
}

async fn list(
    State(api): State<Api>,
    Extension(p): Extension<Principal>,
) -> Result<Response, HttpError> {
    let req = grpc_request(p, ListPoliciesRequest {});
    let res = api.inner.policies_api.list(req).await?;
    Ok(json::reply(res.get_ref()))
}

async fn get_one(
    State(api): State<Api>,
    Extension(p): Extension<Principal>,
    Path(service): Path<String>,
) -> Result<Response, HttpError> {
    let req = grpc_request(p, GetPolicyRequest { service });
    let res = api.inner.policies_api.get(req).await?;
    Ok(json::reply(res.get_ref()))
}

async fn put_one(
    State(api): State<Api>,
    Extension(p): Extension<Principal>,
    Path(service): Path<String>,
    q: Result<Query<Write>, axum::extract::rejection::QueryRejection>,
    json::Body(body): json::Body,
) -> Result<Response, HttpError> {
    let w = query(q)?;
    let document_json = with_service(&body, &service)?;
    let req = PutPolicyRequest {
        document_json,
        expected_version: w.version,
        dry_run: w.dry_run,
    };
    let res = api.inner.policies_api.put(grpc_request(p, req)).await?;
    Ok(json::reply(res.get_ref()))
}

/// The document with the path's service: filled in when absent, refused
/// when it names another. A body that is not a JSON object goes to the
/// policy validator as it is, which says what is wrong with it.
fn with_service(body: &[u8], service: &str) -> Result<String, HttpError> {
    let text = String::from_utf8_lossy(body).into_owned();
    let Ok(serde_json::Value::Object(mut doc)) = serde_json::from_str(&text) else {
        return Ok(text);
    };
    match doc.get("service") {
        None => {
            doc.insert("service".into(), service.into());
            Ok(serde_json::Value::Object(doc).to_string())
        }
        Some(serde_json::Value::String(s)) if s == service => Ok(text),
        Some(other) => Err(HttpError::invalid(format!(
            "service: the document names {other}, the path {service:?}; they must agree"
        ))),
    }
}

async fn delete_one(
    State(api): State<Api>,
    Extension(p): Extension<Principal>,
    Path(service): Path<String>,
    q: Result<Query<Write>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, HttpError> {
    let w = query(q)?;
    if w.dry_run {
        return Err(HttpError::invalid("dryRun: only PUT takes it"));
    }
    let req = DeletePolicyRequest {
        service,
        expected_version: w.version,
    };
    let res = api.inner.policies_api.delete(grpc_request(p, req)).await?;
    Ok(json::reply(res.get_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_names_the_service() {
        let filled = with_service(br#"{"timeouts": {}}"#, "web").unwrap();
        assert!(filled.contains(r#""service":"web""#), "{filled}");
        let same = br#"{"service": "web"}"#;
        assert_eq!(with_service(same, "web").unwrap(), r#"{"service": "web"}"#);
        let e = with_service(br#"{"service": "api"}"#, "web").unwrap_err();
        assert!(e.message.starts_with("service:"), "{}", e.message);
        assert_eq!(with_service(b"[1]", "web").unwrap(), "[1]");
    }
}
