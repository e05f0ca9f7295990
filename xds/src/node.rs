//! What the first request's `node` says of the client beyond its id: who
//! it is (its user agent) and where it runs (cluster, zone), for
//! observers ([`crate::StreamInfo`]).
//!
//! Clients fill these in themselves: proxyless gRPC sends its language
//! ("gRPC Python", "1.85.0") and what its bootstrap's `node` holds, Envoy
//! "envoy" with a structured build version and its `--service-cluster`
//! and `--service-zone`. Like the id, each is the client's word, shown in
//! tables and logs, so each is bounded and printable
//! ([`limits::check_node_text`]) or the stream ends with INVALID_ARGUMENT
//! naming the field. The engine gives them no meaning.

use envoy_types::pb::envoy::config::core::v3::{Node, node::UserAgentVersionType};
use tonic::Status;

use crate::limits::{self, MAX_NODE_FIELD_BYTES};

/// The node's fields observers are told, checked; empty when unset.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ClientNode {
    pub(crate) user_agent_name: String,
    pub(crate) user_agent_version: String,
    pub(crate) cluster: String,
    pub(crate) zone: String,
}

impl ClientNode {
    /// Reads `node` (None: the request named no node), or says which
    /// field is unacceptable.
    pub(crate) fn read(node: Option<&Node>) -> Result<Self, Status> {
        let Some(node) = node else {
            return Ok(ClientNode::default());
        };
        let user_agent_version = match &node.user_agent_version_type {
            None => String::new(),
            Some(UserAgentVersionType::UserAgentVersion(v)) => v.clone(),
            // Envoy's form: the semantic version; its free-form build
            // metadata is not shown.
            Some(UserAgentVersionType::UserAgentBuildVersion(b)) => {
                b.version.as_ref().map_or_else(String::new, |v| {
                    format!("{}.{}.{}", v.major_number, v.minor_number, v.patch)
                })
            }
        };
        let zone = node
            .locality
            .as_ref()
            .map_or_else(String::new, |l| l.zone.clone());
        let client = ClientNode {
            user_agent_name: node.user_agent_name.clone(),
            user_agent_version,
            cluster: node.cluster.clone(),
            zone,
        };
        for (field, value) in [
            ("node.user_agent_name", &client.user_agent_name),
            ("node.user_agent_version", &client.user_agent_version),
            ("node.cluster", &client.cluster),
            ("node.locality.zone", &client.zone),
        ] {
            limits::check_node_text(field, value, MAX_NODE_FIELD_BYTES)?;
        }
        Ok(client)
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::{
        config::core::v3::{BuildVersion, Locality},
        r#type::v3::SemanticVersion,
    };

    use super::*;

    fn grpc() -> Node {
        Node {
            id: "web-1".into(),
            cluster: "web".into(),
            locality: Some(Locality {
                region: "eu".into(),
                zone: "eu-1a".into(),
                sub_zone: String::new(),
            }),
            user_agent_name: "gRPC Python".into(),
            user_agent_version_type: Some(UserAgentVersionType::UserAgentVersion("1.85.0".into())),
            ..Default::default()
        }
    }

    #[test]
    fn reads_user_agents_and_locality() {
        assert_eq!(
            ClientNode::read(Some(&grpc())).unwrap(),
            ClientNode {
                user_agent_name: "gRPC Python".into(),
                user_agent_version: "1.85.0".into(),
                cluster: "web".into(),
                zone: "eu-1a".into(),
            }
        );
        let envoy = Node {
            user_agent_name: "envoy".into(),
            user_agent_version_type: Some(UserAgentVersionType::UserAgentBuildVersion(
                BuildVersion {
                    version: Some(SemanticVersion {
                        major_number: 1,
                        minor_number: 34,
                        patch: 2,
                    }),
                    metadata: None,
                },
            )),
            ..Default::default()
        };
        let read = ClientNode::read(Some(&envoy)).unwrap();
        assert_eq!(
            (
                read.user_agent_name.as_str(),
                read.user_agent_version.as_str()
            ),
            ("envoy", "1.34.2")
        );
        assert_eq!(ClientNode::read(None).unwrap(), ClientNode::default());
        assert_eq!(
            ClientNode::read(Some(&Node::default())).unwrap(),
            ClientNode::default()
        );
    }

    /// Every field is bounded and printable, and a refusal names it.
    #[test]
    fn bad_fields_are_refused_by_name() {
        let long = "x".repeat(MAX_NODE_FIELD_BYTES + 1);
        type Set = fn(&mut Node, String);
        let fields: [(&str, Set); 4] = [
            ("node.user_agent_name", |n, v| n.user_agent_name = v),
            ("node.user_agent_version", |n, v| {
                n.user_agent_version_type = Some(UserAgentVersionType::UserAgentVersion(v))
            }),
            ("node.cluster", |n, v| n.cluster = v),
            ("node.locality.zone", |n, v| {
                n.locality.as_mut().expect("set").zone = v
            }),
        ];
        for (field, set) in fields {
            let mut ok = grpc();
            set(&mut ok, "x".repeat(MAX_NODE_FIELD_BYTES));
            assert!(ClientNode::read(Some(&ok)).is_ok(), "{field} at the limit");
            for (bad, says) in [
                (long.clone(), "257 bytes, at most 256"),
                ("gRPC\nforged line".into(), "control characters"),
                ("a\x1b[31m".into(), "control characters"),
            ] {
                let mut node = grpc();
                set(&mut node, bad);
                let e = ClientNode::read(Some(&node)).unwrap_err();
                assert_eq!(e.code(), tonic::Code::InvalidArgument, "{field}");
                assert!(e.message().starts_with(&format!("{field}: ")), "{e}");
                assert!(e.message().contains(says), "{e}");
                assert!(!e.message().contains('\n') && !e.message().contains('\x1b'));
            }
        }
    }
}
