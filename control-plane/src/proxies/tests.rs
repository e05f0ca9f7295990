use std::{collections::BTreeMap, sync::Arc, time::Instant};

use super::*;

const EPS: &str = "type.googleapis.com/isdp.v1.ServiceEndpoints";
const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";

fn info(id: u64, node: &str, delta: bool) -> StreamInfo {
    StreamInfo {
        id,
        opened: Instant::now(),
        node_id: node.to_owned(),
        delta,
        peer: None,
        caller: format!("token-{id}"),
        user_agent_name: String::new(),
        user_agent_version: String::new(),
        cluster: String::new(),
        zone: String::new(),
    }
}

fn agent(id: u64, node: &str, delta: bool, user_agent: &str) -> StreamInfo {
    StreamInfo {
        user_agent_name: user_agent.to_owned(),
        ..info(id, node, delta)
    }
}

fn names(n: &[&str]) -> Vec<Arc<str>> {
    n.iter().map(|n| Arc::from(*n)).collect()
}

fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

fn subscribed(t: &str, wildcard: bool, added: &[Arc<str>], removed: &[&str]) -> StreamEvent {
    StreamEvent::Subscribed {
        type_url: t.into(),
        wildcard,
        added: added.to_vec(),
        removed: names(removed),
    }
}

fn response(t: &str) -> StreamEvent {
    StreamEvent::Response {
        type_url: t.into(),
        nonce: "n".into(),
        bytes: Default::default(),
        resources: 1,
    }
}

fn ack(t: &str, versions: &[(&str, &str)], absent: &[&str]) -> StreamEvent {
    StreamEvent::Ack {
        type_url: t.into(),
        nonce: "n".into(),
        versions: pairs(versions),
        changed_at: None,
        absent: names(absent),
    }
}

fn nack(t: &str, versions: &[(&str, &str)], message: &str) -> StreamEvent {
    StreamEvent::Nack {
        type_url: t.into(),
        nonce: "n".into(),
        message: message.into(),
        versions: pairs(versions),
    }
}

/// (name, state, version, the rejected version) of every resource of the
/// one stream of `p`, type `t`.
fn states(p: &Proxies, t: &str) -> Vec<(String, ResourceState, String, Option<String>)> {
    let clients = p.client_status(|_| true);
    let types = &clients[0].types;
    let of = types
        .iter()
        .find(|x| &*x.type_url == t)
        .unwrap_or_else(|| panic!("no {t}: {types:?}"));
    of.resources
        .iter()
        .map(|r| {
            (
                r.name.to_string(),
                r.state,
                r.version.clone(),
                r.rejection.as_ref().map(|x| x.version.clone()),
            )
        })
        .collect()
}

fn row(
    name: &str,
    state: ResourceState,
    version: &str,
    rejected: Option<&str>,
) -> (String, ResourceState, String, Option<String>) {
    (
        name.into(),
        state,
        version.into(),
        rejected.map(str::to_owned),
    )
}

use ResourceState::{Acked, DoesNotExist, Nacked, Requested};

#[test]
fn follows_acks_nacks_and_removals() {
    let p = Proxies::default();
    let t: Arc<str> = Arc::from(EPS);
    let web = info(1, "web", true);
    p.opened(&web);
    p.opened(&info(2, "api", false));
    p.event(&web, &response(&t));
    assert!(p.list()[1].types[0].pending);
    p.event(&web, &ack(&t, &[("a", "v1"), ("b", "v1")], &[]));
    p.event(&web, &ack(&t, &[("a", "v2"), ("b", "")], &[]));
    p.event(&web, &nack(&t, &[("a", "v3")], "bad endpoint"));
    let list = p.list();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].node_id, "api");
    assert_eq!(list[0].principal, "token-2", "who opened each stream");
    assert_eq!(list[1].principal, "token-1");
    let w = &list[1].types[0];
    assert_eq!(w.acked, BTreeMap::from([("a".to_owned(), "v2".to_owned())]));
    assert_eq!((w.acks, w.nacks, w.pending), (2, 1, false));
    assert_eq!(w.last_nack, "bad endpoint");
    assert!(w.last_ack_unix_ms > 0);
    p.closed(&web);
    assert_eq!(p.list().len(), 1);
}

/// The kind is derived once from the node's user agent, and the node's
/// other fields are listed as the engine passed them on.
#[test]
fn kinds_come_from_the_user_agent() {
    for (agent, kind) in [
        ("isdp-sidecar", ClientKind::IsdpSidecar),
        ("gRPC Python", ClientKind::Grpc),
        ("gRPC C-core", ClientKind::Grpc),
        ("gRPC Go", ClientKind::Grpc),
        ("gRPC Node Pure JS", ClientKind::Grpc),
        ("envoy", ClientKind::Envoy),
        ("", ClientKind::Other),
        ("grpc-python", ClientKind::Other),
        ("Envoy", ClientKind::Other),
        ("isdp-sidecar2", ClientKind::Other),
        ("curl", ClientKind::Other),
    ] {
        assert_eq!(client_kind(agent), kind, "{agent:?}");
    }
    let p = Proxies::default();
    p.opened(&StreamInfo {
        user_agent_version: "1.85.0".into(),
        cluster: "web".into(),
        zone: "eu-1a".into(),
        ..agent(1, "py-1", false, "gRPC Python")
    });
    p.opened(&agent(2, "envoy-1", false, "envoy"));
    p.opened(&agent(3, "web-1", true, "isdp-sidecar"));
    let list = p.list();
    let kinds: Vec<(&str, ClientKind)> = list
        .iter()
        .map(|x| (x.node_id.as_str(), x.kind()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("envoy-1", ClientKind::Envoy),
            ("py-1", ClientKind::Grpc),
            ("web-1", ClientKind::IsdpSidecar)
        ]
    );
    let py = &list[1];
    assert_eq!(
        (
            py.user_agent_name.as_str(),
            py.user_agent_version.as_str(),
            py.cluster.as_str(),
            py.zone.as_str()
        ),
        ("gRPC Python", "1.85.0", "web", "eu-1a")
    );
}

/// State of the world: one ACK covers every name subscribed before it;
/// the names it lacked do not exist for the client; a NACK marks them all
/// with the version it rejected, the accepted set still held; a name
/// subscribed since is requested until an answer covers it.
#[test]
fn sotw_resources_follow_the_set() {
    let p = Proxies::default();
    let s = info(1, "py-1", false);
    p.opened(&s);
    p.event(&s, &subscribed(LDS, false, &names(&["a", "b"]), &[]));
    assert_eq!(
        states(&p, LDS),
        [row("a", Requested, "", None), row("b", Requested, "", None)]
    );
    p.event(&s, &response(LDS));
    p.event(&s, &ack(LDS, &[("", "v1")], &["b"]));
    assert_eq!(
        states(&p, LDS),
        [
            row("a", Acked, "v1", None),
            row("b", DoesNotExist, "v1", None)
        ]
    );
    // c joins (in the request that acknowledged v1); v2 carries it and
    // is rejected; d joins after the NACK.
    p.event(&s, &subscribed(LDS, false, &names(&["c"]), &[]));
    assert_eq!(states(&p, LDS)[2], row("c", Requested, "", None));
    p.event(&s, &response(LDS));
    p.event(&s, &nack(LDS, &[("", "v2")], "no api_listener"));
    p.event(&s, &subscribed(LDS, false, &names(&["d"]), &[]));
    assert_eq!(
        states(&p, LDS),
        [
            row("a", Nacked, "v1", Some("v2")),
            row("b", Nacked, "", Some("v2")),
            row("c", Nacked, "", Some("v2")),
            row("d", Requested, "", None),
        ]
    );
    let clients = p.client_status(|_| true);
    let a = &clients[0].types[0].resources[0];
    let rejection = a.rejection.as_ref().expect("rejected");
    assert_eq!(&*rejection.message, "no api_listener");
    assert!(a.acked_at.is_some(), "v1's ACK");
    // The next ACK clears the NACK; dropped names leave.
    p.event(&s, &response(LDS));
    p.event(&s, &ack(LDS, &[("", "v3")], &[]));
    p.event(&s, &subscribed(LDS, false, &[], &["b", "c"]));
    assert_eq!(
        states(&p, LDS),
        [row("a", Acked, "v3", None), row("d", Acked, "v3", None)]
    );
    // A wildcard is one entry for the set.
    p.event(&s, &subscribed(LDS, true, &[], &["a", "d"]));
    assert_eq!(states(&p, LDS), [row("*", Requested, "", None)]);
    p.event(&s, &ack(LDS, &[("", "v4")], &[]));
    assert_eq!(states(&p, LDS), [row("*", Acked, "v4", None)]);
    assert_eq!(
        p.list()[0].types[0].acked,
        BTreeMap::from([(String::new(), "v4".to_owned())])
    );
    // A client resuming with the current set holds it without an ACK.
    let again = info(2, "py-2", false);
    p.opened(&again);
    p.event(&again, &subscribed(EPS, false, &names(&["x", "y"]), &[]));
    p.event(
        &again,
        &StreamEvent::Resumed {
            type_url: EPS.into(),
            versions: pairs(&[("", "v9")]),
            absent: names(&["y"]),
        },
    );
    let clients = p.client_status(|n| n == "py-2");
    let resumed: Vec<_> = clients[0].types[0]
        .resources
        .iter()
        .map(|r| (r.name.to_string(), r.state, r.acked_at))
        .collect();
    assert_eq!(
        resumed,
        [
            ("x".to_owned(), Acked, None),
            ("y".to_owned(), DoesNotExist, None)
        ]
    );
}

/// Delta: each name on its own; a NACK marks only what the rejected
/// response carried; what a wildcard brought is listed by name.
#[test]
fn delta_resources_follow_each_name() {
    let p = Proxies::default();
    let s = info(1, "web-1", true);
    p.opened(&s);
    p.event(&s, &subscribed(EPS, false, &names(&["a", "b", "c"]), &[]));
    p.event(
        &s,
        &StreamEvent::Resumed {
            type_url: EPS.into(),
            versions: pairs(&[("a", "v0")]),
            absent: vec![],
        },
    );
    p.event(&s, &response(EPS));
    p.event(&s, &ack(EPS, &[("b", "")], &[]));
    assert_eq!(
        states(&p, EPS),
        [
            row("a", Acked, "v0", None),
            row("b", DoesNotExist, "", None),
            row("c", Requested, "", None),
        ]
    );
    p.event(&s, &response(EPS));
    assert!(p.client_status(|_| true)[0].types[0].pending);
    p.event(&s, &nack(EPS, &[("a", "v1"), ("c", "c1")], "bad"));
    assert_eq!(
        states(&p, EPS),
        [
            row("a", Nacked, "v0", Some("v1")),
            row("b", DoesNotExist, "", None),
            row("c", Nacked, "", Some("c1")),
        ]
    );
    p.event(&s, &ack(EPS, &[("a", "v2")], &[]));
    assert_eq!(states(&p, EPS)[0], row("a", Acked, "v2", None));
    assert_eq!(states(&p, EPS)[2], row("c", Nacked, "", Some("c1")));
    // Unsubscribing forgets; a wildcard lists what it brought.
    p.event(&s, &subscribed(EPS, true, &[], &["a", "c"]));
    assert_eq!(
        states(&p, EPS),
        [
            row("*", Requested, "", None),
            row("b", DoesNotExist, "", None)
        ]
    );
    p.event(&s, &ack(EPS, &[("x", "x1"), ("y", "y1")], &[]));
    p.event(&s, &ack(EPS, &[("y", "")], &[]));
    assert_eq!(
        states(&p, EPS),
        [
            row("b", DoesNotExist, "", None),
            row("x", Acked, "x1", None)
        ]
    );
    assert_eq!(
        p.list()[0].types[0].acked,
        BTreeMap::from([("x".to_owned(), "x1".to_owned())]),
        "proxy-status lists versions held"
    );
    p.event(&s, &subscribed(EPS, false, &[], &[]));
    assert_eq!(states(&p, EPS), [row("b", DoesNotExist, "", None)]);
}

/// Names are the engine's copies: recording a subscription, and the ACK
/// of a name subscribed to, holds the engine's `Arc`, not a new string.
#[test]
fn names_are_the_engines_copies() {
    let p = Proxies::default();
    let s = info(1, "web-1", true);
    p.opened(&s);
    let a: Arc<str> = Arc::from("payments");
    p.event(&s, &subscribed(EPS, false, std::slice::from_ref(&a), &[]));
    assert_eq!(Arc::strong_count(&a), 2);
    p.event(&s, &ack(EPS, &[("payments", "v1")], &[]));
    assert_eq!(Arc::strong_count(&a), 3, "the ACK's name is the same copy");
    let clients = p.client_status(|_| true);
    assert!(Arc::ptr_eq(&clients[0].types[0].resources[0].name, &a));
    drop(clients);
    p.closed(&s);
    assert_eq!(Arc::strong_count(&a), 1, "a closed stream holds nothing");
}

#[test]
fn client_status_filters_by_node_id_and_sorts() {
    let p = Proxies::default();
    for (id, node) in [(1, "web-2"), (2, "api-1"), (3, "web-1")] {
        p.opened(&StreamInfo {
            cluster: format!("c{id}"),
            ..agent(id, node, false, "gRPC Go")
        });
    }
    let all: Vec<String> = p
        .client_status(|_| true)
        .into_iter()
        .map(|c| c.node_id)
        .collect();
    assert_eq!(all, ["api-1", "web-1", "web-2"]);
    let web: Vec<(String, String)> = p
        .client_status(|n| n.starts_with("web"))
        .into_iter()
        .map(|c| (c.node_id, c.cluster))
        .collect();
    assert_eq!(
        web,
        [
            ("web-1".to_owned(), "c3".to_owned()),
            ("web-2".to_owned(), "c1".to_owned())
        ]
    );
}
