//! The protocol state machines, driven directly (no network).

use std::collections::HashMap;

use bytes::Bytes;
use envoy_types::pb::{
    envoy::service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    },
    google::rpc::Status as RpcStatus,
};
use prost::Message;

use crate::{
    Unrestricted,
    access::tests::Only,
    cache::{Batch, Cache},
    delta::DeltaStream,
    event::StreamEvent,
    sotw::SotwStream,
};

mod budget;
mod events;
mod limits;

const T: &str = "type.googleapis.com/test.Thing";

fn cache() -> Cache {
    let c = Cache::new(&[T]);
    c.set_raw(T, "a", Bytes::from_static(b"a1"));
    c.set_raw(T, "c", Bytes::from_static(b"c1"));
    c
}

fn delta_responses(out: &mut Vec<StreamEvent>) -> Vec<DeltaDiscoveryResponse> {
    out.drain(..)
        .filter_map(|e| match e {
            StreamEvent::Response { bytes, .. } => {
                Some(DeltaDiscoveryResponse::decode(bytes).unwrap())
            }
            _ => None,
        })
        .collect()
}

fn sub(names: &[&str]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: T.into(),
        resource_names_subscribe: names.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn ack(nonce: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: T.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

#[test]
fn delta_subscribe_ack_nack_and_unsubscribe() {
    let c = cache();
    let mut s = DeltaStream::new(c.clone(), Box::new(Unrestricted));
    let mut out = Vec::new();
    s.on_request(sub(&["a", "b"]), &mut out).unwrap();
    let r = delta_responses(&mut out);
    assert_eq!(r.len(), 1);
    assert_eq!(
        r[0].resources
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>(),
        ["a"]
    );
    assert_eq!(
        r[0].removed_resources,
        ["b"],
        "a missing name is reported once"
    );
    let nonce1 = r[0].nonce.clone();

    // While the response is unacknowledged, changes wait and coalesce.
    c.set_raw(T, "a", Bytes::from_static(b"a2"));
    c.set_raw(T, "b", Bytes::from_static(b"b1"));
    c.set_raw(T, "c", Bytes::from_static(b"c2")); // not subscribed: never sent
    s.on_wake(&mut out);
    assert!(delta_responses(&mut out).is_empty());
    s.on_request(ack(&nonce1), &mut out).unwrap();
    assert!(matches!(&out[0], StreamEvent::Ack { versions, .. } if versions.len() == 2));
    let r = delta_responses(&mut out);
    let mut names: Vec<_> = r[0].resources.iter().map(|r| r.name.clone()).collect();
    names.sort();
    assert_eq!(names, ["a", "b"]);

    // A NACK is reported and the rejected version is not resent.
    let mut nack = ack(&r[0].nonce);
    nack.error_detail = Some(RpcStatus {
        code: 3,
        message: "bad".into(),
        ..Default::default()
    });
    s.on_request(nack, &mut out).unwrap();
    assert!(matches!(&out[0], StreamEvent::Nack { message, .. } if message == "bad"));
    assert!(delta_responses(&mut out).is_empty());
    s.on_wake(&mut out);
    assert!(delta_responses(&mut out).is_empty());

    // Unsubscribed names stop waking the stream; deletions are announced.
    s.on_request(
        DeltaDiscoveryRequest {
            resource_names_unsubscribe: vec!["a".into()],
            ..sub(&[])
        },
        &mut out,
    )
    .unwrap();
    c.set_raw(T, "a", Bytes::from_static(b"a3"));
    c.remove_raw(T, "b");
    s.on_wake(&mut out);
    let r = delta_responses(&mut out);
    assert_eq!(r.len(), 1);
    assert!(r[0].resources.is_empty());
    assert_eq!(r[0].removed_resources, ["b"]);
}

#[test]
fn delta_reconnect_resumes_from_known_versions() {
    let c = cache();
    let a = c.get(T, "a").unwrap();
    let mut s = DeltaStream::new(c.clone(), Box::new(Unrestricted));
    let mut out = Vec::new();
    let mut req = sub(&["a", "c"]);
    req.initial_resource_versions = HashMap::from([
        ("a".to_string(), a.version.clone()),
        ("c".to_string(), "stale".to_string()),
    ]);
    s.on_request(req, &mut out).unwrap();
    let r = delta_responses(&mut out);
    assert_eq!(
        r[0].resources
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>(),
        ["c"],
        "only what changed"
    );
}

#[test]
fn delta_wildcard_sees_every_resource() {
    let c = cache();
    let mut s = DeltaStream::new(c.clone(), Box::new(Unrestricted));
    let mut out = Vec::new();
    s.on_request(sub(&[]), &mut out).unwrap();
    let r = delta_responses(&mut out);
    assert_eq!(r[0].resources.len(), 2);
    s.on_request(ack(&r[0].nonce), &mut out).unwrap();
    out.clear();
    c.set_raw(T, "z", Bytes::from_static(b"z"));
    s.on_wake(&mut out);
    let r = delta_responses(&mut out);
    assert_eq!(r[0].resources[0].name, "z");
}

fn sotw_responses(out: &mut Vec<StreamEvent>) -> Vec<DiscoveryResponse> {
    out.drain(..)
        .filter_map(|e| match e {
            StreamEvent::Response { bytes, .. } => Some(DiscoveryResponse::decode(bytes).unwrap()),
            _ => None,
        })
        .collect()
}

fn sotw(names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: T.into(),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        version_info: version.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

#[test]
fn sotw_full_state_versions_and_stale_nonces() {
    let c = cache();
    let mut s = SotwStream::new(c.clone(), Box::new(Unrestricted));
    let mut out = Vec::new();
    s.on_request(sotw(&["a"], "", ""), &mut out).unwrap();
    let r = sotw_responses(&mut out);
    assert_eq!(r[0].resources.len(), 1);
    let (v1, n1) = (r[0].version_info.clone(), r[0].nonce.clone());

    // Widening the subscription sends the full new set after the ACK.
    s.on_request(sotw(&["a", "c"], &v1, &n1), &mut out).unwrap();
    let r = sotw_responses(&mut out);
    assert_eq!(r[0].resources.len(), 2);
    let (v2, n2) = (r[0].version_info.clone(), r[0].nonce.clone());
    assert_ne!(v1, v2);

    // After an ACK, a request with the latest nonce may change the names.
    s.on_request(sotw(&["a", "c"], &v2, &n2), &mut out).unwrap();
    out.clear();
    s.on_request(sotw(&["a"], &v2, &n2), &mut out).unwrap();
    let r = sotw_responses(&mut out);
    assert_eq!(r[0].resources.len(), 1, "narrowed after the ACK");
    let (v2, n2) = (r[0].version_info.clone(), r[0].nonce.clone());
    s.on_request(sotw(&["a", "c"], &v2, &n2), &mut out).unwrap();
    let r = sotw_responses(&mut out);
    let (v2, n2) = (r[0].version_info.clone(), r[0].nonce.clone());

    // A request carrying an old nonce is ignored.
    s.on_request(sotw(&["a"], &v1, &n1), &mut out).unwrap();
    assert!(out.is_empty());
    s.on_request(sotw(&["a", "c"], &v2, &n2), &mut out).unwrap();
    assert!(matches!(&out[0], StreamEvent::Ack { .. }));
    out.clear();

    // A change unrelated to the set sends nothing.
    c.set_raw(T, "zzz", Bytes::from_static(b"z"));
    s.on_wake(&mut out);
    assert!(out.is_empty());

    // A reconnecting client holding the current version gets nothing new.
    let mut again = SotwStream::new(c.clone(), Box::new(Unrestricted));
    again
        .on_request(sotw(&["a", "c"], &v2, ""), &mut out)
        .unwrap();
    assert!(sotw_responses(&mut out).is_empty());
    c.set_raw(T, "c", Bytes::from_static(b"c9"));
    again.on_wake(&mut out);
    assert_eq!(sotw_responses(&mut out).len(), 1);
}

#[test]
fn unknown_types_are_refused_with_the_served_list() {
    let mut s = SotwStream::new(cache(), Box::new(Unrestricted));
    let err = s
        .on_request(
            DiscoveryRequest {
                type_url: "type.googleapis.com/nope".into(),
                ..Default::default()
            },
            &mut Vec::new(),
        )
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains(T));
}

#[test]
fn a_scoped_stream_sees_forbidden_names_as_absent() {
    // The stream may read "a" (an upstream, say) and "web" (its own).
    let scope = || Box::new(Only(&["a", "web"]));
    let c = cache();
    let mut s = DeltaStream::new(c.clone(), scope());
    let mut out = Vec::new();
    s.on_request(sub(&["a", "b", "c"]), &mut out).unwrap();
    let r = delta_responses(&mut out);
    let names: Vec<_> = r[0].resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["a"]);
    // "c" exists and "b" does not: both read as absent.
    let mut removed = r[0].removed_resources.clone();
    removed.sort();
    assert_eq!(removed, ["b", "c"]);
    s.on_request(ack(&r[0].nonce), &mut out).unwrap();
    c.set_raw(T, "c", Bytes::from_static(b"c9"));
    s.on_wake(&mut out);
    assert!(
        delta_responses(&mut out).is_empty(),
        "a forbidden change wakes nothing"
    );

    // A wildcard is not refused: it reads what the stream may read.
    let mut wild = DeltaStream::new(c.clone(), scope());
    let carried = drain_acking(&mut wild, Some(sub(&["*"])));
    assert_eq!(carried, [vec!["a"]], "only what the scope allows");

    let mut sotw = SotwStream::new(c.clone(), scope());
    let req = DiscoveryRequest {
        type_url: T.into(),
        resource_names: vec!["a".into(), "c".into()],
        ..Default::default()
    };
    sotw.on_request(req, &mut out).unwrap();
    let sent = sotw_responses(&mut out);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].resources.len(), 1, "only the upstream a");
    let wildcard = DiscoveryRequest {
        type_url: T.into(),
        resource_names: vec!["*".into()],
        version_info: sent[0].version_info.clone(),
        response_nonce: sent[0].nonce.clone(),
        ..Default::default()
    };
    sotw.on_request(wildcard, &mut out).unwrap();
    assert!(
        sotw_responses(&mut out).is_empty(),
        "the wildcard reads the same set: nothing new to send"
    );
}

/// A wildcard subscriber with a scope hears of exactly the resources it may
/// read, as they appear, change and disappear; the rest never reach it.
#[test]
fn a_scoped_wildcard_follows_the_allowed_resources() {
    let scope = || Box::new(Only(&["a", "web"]));
    let c = cache();
    let mut s = DeltaStream::new(c.clone(), scope());
    assert_eq!(drain_acking(&mut s, Some(sub(&[]))), [vec!["a"]]);
    c.set_raw(T, "web", Bytes::from_static(b"w1"));
    c.set_raw(T, "billing", Bytes::from_static(b"b1"));
    c.set_raw(T, "c", Bytes::from_static(b"c2"));
    assert_eq!(drain_acking(&mut s, None), [vec!["web"]]);
    let mut out = Vec::new();
    c.remove_raw(T, "billing");
    c.remove_raw(T, "a");
    s.on_wake(&mut out);
    let r = delta_responses(&mut out);
    assert_eq!(r.len(), 1);
    assert!(r[0].resources.is_empty());
    assert_eq!(r[0].removed_resources, ["a"], "only what it held");

    // A reconnecting client that claims a forbidden name is told it is gone.
    let mut again = DeltaStream::new(c.clone(), scope());
    let mut req = sub(&["*"]);
    let c_version = c.get(T, "c").unwrap().version.clone();
    req.initial_resource_versions = HashMap::from([("c".to_string(), c_version)]);
    again.on_request(req, &mut out).unwrap();
    let r = delta_responses(&mut out);
    let names: Vec<_> = r[0].resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["web"]);
    assert_eq!(r[0].removed_resources, ["c"]);

    let values = |r: &DiscoveryResponse| -> Vec<Vec<u8>> {
        r.resources.iter().map(|a| a.value.clone()).collect()
    };
    let mut whole = SotwStream::new(c.clone(), scope());
    whole.on_request(sotw(&["*"], "", ""), &mut out).unwrap();
    let r = sotw_responses(&mut out);
    assert_eq!(values(&r[0]), [b"w1"]);
    let (v, n) = (r[0].version_info.clone(), r[0].nonce.clone());
    whole.on_request(sotw(&["*"], &v, &n), &mut out).unwrap();
    out.clear();
    c.set_raw(T, "zzz", Bytes::from_static(b"z"));
    whole.on_wake(&mut out);
    assert!(out.is_empty(), "a forbidden arrival sends nothing");
    c.set_raw(T, "a", Bytes::from_static(b"a5"));
    whole.on_wake(&mut out);
    let r = sotw_responses(&mut out);
    assert_eq!(values(&r[0]), [b"a5", b"w1"]);
}

/// Reads everything, but its wildcards carry only names starting with
/// "w": the rest are for clients that name them.
struct NamedOnly;

impl crate::StreamAccess for NamedOnly {
    fn allows(&self, _type_url: &str, _name: &str) -> bool {
        true
    }
    fn in_wildcard(&self, _type_url: &str, name: &str) -> bool {
        name.starts_with('w')
    }
}

/// Resources the application keeps out of wildcards reach a stream that
/// names them, in both protocols, and never one that subscribes by
/// wildcard.
#[test]
fn wildcards_carry_only_what_the_application_puts_in_them() {
    let c = cache();
    c.set_raw(T, "web", Bytes::from_static(b"w1"));
    let mut out = Vec::new();

    let mut wild = DeltaStream::new(c.clone(), Box::new(NamedOnly));
    assert_eq!(drain_acking(&mut wild, Some(sub(&[]))), [vec!["web"]]);
    c.set_raw(T, "a", Bytes::from_static(b"a2"));
    c.set_raw(T, "wiki", Bytes::from_static(b"k1"));
    assert_eq!(drain_acking(&mut wild, None), [vec!["wiki"]]);
    let mut named = DeltaStream::new(c.clone(), Box::new(NamedOnly));
    assert_eq!(drain_acking(&mut named, Some(sub(&["a"]))), [vec!["a"]]);

    let values = |r: &DiscoveryResponse| -> Vec<Vec<u8>> {
        r.resources.iter().map(|a| a.value.clone()).collect()
    };
    let mut whole = SotwStream::new(c.clone(), Box::new(NamedOnly));
    whole.on_request(sotw(&[], "", ""), &mut out).unwrap();
    assert_eq!(values(&sotw_responses(&mut out)[0]), [b"w1", b"k1"]);
    let mut by_name = SotwStream::new(c.clone(), Box::new(NamedOnly));
    by_name
        .on_request(sotw(&["a", "c"], "", ""), &mut out)
        .unwrap();
    assert_eq!(values(&sotw_responses(&mut out)[0]), [b"a2", b"c1"]);
}

/// Sends `req`, then acknowledges every response until none is left;
/// returns the names each response carried.
fn drain_acking(s: &mut DeltaStream, req: Option<DeltaDiscoveryRequest>) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    match req {
        Some(r) => s.on_request(r, &mut out).unwrap(),
        None => s.on_wake(&mut out),
    }
    let mut carried = Vec::new();
    loop {
        let r = delta_responses(&mut out);
        if r.is_empty() {
            return carried;
        }
        assert_eq!(r.len(), 1, "one response in flight");
        carried.push(r[0].resources.iter().map(|x| x.name.clone()).collect());
        s.on_request(ack(&r[0].nonce), &mut out).unwrap();
    }
}

#[test]
fn delta_responses_are_bounded_and_the_rest_follows_each_ack() {
    let c = Cache::new(&[T]);
    let names = ["a", "b", "c", "d", "e"];
    for n in names {
        c.set_raw(T, n, Bytes::from(vec![b'x'; 1000]));
    }
    // Two ~1 KiB resources fit in 2,500 bytes, three do not.
    let mut s = DeltaStream::new(c.clone(), Box::new(Unrestricted)).with_budget(2500);
    let carried = drain_acking(&mut s, Some(sub(&names)));
    assert_eq!(
        carried,
        [vec!["a", "b"], vec!["c", "d"], vec!["e"]],
        "split over three responses, nothing lost"
    );
    // A resource larger than the budget still goes, alone.
    c.set_raw(T, "a", Bytes::from(vec![b'y'; 5000]));
    c.set_raw(T, "b", Bytes::from(vec![b'y'; 5000]));
    let carried = drain_acking(&mut s, None);
    assert_eq!(carried, [vec!["a"], vec!["b"]]);
}

/// A stream never sends part of a batch: while one thread publishes
/// generations of several resources together, another drives a stream of
/// each protocol as fast as it can, and every response it builds carries
/// all of them at one generation.
#[test]
fn responses_never_carry_part_of_a_batch() {
    const GENERATIONS: u32 = 5000;
    const NAMES: [&str; 8] = ["a", "b", "c", "d", "e", "f", "g", "h"];
    let c = Cache::new(&[T]);
    let publish = |generation: u32| {
        let value = Bytes::from(generation.to_string());
        let mut batch = Batch::new();
        for n in NAMES {
            batch.set_raw(T, n, value.clone());
        }
        c.apply(batch);
    };
    publish(0);
    // The generation every value carries; fails if they differ.
    let generation = |values: Vec<Vec<u8>>| -> u32 {
        let g: Vec<u32> = values
            .iter()
            .map(|v| std::str::from_utf8(v).unwrap().parse().unwrap())
            .collect();
        assert_eq!(g.len(), NAMES.len(), "every name changed in each batch");
        assert!(
            g.iter().all(|x| *x == g[0]),
            "one batch per response: {g:?}"
        );
        g[0]
    };
    std::thread::scope(|scope| {
        scope.spawn(|| (1..GENERATIONS).for_each(publish));
        // State of the world: each response holds the whole set.
        scope.spawn(|| {
            let mut s = SotwStream::new(c.clone(), Box::new(Unrestricted));
            let mut out = Vec::new();
            s.on_request(sotw(&NAMES, "", ""), &mut out).unwrap();
            loop {
                let Some(r) = sotw_responses(&mut out).pop() else {
                    std::thread::yield_now();
                    s.on_wake(&mut out);
                    continue;
                };
                let g = generation(r.resources.iter().map(|a| a.value.clone()).collect());
                s.on_request(sotw(&NAMES, &r.version_info, &r.nonce), &mut out)
                    .unwrap();
                if g == GENERATIONS - 1 {
                    return;
                }
            }
        });
        // Delta: a response holds what changed, every name of a batch.
        scope.spawn(|| {
            let mut s = DeltaStream::new(c.clone(), Box::new(Unrestricted));
            let mut out = Vec::new();
            s.on_request(sub(&NAMES), &mut out).unwrap();
            loop {
                let Some(r) = delta_responses(&mut out).pop() else {
                    std::thread::yield_now();
                    s.on_wake(&mut out);
                    continue;
                };
                let values = r.resources.iter();
                let g = generation(
                    values
                        .map(|x| x.resource.as_ref().unwrap().value.clone())
                        .collect(),
                );
                s.on_request(ack(&r.nonce), &mut out).unwrap();
                if g == GENERATIONS - 1 {
                    return;
                }
            }
        });
    });
}
