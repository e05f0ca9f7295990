//! `GET /v1/prometheus/targets`: the registry in Prometheus' HTTP service
//! discovery format, for `http_sd_configs` (which every Prometheus build
//! has, where `consul_sd_configs` may be compiled out, as in Debian's).
//!
//! One target group per instance, `{"targets": ["<address>:<port>"],
//! "labels": {...}}` (the instance's own port, as Consul's `ServicePort`;
//! an IPv6 address in brackets), with the labels
//! `__meta_isdp_service`, `__meta_isdp_instance_id`, `__meta_isdp_node`
//! (as the Consul endpoints' `Node`), `__meta_isdp_health` (`passing` or
//! `critical`, as their check `Status`), `__meta_isdp_zone` (the
//! instance's zone, else its `zone` metadata, empty without either) and `__meta_isdp_metadata_<key>` per
//! metadata entry. Metadata keys may hold `.`, `-` and `/`, which label
//! names may not: each becomes `_`, as Prometheus' own service discoveries
//! sanitize, and of keys that become the same name the first in byte
//! order wins.
//!
//! `?service=S` (repeatable) keeps those services, `?passing` the passing
//! instances; any other parameter is refused. A join principal reads
//! within its xDS scope (`catalog`): the whole list holds only what it may
//! read, and naming a service it may not read is 403.

use std::collections::BTreeMap;

use axum::{
    Extension, Json,
    extract::{Query, State, rejection::QueryRejection},
    response::{IntoResponse, Response},
    routing::get,
};
use isdp_proto::v1::Instance;
use serde_json::{Value, json};

use super::{
    Api, HttpError, Routes,
    catalog::{self, health_name, node, passing},
};
use crate::auth::Principal;

const PATH: &str = "/v1/prometheus/targets";
/// Every label this endpoint sets starts with it; Prometheus drops
/// `__meta_` labels after relabelling.
const PREFIX: &str = "__meta_isdp_";

pub fn mount(routes: &mut Routes, api: &Api) {
    routes.add("GET", PATH, get(targets).with_state(api.clone()));
}

/// What the query asks for.
#[derive(Debug, Default, PartialEq)]
struct Params {
    /// Empty: every service the caller may read.
    services: Vec<String>,
    passing: bool,
}

fn params(pairs: Vec<(String, String)>) -> Result<Params, HttpError> {
    let mut p = Params::default();
    for (k, v) in pairs {
        match k.as_str() {
            "service" => p.services.push(v),
            // A bare `?passing` has an empty value.
            "passing" => p.passing = !matches!(v.as_str(), "false" | "0"),
            _ => {
                return Err(HttpError::invalid(format!(
                    "{}: unknown parameter ({PATH} takes service and passing)",
                    k.chars().take(64).collect::<String>()
                )));
            }
        }
    }
    p.services.sort();
    p.services.dedup();
    Ok(p)
}

async fn targets(
    State(api): State<Api>,
    Extension(p): Extension<Principal>,
    pairs: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, HttpError> {
    let Query(pairs) = pairs.map_err(|e| HttpError::invalid(e.body_text()))?;
    let q = params(pairs)?;
    let services = if q.services.is_empty() {
        catalog::services(&api, &p).await?
    } else {
        q.services
    };
    let mut groups = Vec::new();
    for service in &services {
        let mut list = catalog::instances(&api, &p, "Prometheus targets", service).await?;
        list.sort_by(|a, b| a.id.cmp(&b.id));
        groups.extend(list.iter().filter(|i| !q.passing || passing(i)).map(group));
    }
    Ok(Json(Value::Array(groups)).into_response())
}

/// One instance's target group.
fn group(i: &Instance) -> Value {
    let mut labels = BTreeMap::new();
    let mut set = |name: String, value: &str| {
        labels.entry(name).or_insert_with(|| value.to_owned());
    };
    set(format!("{PREFIX}service"), &i.service);
    set(format!("{PREFIX}instance_id"), &i.id);
    set(format!("{PREFIX}node"), node(i));
    set(format!("{PREFIX}health"), health_name(i));
    set(
        format!("{PREFIX}zone"),
        // The instance's zone, else the older `zone` label.
        if i.zone.is_empty() {
            i.metadata.get("zone").map_or("", String::as_str)
        } else {
            i.zone.as_str()
        },
    );
    let mut metadata: Vec<_> = i.metadata.iter().collect();
    metadata.sort();
    for (k, v) in metadata {
        set(format!("{PREFIX}metadata_{}", label_name(k)), v);
    }
    json!({ "targets": [target(i)], "labels": labels })
}

/// `address:port`, an IPv6 address in brackets.
fn target(i: &Instance) -> String {
    match i.address.parse::<std::net::IpAddr>() {
        Ok(ip) => std::net::SocketAddr::new(ip, i.port as u16).to_string(),
        // The registry stores IP addresses only; shown as given otherwise.
        Err(_) => format!("{}:{}", i.address, i.port),
    }
}

/// `key` as a label name's tail: Prometheus allows `[a-zA-Z0-9_]` (the
/// prefix supplies the leading letter), so anything else becomes `_`.
fn label_name(key: &str) -> String {
    key.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

#[cfg(test)]
mod tests {
    use isdp_proto::v1::HealthStatus;

    use super::*;

    fn pairs(q: &[(&str, &str)]) -> Vec<(String, String)> {
        q.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_group_carries_the_instance_and_sanitized_metadata_labels() {
        let i = Instance {
            id: "web-1".into(),
            service: "web".into(),
            address: "::1".into(),
            port: 9100,
            node_id: "node-a".into(),
            status: HealthStatus::Unhealthy as i32,
            metadata: [
                ("zone", "z1"),
                ("app.kubernetes.io/name", "web"),
                ("a-b", "first"),
                ("a.b", "second"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
            ..Default::default()
        };
        let g = group(&i);
        assert_eq!(g["targets"], json!(["[::1]:9100"]));
        assert_eq!(
            g["labels"],
            json!({
                "__meta_isdp_service": "web",
                "__meta_isdp_instance_id": "web-1",
                "__meta_isdp_node": "node-a",
                "__meta_isdp_health": "critical",
                "__meta_isdp_zone": "z1",
                "__meta_isdp_metadata_zone": "z1",
                "__meta_isdp_metadata_app_kubernetes_io_name": "web",
                // "a-b" < "a.b" in byte order: the first wins.
                "__meta_isdp_metadata_a_b": "first",
            })
        );
        let operator = Instance {
            address: "10.0.0.7".into(),
            port: 80,
            ..Default::default()
        };
        let g = group(&operator);
        assert_eq!(g["targets"], json!(["10.0.0.7:80"]));
        assert_eq!(g["labels"]["__meta_isdp_node"], "isdp");
        assert_eq!(g["labels"]["__meta_isdp_health"], "passing");
        assert_eq!(g["labels"]["__meta_isdp_zone"], "");
        let zoned = Instance {
            zone: "za".into(),
            ..operator
        };
        assert_eq!(group(&zoned)["labels"]["__meta_isdp_zone"], "za");
    }

    #[test]
    fn parameters_filter_and_unknown_ones_are_refused() {
        let p = params(pairs(&[
            ("service", "b"),
            ("service", "a"),
            ("service", "b"),
        ]))
        .unwrap();
        assert_eq!(p.services, ["a", "b"]);
        assert!(!p.passing);
        assert!(params(pairs(&[("passing", "")])).unwrap().passing);
        assert!(!params(pairs(&[("passing", "false")])).unwrap().passing);
        let e = params(pairs(&[("tag", "x")])).unwrap_err();
        assert!(e.to_string().contains("tag: unknown parameter"), "{e}");
    }
}
