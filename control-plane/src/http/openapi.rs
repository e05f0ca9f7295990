//! `GET /v1/openapi.json`: the OpenAPI 3.1 description of every route,
//! checked in as `openapi.json` beside this file. The tests hold it to the
//! route table both ways: every route is described, and nothing is
//! described that is not served.

use axum::{http::header, response::IntoResponse, routing::get};

use super::Routes;

/// The document as served.
pub const DOCUMENT: &str = include_str!("openapi.json");

pub fn mount(routes: &mut Routes) {
    routes.add(
        "GET",
        "/v1/openapi.json",
        get(|| async { ([(header::CONTENT_TYPE, "application/json")], DOCUMENT).into_response() }),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{ROUTES, routes::need_name};

    /// (method, path) of every operation the document describes.
    fn operations(doc: &serde_json::Value) -> Vec<(String, String)> {
        let mut ops = Vec::new();
        if let Some(paths) = doc["paths"].as_object() {
            for (path, item) in paths {
                for method in item.as_object().into_iter().flat_map(|m| m.keys()) {
                    if ["get", "put", "post", "delete", "patch", "head", "options"]
                        .contains(&method.as_str())
                    {
                        ops.push((method.to_uppercase(), path.clone()));
                    }
                }
            }
        }
        ops.sort();
        ops
    }

    #[test]
    fn the_document_describes_exactly_the_routes() {
        let doc: serde_json::Value = serde_json::from_str(DOCUMENT).expect("openapi.json parses");
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        let described = operations(&doc);
        let mut served: Vec<(String, String)> = ROUTES
            .iter()
            .map(|r| (r.method.to_owned(), r.path.to_owned()))
            .collect();
        served.sort();
        let undocumented: Vec<_> = served.iter().filter(|r| !described.contains(r)).collect();
        let unserved: Vec<_> = described.iter().filter(|r| !served.contains(r)).collect();
        assert!(
            undocumented.is_empty(),
            "routes missing from openapi.json: {undocumented:?}"
        );
        assert!(
            unserved.is_empty(),
            "openapi.json describes what is not served: {unserved:?}"
        );
        // Every operation says what it needs and what its errors are.
        for (method, path) in &described {
            let op = &doc["paths"][path][method.to_lowercase()];
            assert!(
                op["operationId"].is_string(),
                "{method} {path}: operationId"
            );
            let row = ROUTES
                .iter()
                .find(|r| r.method == method && r.path == path)
                .unwrap();
            assert_eq!(
                op["x-isdp-role"].as_str(),
                Some(need_name(row.need).as_str()),
                "{method} {path}: x-isdp-role"
            );
            assert_eq!(
                op["x-isdp-grpc"].as_str(),
                row.grpc.map(|g| &g[1..]),
                "{method} {path}"
            );
            assert!(op["responses"]["401"].is_object(), "{method} {path}: 401");
        }
    }
}
