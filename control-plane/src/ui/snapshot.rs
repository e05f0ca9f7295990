//! What the dashboard shows, as one JSON document: services and their
//! instances, sidecars' proxy status, traffic policies, authorization
//! rules, recent health transitions and the topology's edges.
//!
//! Messages are written in the protobuf JSON mapping the HTTP API uses
//! (`crate::http::json`), so the page reads the same field names as
//! `/v1/...` clients. The whole document is rebuilt and compared rather
//! than diffed: at a few hundred services it is a few hundred kilobytes,
//! built at most four times a second however many pages are open (shared
//! for `ui::SNAPSHOT_TTL`), and the page renders only what it shows (a
//! page of a list, a filter).

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::{Views, transitions::Transition};
use crate::http::json::value;

/// The document for the views as they are now.
pub fn build(views: &Views, transitions: &[Transition], now_unix_ms: i64) -> Value {
    let mut services: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for stored in views.registry.all() {
        services
            .entry(stored.instance.service.clone())
            .or_default()
            .push(value(&stored.instance));
    }
    // Services with a policy or a rule but no instance still show.
    let policies: Vec<Value> = views
        .policies
        .list()
        .iter()
        .map(|p| {
            let service = p
                .policy
                .as_ref()
                .map(|t| t.service.clone())
                .unwrap_or_default();
            services.entry(service.clone()).or_default();
            json!({
                "service": service,
                "version": p.version.to_string(),
                "document": serde_json::from_str::<Value>(&p.document_json)
                    .unwrap_or(Value::String(p.document_json.clone())),
            })
        })
        .collect();
    let rules: Vec<Value> = views.authz.list(None).iter().map(value).collect();
    // An edge is drawn only to a service the mesh knows (registered, or
    // with a policy): a sidecar's report names its upstreams, which are
    // its own word, while its caller is the session's own service.
    let mut edges = views.traffic.edges(now_unix_ms);
    edges.retain(|e| services.contains_key(&e.callee));
    for e in &edges {
        services.entry(e.caller.clone()).or_default();
    }
    json!({
        "services": services
            .into_iter()
            .map(|(name, mut instances)| {
                instances.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
                json!({"name": name, "instances": instances})
            })
            .collect::<Vec<_>>(),
        "proxies": views.proxies.list().iter().map(value).collect::<Vec<_>>(),
        "policies": policies,
        "authorization": {
            "default": views.authz.default_action().as_str_name(),
            "rules": rules,
        },
        "transitions": transitions.iter().map(|t| json!({
            "atUnixMs": t.at_unix_ms,
            "service": t.service,
            "instance": t.instance,
            "from": t.from.map(|h| h.as_str_name()),
            "to": t.to.map(|h| h.as_str_name()),
        })).collect::<Vec<_>>(),
        "edges": edges.iter().map(|e| json!({
            "caller": e.caller,
            "callee": e.callee,
            "rps": e.rps,
            "errorRate": e.error_rate,
            "p99Ms": e.p99_ms,
        })).collect::<Vec<_>>(),
    })
}
