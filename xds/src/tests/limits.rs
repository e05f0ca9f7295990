//! What one stream may make the server hold and show: names per stream
//! and type, refused names included; NACK texts; nonces of its own.

use std::collections::HashMap;

use envoy_types::pb::{
    envoy::service::discovery::v3::DeltaDiscoveryRequest, google::rpc::Status as RpcStatus,
};
use tonic::Code;

use super::{T, ack, cache, delta_responses, sotw, sotw_responses, sub};
use crate::{
    Limits, MAX_NACK_MESSAGE_BYTES, MAX_NAME_BYTES, TRUNCATED, Unrestricted, access::tests::Only,
    delta::DeltaStream, event::StreamEvent, sotw::SotwStream,
};

const LIMIT: Limits = Limits {
    names_per_stream: 3,
};

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

fn refs(names: &[String]) -> Vec<&str> {
    names.iter().map(String::as_str).collect()
}

/// RESOURCE_EXHAUSTED naming the type, the count and the limit.
fn exhausted(result: Result<(), tonic::Status>, count: usize) {
    let e = result.expect_err("over the limit");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    for part in [T, &format!(" {count} "), "limit of 3"] {
        assert!(e.message().contains(part), "{part}: {e}");
    }
}

#[test]
fn sotw_names_are_capped_after_deduplication_refused_included() {
    let mut s = SotwStream::new(cache(), Box::new(Only(&["a"]))).with_limits(LIMIT);
    let mut out = Vec::new();
    // Duplicates count once; refused names count.
    s.on_request(sotw(&["a", "a", "x", "y", "y"], "", ""), &mut out)
        .unwrap();
    let r = sotw_responses(&mut out);
    assert_eq!(r[0].resources.len(), 1);
    exhausted(
        s.on_request(
            sotw(&["a", "x", "y", "z"], &r[0].version_info, &r[0].nonce),
            &mut out,
        ),
        4,
    );
    let mut big = SotwStream::new(cache(), Box::new(Only(&[]))).with_limits(Limits::default());
    let flood = names("refused-", 60_000);
    exhausted_default(
        big.on_request(sotw(&refs(&flood), "", ""), &mut out),
        60_000,
    );
    assert!(out.is_empty(), "nothing is sent for a refused request");
}

fn exhausted_default(result: Result<(), tonic::Status>, count: usize) {
    let e = result.expect_err("over the limit");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(e.message().contains(&format!(" {count} ")), "{e}");
    assert!(e.message().contains("limit of 4096"), "{e}");
}

#[test]
fn delta_names_are_capped_across_requests_and_freed_by_unsubscribing() {
    let mut s = DeltaStream::new(cache(), Box::new(Only(&["a"]))).with_limits(LIMIT);
    let mut out = Vec::new();
    s.on_request(sub(&["a", "x", "x"]), &mut out).unwrap();
    s.on_request(ack(&delta_responses(&mut out)[0].nonce), &mut out)
        .unwrap();
    s.on_request(sub(&["y"]), &mut out).unwrap();
    s.on_request(ack(&delta_responses(&mut out)[0].nonce), &mut out)
        .unwrap();
    // Names already held are no growth; a fourth is.
    s.on_request(sub(&["a", "y"]), &mut out).unwrap();
    exhausted(s.on_request(sub(&["z"]), &mut out), 4);
    // Unsubscribing makes room, in the same request.
    let mut s = DeltaStream::new(cache(), Box::new(Only(&["a"]))).with_limits(LIMIT);
    s.on_request(sub(&["a", "x", "y"]), &mut out).unwrap();
    s.on_request(ack(&delta_responses(&mut out)[0].nonce), &mut out)
        .unwrap();
    s.on_request(
        DeltaDiscoveryRequest {
            resource_names_unsubscribe: vec!["x".into(), "y".into()],
            ..sub(&["z", "w"])
        },
        &mut out,
    )
    .unwrap();
    // The wildcard is not a name.
    s.on_request(sub(&["*"]), &mut out).unwrap();
}

#[test]
fn delta_initial_resource_versions_count_with_the_names() {
    let held = |names: &[&str]| -> HashMap<String, String> {
        names
            .iter()
            .map(|n| ((*n).to_owned(), "v".to_owned()))
            .collect()
    };
    let first = |subscribe: &[&str], known: &[&str]| DeltaDiscoveryRequest {
        initial_resource_versions: held(known),
        ..sub(subscribe)
    };
    let mut out = Vec::new();
    let mut s = DeltaStream::new(cache(), Box::new(Unrestricted)).with_limits(LIMIT);
    s.on_request(first(&["a", "c"], &["a", "c", "d"]), &mut out)
        .unwrap();
    let mut s = DeltaStream::new(cache(), Box::new(Unrestricted)).with_limits(LIMIT);
    exhausted(s.on_request(first(&["a"], &["b", "c", "d"]), &mut out), 4);
    // A wildcard stream resuming with many held names.
    let mut s = DeltaStream::new(cache(), Box::new(Unrestricted)).with_limits(LIMIT);
    exhausted(s.on_request(first(&[], &["a", "b", "c", "d"]), &mut out), 4);
}

#[test]
fn names_longer_than_the_limit_are_refused() {
    let long = "n".repeat(MAX_NAME_BYTES + 1);
    let mut out = Vec::new();
    let mut d = DeltaStream::new(cache(), Box::new(Unrestricted));
    let e = d.on_request(sub(&[&long]), &mut out).unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let mut s = SotwStream::new(cache(), Box::new(Unrestricted));
    let e = s
        .on_request(sotw(&["a", &long], "", ""), &mut out)
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("1024"), "{e}");
}

#[test]
fn a_nack_message_is_cut_before_observers_see_it() {
    let mut s = DeltaStream::new(cache(), Box::new(Unrestricted));
    let mut out = Vec::new();
    s.on_request(sub(&["a"]), &mut out).unwrap();
    let r = delta_responses(&mut out);
    let huge = format!("bad endpoint: {}", "é".repeat(1 << 20));
    let mut nack = ack(&r[0].nonce);
    nack.error_detail = Some(RpcStatus {
        code: 3,
        message: huge.clone(),
        ..Default::default()
    });
    s.on_request(nack, &mut out).unwrap();
    let StreamEvent::Nack { message, .. } = &out[0] else {
        panic!("{:?}", out[0]);
    };
    assert!(message.len() <= MAX_NACK_MESSAGE_BYTES, "{}", message.len());
    assert!(message.starts_with("bad endpoint: é"));
    assert!(message.ends_with(TRUNCATED));
}

/// Each stream counts its own nonces: what others were sent does not
/// show, and ACK matching still works per stream.
#[test]
fn nonces_are_per_stream() {
    let c = cache();
    let mut out = Vec::new();
    let mut busy = DeltaStream::new(c.clone(), Box::new(Unrestricted));
    busy.on_request(sub(&["a"]), &mut out).unwrap();
    for n in 0..20 {
        let r = delta_responses(&mut out);
        busy.on_request(ack(&r[0].nonce), &mut out).unwrap();
        c.set_raw(T, "a", format!("a{n}").into_bytes().into());
        busy.on_wake(&mut out);
    }
    assert_eq!(delta_responses(&mut out)[0].nonce, "21");

    let mut quiet = DeltaStream::new(c.clone(), Box::new(Unrestricted));
    quiet.on_request(sub(&["c"]), &mut out).unwrap();
    let r = delta_responses(&mut out);
    assert_eq!(r[0].nonce, "1", "a new stream starts its own count");
    let mut sotw_stream = SotwStream::new(c.clone(), Box::new(Unrestricted));
    sotw_stream
        .on_request(sotw(&["c"], "", ""), &mut out)
        .unwrap();
    let s = sotw_responses(&mut out);
    assert_eq!(s[0].nonce, "1");
    // The quiet stream's ACK of nonce 1 still matches its own response.
    quiet.on_request(ack(&r[0].nonce), &mut out).unwrap();
    assert!(matches!(&out[0], StreamEvent::Ack { nonce, .. } if nonce == "1"));
}

/// An unknown type URL of megabytes is refused with a message (and so a
/// log line) of bounded length.
#[test]
fn an_unknown_type_url_is_quoted_in_bounded_length() {
    let huge = format!("type.googleapis.com/nope\n{}", "x".repeat(3 << 20));
    let mut s = DeltaStream::new(cache(), Box::new(Unrestricted));
    let e = s
        .on_request(
            DeltaDiscoveryRequest {
                type_url: huge,
                ..Default::default()
            },
            &mut Vec::new(),
        )
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().len() < 512, "{} bytes", e.message().len());
    assert!(e.message().contains(r"nope\n"), "{e}");
    assert!(e.message().contains(T), "the served types: {e}");
}
