//! What the relay reads of the messages it carries: nothing but their
//! length (gRPC framing), and of a stream's first request its node id.
//!
//! Requests and responses go through as the bytes they arrived as
//! ([`RawCodec`] both ways), so the relay cannot drift from what the
//! client and the control plane say, whatever the resource types. The
//! node id is read with a message that declares only that field (prost
//! skips the rest), for `/config` and the logs; the control plane checks
//! it, not the relay.

use bytes::{Buf, BufMut, Bytes};
use tonic::{
    Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
};

/// The longest node id kept for `/config`: the control plane refuses
/// longer ones anyway (`node.id: must be 1 to 128 ...`).
const MAX_NODE_ID_BYTES: usize = 128;

/// Messages as bytes, both ways.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    /// The message's bytes, split off tonic's buffer without a copy.
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// `envoy.config.core.v3.Node`, its `id` only.
#[derive(Clone, PartialEq, prost::Message)]
struct NodeId {
    #[prost(string, tag = "1")]
    id: String,
}

/// `DiscoveryRequest`, its `node` (field 2) only.
#[derive(Clone, PartialEq, prost::Message)]
struct SotwHead {
    #[prost(message, optional, tag = "2")]
    node: Option<NodeId>,
}

/// `DeltaDiscoveryRequest`, its `node` (field 1) only.
#[derive(Clone, PartialEq, prost::Message)]
struct DeltaHead {
    #[prost(message, optional, tag = "1")]
    node: Option<NodeId>,
}

/// The node id a first request names, cut to [`MAX_NODE_ID_BYTES`] on a
/// character boundary; empty when it names none or is not a request.
pub(super) fn node_id(request: &[u8], delta: bool) -> String {
    let node = if delta {
        prost::Message::decode(request).map(|h: DeltaHead| h.node)
    } else {
        prost::Message::decode(request).map(|h: SotwHead| h.node)
    };
    let mut id = node.ok().flatten().map(|n| n.id).unwrap_or_default();
    if id.len() > MAX_NODE_ID_BYTES {
        let mut end = MAX_NODE_ID_BYTES;
        while !id.is_char_boundary(end) {
            end -= 1;
        }
        id.truncate(end);
    }
    id
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::{
        config::core::v3::Node,
        service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest},
    };
    use prost::Message;

    use super::*;

    fn node(id: &str) -> Option<Node> {
        Some(Node {
            id: id.into(),
            cluster: "c".into(),
            ..Default::default()
        })
    }

    /// Each protocol's node sits at its own field number; the rest of the
    /// request is skipped.
    #[test]
    fn reads_the_node_id_of_either_protocol() {
        let sotw = DiscoveryRequest {
            version_info: "v1".into(),
            node: node("grpc-js-1"),
            resource_names: vec!["echo".into()],
            type_url: "type.googleapis.com/envoy.config.listener.v3.Listener".into(),
            ..Default::default()
        };
        let delta = DeltaDiscoveryRequest {
            node: node("grpc-js-2"),
            type_url: "t".into(),
            resource_names_subscribe: vec!["echo".into()],
            ..Default::default()
        };
        assert_eq!(node_id(&sotw.encode_to_vec(), false), "grpc-js-1");
        assert_eq!(node_id(&delta.encode_to_vec(), true), "grpc-js-2");
        // Read as the other protocol, the node is not where it is looked
        // for: no id rather than a wrong one.
        assert_eq!(node_id(&delta.encode_to_vec(), false), "");
    }

    #[test]
    fn no_node_garbage_and_long_ids() {
        let bare = DeltaDiscoveryRequest::default().encode_to_vec();
        assert_eq!(node_id(&bare, true), "");
        assert_eq!(node_id(b"\xff\xff\xff", true), "");
        let long = DeltaDiscoveryRequest {
            node: node(&format!("n{}", "é".repeat(100))),
            ..Default::default()
        };
        let id = node_id(&long.encode_to_vec(), true);
        assert_eq!(id.len(), 127, "cut on a character boundary");
        assert!(id.starts_with("né"));
    }
}
