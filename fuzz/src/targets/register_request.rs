//! `Registry/Register` as the control plane receives it: any bytes a
//! client sends, decoded as a `RegisterRequest`, then the instance checks
//! of `registry::validate` (an operator registration, and the stricter
//! rules of an instance a session registers), with the message that
//! describes every problem.

use isdp_control_plane::registry::validate;
use isdp_proto::v1::RegisterRequest;
use prost::Message;

use super::Target;

pub const TARGET: Target = Target {
    name: "register_request",
    run,
    dictionary: &[
        b"\x0a", b"\x12", b"\x1a", b"\x22", b"\x2a", b"\x30", b"\x38", b"\x40",
    ],
    seeds,
};

pub fn run(data: &[u8]) {
    let Ok(req) = RegisterRequest::decode(data) else {
        return;
    };
    let Some(instance) = req.instance else {
        return;
    };
    if let Err(problems) = validate::instance(&instance, "instance") {
        assert!(!problems.is_empty(), "an error without a problem");
        let _ = validate::describe(&problems);
    }
    let node = instance.id.split('.').next().unwrap_or_default();
    if validate::node_id("node_id", node).is_ok()
        && let Err(problems) = validate::session_instance(&instance, node, "open.instances[0]")
    {
        let _ = validate::describe(&problems);
    }
    let _ = validate::session_instance_id(node, &instance.service);
}

/// Valid registrations of both kinds, for the corpus.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use isdp_proto::v1::{HealthCheck, Instance};
    let operator = Instance {
        id: "payments-1".into(),
        service: "payments".into(),
        address: "10.0.0.7".into(),
        port: 8080,
        weight: 10,
        metadata: [("version".to_string(), "v1".to_string())].into(),
        check: Some(HealthCheck {
            target: "http://10.0.0.7:8080/healthz".into(),
            interval_ms: 1000,
            timeout_ms: 500,
            rise: 2,
            fall: 3,
        }),
        ..Default::default()
    };
    let session = Instance {
        id: "node-1.payments".into(),
        inbound_port: 15006,
        ..operator.clone()
    };
    [("operator", operator), ("session", session)]
        .into_iter()
        .map(|(name, i)| {
            let req = RegisterRequest { instance: Some(i) };
            (name, req.encode_to_vec())
        })
        .collect()
}
