//! What observers are told of what a stream holds: subscription changes
//! (with the engine's own copies of the names), the names a
//! state-of-the-world ACK leaves absent, what a NACK rejected, and what a
//! resuming client says it holds.

use std::{collections::HashMap, sync::Arc};

use bytes::Bytes;
use envoy_types::pb::{
    envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest},
    google::rpc::Status as RpcStatus,
};

use super::{T, ack, cache, delta_responses, sotw, sotw_responses, sub};
use crate::{
    Unrestricted, access::tests::Only, delta::DeltaStream, event::StreamEvent, sotw::SotwStream,
};

/// A subscription change: (wildcard, added, removed).
type Change = (bool, Vec<Arc<str>>, Vec<Arc<str>>);

/// The subscription changes among `out`, names sorted.
fn subscribed(out: &[StreamEvent]) -> Vec<Change> {
    out.iter()
        .filter_map(|e| match e {
            StreamEvent::Subscribed {
                type_url,
                wildcard,
                added,
                removed,
            } => {
                assert_eq!(&**type_url, T);
                let (mut added, mut removed) = (added.clone(), removed.clone());
                added.sort();
                removed.sort();
                Some((*wildcard, added, removed))
            }
            _ => None,
        })
        .collect()
}

fn arcs(names: &[&str]) -> Vec<Arc<str>> {
    names.iter().map(|n| Arc::from(*n)).collect()
}

fn rejected(message: &str) -> Option<RpcStatus> {
    Some(RpcStatus {
        code: 3,
        message: message.into(),
        ..Default::default()
    })
}

#[test]
fn sotw_tells_subscriptions_absent_names_and_what_a_nack_rejected() {
    // "a" and "c" exist; "b" does not; "c" is outside the stream's access.
    let c = cache();
    let mut s = SotwStream::new(c.clone(), Box::new(Only(&["a", "b"])));
    let mut out = Vec::new();
    s.on_request(sotw(&["a", "b", "c"], "", ""), &mut out)
        .unwrap();
    let subs = subscribed(&out);
    assert_eq!(subs, [(false, arcs(&["a", "b", "c"]), vec![])]);
    let a = subs[0].1[0].clone();
    let r = sotw_responses(&mut out);
    assert_eq!(r[0].resources.len(), 1);

    // The same names again: no change to tell. The ACK names what the
    // response left out: the missing name and the refused one.
    s.on_request(
        sotw(&["c", "b", "a"], &r[0].version_info, &r[0].nonce),
        &mut out,
    )
    .unwrap();
    assert!(subscribed(&out).is_empty());
    let [
        StreamEvent::Ack {
            versions, absent, ..
        },
    ] = &out[..]
    else {
        panic!("one ACK: {out:?}");
    };
    assert_eq!(versions, &[(String::new(), r[0].version_info.clone())]);
    let mut absent = absent.clone();
    absent.sort();
    assert_eq!(absent, arcs(&["b", "c"]));
    out.clear();

    // Dropping names tells them, as the very copies told when added.
    s.on_request(sotw(&["a"], &r[0].version_info, &r[0].nonce), &mut out)
        .unwrap();
    let subs = subscribed(&out);
    assert_eq!(subs, [(false, vec![], arcs(&["b", "c"]))]);
    assert!(
        sotw_responses(&mut out).is_empty(),
        "the same resources: nothing to send"
    );
    s.on_request(sotw(&["a", "b"], &r[0].version_info, &r[0].nonce), &mut out)
        .unwrap();
    out.clear();
    s.on_request(sotw(&["b"], &r[0].version_info, &r[0].nonce), &mut out)
        .unwrap();
    let removed = &subscribed(&out)[0].2;
    assert!(
        Arc::ptr_eq(&removed[0], &a),
        "observers hold the stream's own copy of each name"
    );
    out.clear();

    // A NACK names the set version it rejected.
    let mut s = SotwStream::new(c, Box::new(Unrestricted));
    s.on_request(sotw(&["a"], "", ""), &mut out).unwrap();
    let r = sotw_responses(&mut out);
    let v = r[0].version_info.clone();
    s.on_request(
        DiscoveryRequest {
            error_detail: rejected("bad a"),
            ..sotw(&["a"], "", &r[0].nonce)
        },
        &mut out,
    )
    .unwrap();
    let [
        StreamEvent::Nack {
            versions, message, ..
        },
    ] = &out[..]
    else {
        panic!("one NACK: {out:?}");
    };
    assert_eq!(
        (versions.as_slice(), message.as_str()),
        (&[(String::new(), v)][..], "bad a")
    );
    out.clear();

    // A wildcard is told as such, its names dropped.
    s.on_request(sotw(&["*"], "", &r[0].nonce), &mut out)
        .unwrap();
    assert_eq!(subscribed(&out), [(true, vec![], arcs(&["a"]))]);
}

#[test]
fn sotw_resuming_with_the_current_version_is_told() {
    let c = cache();
    let mut first = SotwStream::new(c.clone(), Box::new(Unrestricted));
    let mut out = Vec::new();
    first
        .on_request(sotw(&["a", "b"], "", ""), &mut out)
        .unwrap();
    let v = sotw_responses(&mut out)[0].version_info.clone();

    // A new stream whose client holds that version is sent nothing, and
    // observers learn what it holds.
    let mut again = SotwStream::new(c.clone(), Box::new(Unrestricted));
    again
        .on_request(sotw(&["a", "b"], &v, ""), &mut out)
        .unwrap();
    let resumed: Vec<_> = out
        .iter()
        .filter_map(|e| match e {
            StreamEvent::Resumed {
                versions, absent, ..
            } => Some((versions.clone(), absent.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(resumed, [(vec![(String::new(), v.clone())], arcs(&["b"]))]);
    assert!(sotw_responses(&mut out).is_empty());

    // An outdated version: a response follows, and no claim is relayed.
    let mut stale = SotwStream::new(c, Box::new(Unrestricted));
    stale
        .on_request(sotw(&["a", "b"], "old", ""), &mut out)
        .unwrap();
    assert!(!out.iter().any(|e| matches!(e, StreamEvent::Resumed { .. })));
    assert_eq!(sotw_responses(&mut out).len(), 1);
}

#[test]
fn delta_tells_subscriptions_nacked_names_and_resumed_versions() {
    let c = cache();
    let a = c.get(T, "a").unwrap();
    let mut s = DeltaStream::new(c.clone(), Box::new(Unrestricted));
    let mut out = Vec::new();
    let mut first = sub(&["a", "b"]);
    first.initial_resource_versions = HashMap::from([
        ("a".to_owned(), a.version.clone()),
        ("x".to_owned(), String::new()),
    ]);
    s.on_request(first, &mut out).unwrap();
    assert_eq!(subscribed(&out), [(false, arcs(&["a", "b"]), vec![])]);
    let resumed: Vec<_> = out
        .iter()
        .filter_map(|e| match e {
            StreamEvent::Resumed { versions, .. } => Some(versions.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        resumed,
        [vec![("a".to_owned(), a.version.clone())]],
        "what the client holds, empty versions left out"
    );
    let r = delta_responses(&mut out);
    assert_eq!(r[0].removed_resources, ["b"], "a is not sent again");
    s.on_request(ack(&r[0].nonce), &mut out).unwrap();
    out.clear();

    // A NACK names the resources the rejected response carried.
    c.set_raw(T, "a", Bytes::from_static(b"a2"));
    s.on_wake(&mut out);
    let r = delta_responses(&mut out);
    let a2 = r[0].resources[0].version.clone();
    s.on_request(
        DeltaDiscoveryRequest {
            error_detail: rejected("bad a"),
            ..ack(&r[0].nonce)
        },
        &mut out,
    )
    .unwrap();
    let [StreamEvent::Nack { versions, .. }] = &out[..] else {
        panic!("one NACK: {out:?}");
    };
    assert_eq!(versions, &[("a".to_owned(), a2)]);
    out.clear();

    // Unsubscribing one name and subscribing the wildcard in one request.
    s.on_request(
        DeltaDiscoveryRequest {
            resource_names_unsubscribe: vec!["a".into()],
            ..sub(&["*"])
        },
        &mut out,
    )
    .unwrap();
    assert_eq!(subscribed(&out), [(true, vec![], arcs(&["a"]))]);
    out.clear();
    s.on_request(
        DeltaDiscoveryRequest {
            resource_names_unsubscribe: vec!["*".into()],
            ..sub(&[])
        },
        &mut out,
    )
    .unwrap();
    assert_eq!(subscribed(&out), [(false, vec![], vec![])]);
}
