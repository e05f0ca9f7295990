//! Traffic policy documents along the whole way an operator's file goes:
//! `isdpctl policy apply` turns YAML into JSON (`isdp_cli::yaml`), the
//! control plane checks the JSON field by field into a `TrafficPolicy`
//! (`policy::document::parse`, which also gets JSON straight from any API
//! client), and every caller's sidecar compiles what it is sent.

use std::collections::BTreeMap;

use isdp_control_plane::policy::document;
use isdp_sidecar::proxy::policy::Compiled;
use serde_json::Value;

use super::Target;

pub const TARGET: Target = Target {
    name: "policy_document",
    run,
    dictionary: &[
        b"service: ",
        b"timeouts: ",
        b"retries: ",
        b"attempts: ",
        b"retry_on: ",
        b"backoff: ",
        b"budget: ",
        b"circuit_breaker: ",
        b"outlier_detection: ",
        b"load_balancer: ",
        b"algorithm: ",
        b"hash_key: ",
        b"subsets: ",
        b"split: ",
        b"routes: ",
        b"match: ",
        b"headers: ",
        b"prefix: ",
        b"fault: ",
        b"delay: ",
        b"abort: ",
        b"percent: ",
        b"status: ",
        b"weight: ",
        b"labels: ",
        b"name: ",
        b"grpc_codes: ",
        b"buffer_bytes: ",
        b"ring_hash",
        b"maglev",
        b"header:x-user",
        b"cookie:",
        b"source_ip",
        b"18446744073709551615",
        b"4294967295",
        b"4294967296",
        b"1e308",
        b"-0.0",
        b"999999999999h",
        b"1ns",
        b"\n---\n",
        b"&a ",
        b"*a",
        b"!!binary ",
        b"- ",
        b"{ ",
        b" }",
    ],
    seeds: super::no_seeds,
};

pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(docs) = isdp_cli::yaml::documents(text) {
        for doc in &docs {
            check(doc);
        }
    }
    if let Ok(doc) = serde_json::from_str::<Value>(text) {
        check(&doc);
    }
}

/// The control plane's check, then what a sidecar does with the result.
fn check(doc: &Value) {
    let any = |_: &str, _: &BTreeMap<String, String>| true;
    if let Ok(policy) = document::parse(doc, &any) {
        let _ = Compiled::new(&policy, "1");
    }
    let none = |_: &str, _: &BTreeMap<String, String>| false;
    let _ = document::parse(doc, &none);
}
