use std::{sync::Arc, time::Instant};

use envoy_types::pb::envoy::r#type::matcher::v3::{
    RegexMatcher, StringMatcher, StructMatcher, string_matcher::MatchPattern,
};
use isdp_xds::{StreamEvent, StreamInfo, StreamObserver as _};

use super::*;

const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";

fn by_id(pattern: MatchPattern, ignore_case: bool) -> NodeMatcher {
    NodeMatcher {
        node_id: Some(StringMatcher {
            match_pattern: Some(pattern),
            ignore_case,
        }),
        node_metadatas: vec![],
    }
}

fn request(matchers: Vec<NodeMatcher>) -> ClientStatusRequest {
    ClientStatusRequest {
        node_matchers: matchers,
        ..Default::default()
    }
}

fn stream(id: u64, node: &str, agent: &str) -> StreamInfo {
    StreamInfo {
        id,
        opened: Instant::now(),
        node_id: node.into(),
        delta: false,
        peer: None,
        caller: String::new(),
        user_agent_name: agent.into(),
        user_agent_version: "1.85.0".into(),
        cluster: "web".into(),
        zone: "eu-1a".into(),
    }
}

/// A gRPC client that acknowledged `a` (and learned `b` does not exist),
/// then rejected the next set; an Envoy that has asked and heard nothing.
fn proxies() -> Proxies {
    let p = Proxies::default();
    let py = stream(1, "py-1", "gRPC Python");
    p.opened(&py);
    let sub = |names: &[&str]| StreamEvent::Subscribed {
        type_url: LDS.into(),
        wildcard: false,
        added: names.iter().map(|n| Arc::from(*n)).collect(),
        removed: vec![],
    };
    p.event(&py, &sub(&["a", "b"]));
    p.event(
        &py,
        &StreamEvent::Ack {
            type_url: LDS.into(),
            nonce: "1".into(),
            versions: vec![(String::new(), "v1".into())],
            changed_at: None,
            absent: vec![Arc::from("b")],
        },
    );
    let envoy = stream(2, "envoy-1", "envoy");
    p.opened(&envoy);
    p.event(&envoy, &sub(&["a"]));
    p
}

fn ids(resp: &ClientStatusResponse) -> Vec<&str> {
    resp.config
        .iter()
        .map(|c| c.node.as_ref().map_or("", |n| n.id.as_str()))
        .collect()
}

/// (name, client status, config status, version) of a client's resources.
fn rows(c: &ClientConfig) -> Vec<(&str, ClientResourceStatus, ConfigStatus, &str)> {
    c.generic_xds_configs
        .iter()
        .map(|g| {
            (
                g.name.as_str(),
                g.client_status(),
                g.config_status(),
                g.version_info.as_str(),
            )
        })
        .collect()
}

#[test]
fn every_stream_with_its_node_and_resources() {
    let p = proxies();
    let resp = answer(&p, &request(vec![])).unwrap();
    assert_eq!(ids(&resp), ["envoy-1", "py-1"]);
    let py = &resp.config[1];
    let node = py.node.as_ref().unwrap();
    assert_eq!(
        (
            node.user_agent_name.as_str(),
            node.user_agent_version_type.clone(),
            node.cluster.as_str(),
            node.locality.as_ref().map(|l| l.zone.as_str())
        ),
        (
            "gRPC Python",
            Some(UserAgentVersionType::UserAgentVersion("1.85.0".into())),
            "web",
            Some("eu-1a")
        )
    );
    assert_eq!(
        rows(py),
        [
            ("a", ClientResourceStatus::Acked, ConfigStatus::Synced, "v1"),
            (
                "b",
                ClientResourceStatus::DoesNotExist,
                ConfigStatus::Synced,
                "v1"
            ),
        ]
    );
    assert!(py.generic_xds_configs.iter().all(|g| g.type_url == LDS));
    assert!(py.generic_xds_configs[0].last_updated.is_some());
    assert_eq!(
        rows(&resp.config[0]),
        [(
            "a",
            ClientResourceStatus::Requested,
            ConfigStatus::NotSent,
            ""
        )]
    );
}

#[test]
fn a_nack_is_an_error_with_its_text_and_a_pending_response_stale() {
    let p = proxies();
    let py = stream(1, "py-1", "gRPC Python");
    p.event(
        &py,
        &StreamEvent::Nack {
            type_url: LDS.into(),
            nonce: "2".into(),
            message: "no api_listener".into(),
            versions: vec![(String::new(), "v2".into())],
        },
    );
    let envoy = stream(2, "envoy-1", "envoy");
    p.event(
        &envoy,
        &StreamEvent::Response {
            type_url: LDS.into(),
            nonce: "1".into(),
            bytes: Default::default(),
            resources: 1,
        },
    );
    let resp = answer(&p, &request(vec![])).unwrap();
    let a = &resp.config[1].generic_xds_configs[0];
    assert_eq!(
        (
            a.client_status(),
            a.config_status(),
            a.version_info.as_str()
        ),
        (ClientResourceStatus::Nacked, ConfigStatus::Error, "v1")
    );
    let error = a.error_state.as_ref().expect("error_state");
    assert_eq!(
        (error.details.as_str(), error.version_info.as_str()),
        ("no api_listener", "v2")
    );
    assert!(error.last_update_attempt.is_some());
    assert_eq!(
        rows(&resp.config[0]),
        [(
            "a",
            ClientResourceStatus::Requested,
            ConfigStatus::Stale,
            ""
        )]
    );
}

#[test]
fn node_matchers_select_by_exact_id_or_prefix() {
    let p = proxies();
    let exact = |id: &str, ic| by_id(MatchPattern::Exact(id.into()), ic);
    let prefix = |id: &str, ic| by_id(MatchPattern::Prefix(id.into()), ic);
    for (matchers, want) in [
        (vec![exact("py-1", false)], vec!["py-1"]),
        (vec![exact("PY-1", false)], vec![]),
        (vec![exact("PY-1", true)], vec!["py-1"]),
        (vec![exact("py", false)], vec![]),
        (vec![prefix("env", false)], vec!["envoy-1"]),
        (vec![prefix("ENV", true)], vec!["envoy-1"]),
        (vec![prefix("envoy-1-and-more", false)], vec![]),
        (
            vec![prefix("env", false), exact("py-1", false)],
            vec!["envoy-1", "py-1"],
        ),
        (vec![NodeMatcher::default()], vec!["envoy-1", "py-1"]),
    ] {
        let resp = answer(&p, &request(matchers.clone())).unwrap();
        assert_eq!(ids(&resp), want, "{matchers:?}");
    }
    // Byte-wise, so a prefix ending inside a character matches nothing.
    assert!(
        !IdMatcher::Prefix {
            prefix: "é".into(),
            ignore_case: true
        }
        .matches("e")
    );
}

/// Every matcher the server cannot apply is refused, naming its field.
#[test]
fn other_matchers_are_refused_by_field() {
    let p = proxies();
    let metadata = NodeMatcher {
        node_id: None,
        node_metadatas: vec![StructMatcher::default()],
    };
    let no_pattern = NodeMatcher {
        node_id: Some(StringMatcher::default()),
        node_metadatas: vec![],
    };
    let ok = by_id(MatchPattern::Exact("py-1".into()), false);
    for (m, field) in [
        (metadata, "node_matchers[1].node_metadatas:"),
        (no_pattern, "node_matchers[1].node_id: no pattern"),
        (
            by_id(MatchPattern::Suffix("-1".into()), false),
            "node_matchers[1].node_id.suffix: not supported",
        ),
        (
            by_id(MatchPattern::SafeRegex(RegexMatcher::default()), false),
            "node_matchers[1].node_id.safe_regex: not supported",
        ),
        (
            by_id(MatchPattern::Contains("y".into()), false),
            "node_matchers[1].node_id.contains: not supported",
        ),
        (
            by_id(MatchPattern::Custom(Default::default()), false),
            "node_matchers[1].node_id.custom: not supported",
        ),
        (
            by_id(MatchPattern::Prefix(String::new()), false),
            "node_matchers[1].node_id.prefix: empty",
        ),
    ] {
        let e = answer(&p, &request(vec![ok.clone(), m])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{field}");
        assert!(e.message().starts_with(field), "{field}: {e}");
    }
}
