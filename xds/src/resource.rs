//! Resources encoded once, and responses assembled from the shared bytes.
//!
//! Protobuf lets a repeated message field be written as one tag + length +
//! bytes per element, in any order relative to other fields. So a response
//! is its scalar fields encoded per stream, then each resource's stored
//! encoding appended as field 2 (`resources`) of `DiscoveryResponse` or
//! `DeltaDiscoveryResponse`. No resource is re-encoded per stream.

use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use envoy_types::pb::{
    envoy::service::discovery::v3::{DeltaDiscoveryResponse, DiscoveryResponse, Resource},
    google::protobuf::Any,
};
use prost::{
    Message,
    encoding::{WireType, encode_key, encode_varint},
};

/// The nonces of one stream's responses: a counter of its own, since xDS
/// needs nonces unique only within a stream, and one shared counter would
/// tell each stream how many responses the others were sent.
#[derive(Debug, Default)]
pub(crate) struct Nonces(u64);

impl Nonces {
    pub(crate) fn next(&mut self) -> String {
        self.0 += 1;
        self.0.to_string()
    }
}

/// Field number of `resources` in both DiscoveryResponse and
/// DeltaDiscoveryResponse.
const RESOURCES_FIELD: u32 = 2;

/// One resource, encoded for both protocol variants.
#[derive(Debug)]
pub struct Encoded {
    pub name: String,
    /// Content hash of the `Any`: equal content has equal versions across
    /// restarts and replicas, so a reconnecting client that already holds a
    /// version is not sent it again.
    pub version: String,
    /// The resource as a `google.protobuf.Any` (state of the world).
    pub any: Bytes,
    /// The resource as an `envoy.service.discovery.v3.Resource` (delta).
    pub delta: Bytes,
    /// When the change that produced this content was first seen; an ACK
    /// of a response carrying it measures convergence from here.
    pub changed_at: Instant,
}

impl Encoded {
    pub fn new(type_url: &str, name: &str, message: &[u8]) -> Self {
        let any = Any {
            type_url: type_url.to_owned(),
            value: message.to_vec(),
        };
        let any_bytes = any.encode_to_vec();
        let version = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&any_bytes));
        let delta = Resource {
            name: name.to_owned(),
            version: version.clone(),
            resource: Some(any),
            ..Default::default()
        }
        .encode_to_vec();
        Encoded {
            name: name.to_owned(),
            version,
            any: any_bytes.into(),
            delta: delta.into(),
            changed_at: Instant::now(),
        }
    }
}

/// Version of a state-of-the-world set: a hash of its names and versions,
/// so it is stable for equal content.
pub fn set_version<'a>(resources: impl Iterator<Item = &'a Encoded>) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for r in resources {
        h.update(r.name.as_bytes());
        h.update(&[0]);
        h.update(r.version.as_bytes());
        h.update(&[0]);
    }
    format!("{:016x}", h.digest())
}

fn append(mut head: Vec<u8>, parts: impl Iterator<Item = Bytes>) -> Bytes {
    let parts: Vec<Bytes> = parts.collect();
    let extra: usize = parts.iter().map(|p| p.len() + 16).sum();
    let mut buf = BytesMut::with_capacity(head.len() + extra);
    buf.put_slice(&head);
    head.clear();
    for p in parts {
        encode_key(RESOURCES_FIELD, WireType::LengthDelimited, &mut buf);
        encode_varint(p.len() as u64, &mut buf);
        buf.put_slice(&p);
    }
    buf.freeze()
}

/// An encoded `DiscoveryResponse` holding `resources`.
pub fn sotw_response(
    type_url: &str,
    version: &str,
    nonce: &str,
    resources: &[std::sync::Arc<Encoded>],
) -> Bytes {
    let head = DiscoveryResponse {
        version_info: version.to_owned(),
        type_url: type_url.to_owned(),
        nonce: nonce.to_owned(),
        ..Default::default()
    }
    .encode_to_vec();
    append(head, resources.iter().map(|r| r.any.clone()))
}

/// An encoded `DeltaDiscoveryResponse`.
pub fn delta_response(
    type_url: &str,
    nonce: &str,
    resources: &[std::sync::Arc<Encoded>],
    removed: Vec<String>,
) -> Bytes {
    let head = DeltaDiscoveryResponse {
        type_url: type_url.to_owned(),
        nonce: nonce.to_owned(),
        removed_resources: removed,
        ..Default::default()
    }
    .encode_to_vec();
    append(head, resources.iter().map(|r| r.delta.clone()))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const T: &str = "type.googleapis.com/test.Thing";

    #[test]
    fn assembled_responses_decode_as_if_prost_had_encoded_them() {
        let a = Arc::new(Encoded::new(T, "a", b"\x0a\x01a"));
        let b = Arc::new(Encoded::new(T, "b", b"\x0a\x01b"));
        let bytes = sotw_response(T, "v1", "7", &[a.clone(), b.clone()]);
        let got = DiscoveryResponse::decode(bytes).unwrap();
        assert_eq!(got.version_info, "v1");
        assert_eq!(got.nonce, "7");
        assert_eq!(got.type_url, T);
        assert_eq!(got.resources.len(), 2);
        assert_eq!(got.resources[1].value, b"\x0a\x01b");

        let bytes = delta_response(T, "8", std::slice::from_ref(&a), vec!["gone".into()]);
        let got = DeltaDiscoveryResponse::decode(bytes).unwrap();
        assert_eq!(got.nonce, "8");
        assert_eq!(got.removed_resources, ["gone"]);
        assert_eq!(got.resources[0].name, "a");
        assert_eq!(got.resources[0].version, a.version);
        assert_eq!(got.resources[0].resource.as_ref().unwrap().type_url, T);
    }

    #[test]
    fn versions_follow_content() {
        let a1 = Encoded::new(T, "a", b"one");
        let a2 = Encoded::new(T, "a", b"one");
        let a3 = Encoded::new(T, "a", b"two");
        assert_eq!(a1.version, a2.version);
        assert_ne!(a1.version, a3.version);
        assert_ne!(
            set_version([&a1].into_iter()),
            set_version([&a3].into_iter())
        );
    }
}
