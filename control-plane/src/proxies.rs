//! What each connected xDS client holds, per discovery stream: the state
//! behind `isdpctl proxy-status` (`api/status.rs`) and the Client Status
//! Discovery Service (`api/csds.rs`).
//!
//! A [`StreamObserver`] like the metrics: it only follows the events the
//! xDS server reports, so it adds nothing to the push path. Entries live as
//! long as their stream; a client that went away is simply absent.
//!
//! What it keeps per stream, and why no more: who opened it (the node's
//! id, user agent, cluster and zone, checked by the engine; the principal;
//! the kind of client, derived once), and per type what the engine told
//! it (`held.rs`): the names subscribed to, as the engine's own `Arc<str>`
//! (one pointer per name: the engine bounds the names per stream and
//! charges their bytes to the caller's budget, so a copy here would only
//! double what a caller may make the server hold), the versions
//! acknowledged, and what the last NACK rejected. No resource contents: a
//! resource's current body is the cache's. A state-of-the-world wildcard
//! is one entry, `*`, with the set's version: the names a set carried are
//! not reported by the engine, and keeping them would copy every resource
//! name per stream.

mod held;

use std::{collections::HashMap, sync::Arc, time::SystemTime};

use dashmap::DashMap;
use isdp_core::dial::SIDECAR_USER_AGENT;
use isdp_proto::v1::{ClientKind, Proxy, TypeStatus};
use isdp_xds::{StreamEvent, StreamInfo, StreamObserver};

use self::held::TypeRecord;
pub use self::held::{Rejection, ResourceState, ResourceStatus};

/// Cheap handle to the table of open streams.
#[derive(Clone, Default)]
pub struct Proxies {
    streams: Arc<DashMap<u64, Entry>>,
}

struct Entry {
    node_id: String,
    peer: String,
    /// Who opened the stream: the node id is the client's word, this is
    /// the principal the auth layer authenticated.
    principal: String,
    kind: ClientKind,
    user_agent_name: String,
    user_agent_version: String,
    cluster: String,
    zone: String,
    delta: bool,
    connected_at: SystemTime,
    types: HashMap<Arc<str>, TypeRecord>,
}

/// One open stream, per resource: what CSDS reports of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientStatus {
    pub node_id: String,
    pub user_agent_name: String,
    pub user_agent_version: String,
    pub cluster: String,
    pub zone: String,
    pub types: Vec<TypeResources>,
}

/// One type of a stream, for CSDS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeResources {
    pub type_url: Arc<str>,
    /// A response of this type awaits the client's answer.
    pub pending: bool,
    /// By name.
    pub resources: Vec<ResourceStatus>,
}

/// The kind of client a node's `user_agent_name` names: ISDP's sidecar,
/// proxyless gRPC (every gRPC implementation's starts with "gRPC":
/// "gRPC Python", "gRPC Go", "gRPC Node Pure JS"), Envoy, or another.
pub fn client_kind(user_agent_name: &str) -> ClientKind {
    if user_agent_name == SIDECAR_USER_AGENT {
        ClientKind::IsdpSidecar
    } else if user_agent_name.starts_with("gRPC") {
        ClientKind::Grpc
    } else if user_agent_name == "envoy" {
        ClientKind::Envoy
    } else {
        ClientKind::Other
    }
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

// === impl Proxies ===

impl Proxies {
    /// Every open stream, sorted by node id (then by connection time).
    pub fn list(&self) -> Vec<Proxy> {
        let mut out: Vec<Proxy> = self
            .streams
            .iter()
            .map(|e| {
                let mut types: Vec<TypeStatus> = e
                    .types
                    .iter()
                    .map(|(type_url, t)| TypeStatus {
                        type_url: type_url.to_string(),
                        acked: t.acked_versions(),
                        acks: t.acks,
                        nacks: t.nacks,
                        last_nack: t.last_nack.clone(),
                        pending: t.pending,
                        last_ack_unix_ms: t.last_ack.map_or(0, unix_ms),
                    })
                    .collect();
                types.sort_by(|a, b| a.type_url.cmp(&b.type_url));
                Proxy {
                    node_id: e.node_id.clone(),
                    peer: e.peer.clone(),
                    principal: e.principal.clone(),
                    delta: e.delta,
                    connected_at_unix_ms: unix_ms(e.connected_at),
                    types,
                    kind: e.kind.into(),
                    user_agent_name: e.user_agent_name.clone(),
                    user_agent_version: e.user_agent_version.clone(),
                    cluster: e.cluster.clone(),
                    zone: e.zone.clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| {
            (&a.node_id, a.connected_at_unix_ms).cmp(&(&b.node_id, b.connected_at_unix_ms))
        });
        out
    }

    /// The streams whose node id `wanted` accepts, per resource, sorted
    /// by node id (then by connection time), types by URL.
    pub fn client_status(&self, wanted: impl Fn(&str) -> bool) -> Vec<ClientStatus> {
        let mut out: Vec<(SystemTime, ClientStatus)> = self
            .streams
            .iter()
            .filter(|e| wanted(&e.node_id))
            .map(|e| {
                let mut types: Vec<TypeResources> = e
                    .types
                    .iter()
                    .map(|(type_url, t)| TypeResources {
                        type_url: type_url.clone(),
                        pending: t.pending,
                        resources: t.resources(e.delta),
                    })
                    .collect();
                types.sort_by(|a, b| a.type_url.cmp(&b.type_url));
                let status = ClientStatus {
                    node_id: e.node_id.clone(),
                    user_agent_name: e.user_agent_name.clone(),
                    user_agent_version: e.user_agent_version.clone(),
                    cluster: e.cluster.clone(),
                    zone: e.zone.clone(),
                    types,
                };
                (e.connected_at, status)
            })
            .collect();
        out.sort_by(|(at_a, a), (at_b, b)| (&a.node_id, at_a).cmp(&(&b.node_id, at_b)));
        out.into_iter().map(|(_, s)| s).collect()
    }
}

impl StreamObserver for Proxies {
    fn opened(&self, s: &StreamInfo) {
        self.streams.insert(
            s.id,
            Entry {
                node_id: s.node_id.clone(),
                peer: s.peer.map(|p| p.to_string()).unwrap_or_default(),
                principal: s.caller.clone(),
                kind: client_kind(&s.user_agent_name),
                user_agent_name: s.user_agent_name.clone(),
                user_agent_version: s.user_agent_version.clone(),
                cluster: s.cluster.clone(),
                zone: s.zone.clone(),
                delta: s.delta,
                connected_at: SystemTime::now(),
                types: HashMap::new(),
            },
        );
    }

    fn event(&self, s: &StreamInfo, e: &StreamEvent) {
        let Some(mut entry) = self.streams.get_mut(&s.id) else {
            return;
        };
        match e {
            StreamEvent::Response { type_url, .. } => {
                entry.types.entry(type_url.clone()).or_default().pending = true;
            }
            StreamEvent::Ack {
                type_url,
                versions,
                absent,
                ..
            } => {
                let t = entry.types.entry(type_url.clone()).or_default();
                let now = SystemTime::now();
                t.pending = false;
                t.acks += 1;
                t.last_ack = Some(now);
                t.on_acked(s.delta, versions, absent, Some(now));
            }
            StreamEvent::Nack {
                type_url,
                message,
                versions,
                ..
            } => {
                let t = entry.types.entry(type_url.clone()).or_default();
                t.pending = false;
                t.nacks += 1;
                t.on_nacked(s.delta, versions, message, SystemTime::now());
            }
            StreamEvent::Subscribed {
                type_url,
                wildcard,
                added,
                removed,
            } => {
                let t = entry.types.entry(type_url.clone()).or_default();
                t.on_subscribed(s.delta, *wildcard, added, removed);
            }
            StreamEvent::Resumed {
                type_url,
                versions,
                absent,
            } => {
                let t = entry.types.entry(type_url.clone()).or_default();
                t.on_acked(s.delta, versions, absent, None);
            }
        }
    }

    fn closed(&self, s: &StreamInfo) {
        self.streams.remove(&s.id);
    }
}

#[cfg(test)]
mod tests;
