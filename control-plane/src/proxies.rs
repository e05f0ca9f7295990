//! What each connected sidecar has acknowledged, per discovery stream: the
//! state behind `isdpctl proxy-status`.
//!
//! A [`StreamObserver`] like the metrics: it only follows the events the
//! xDS server reports, so it adds nothing to the push path. Entries live as
//! long as their stream; a sidecar that went away is simply absent.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::SystemTime,
};

use dashmap::DashMap;
use isdp_proto::v1::{Proxy, TypeStatus};
use isdp_xds::{StreamEvent, StreamInfo, StreamObserver};

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
    delta: bool,
    connected_at: SystemTime,
    types: HashMap<Arc<str>, TypeEntry>,
}

#[derive(Default)]
struct TypeEntry {
    acked: BTreeMap<String, String>,
    acks: u64,
    nacks: u64,
    last_nack: String,
    pending: bool,
    last_ack: Option<SystemTime>,
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

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
                        acked: t.acked.clone(),
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
                }
            })
            .collect();
        out.sort_by(|a, b| {
            (&a.node_id, a.connected_at_unix_ms).cmp(&(&b.node_id, b.connected_at_unix_ms))
        });
        out
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
                type_url, versions, ..
            } => {
                let t = entry.types.entry(type_url.clone()).or_default();
                t.pending = false;
                t.acks += 1;
                t.last_ack = Some(SystemTime::now());
                if s.delta {
                    for (name, version) in versions {
                        if version.is_empty() {
                            t.acked.remove(name);
                        } else {
                            t.acked.insert(name.clone(), version.clone());
                        }
                    }
                } else {
                    t.acked = versions.iter().cloned().collect();
                }
            }
            StreamEvent::Nack {
                type_url, message, ..
            } => {
                let t = entry.types.entry(type_url.clone()).or_default();
                t.pending = false;
                t.nacks += 1;
                t.last_nack = message.clone();
            }
            StreamEvent::Subscribed { .. } | StreamEvent::Resumed { .. } => {}
        }
    }

    fn closed(&self, s: &StreamInfo) {
        self.streams.remove(&s.id);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

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

    #[test]
    fn follows_acks_nacks_and_removals() {
        let p = Proxies::default();
        let t: Arc<str> = Arc::from("type.googleapis.com/isdp.v1.ServiceEndpoints");
        let web = info(1, "web", true);
        p.opened(&web);
        p.opened(&info(2, "api", false));
        p.event(
            &web,
            &StreamEvent::Response {
                type_url: t.clone(),
                nonce: "1".into(),
                bytes: Default::default(),
                resources: 2,
            },
        );
        assert!(p.list()[1].types[0].pending);
        p.event(
            &web,
            &StreamEvent::Ack {
                type_url: t.clone(),
                nonce: "1".into(),
                versions: vec![("a".into(), "v1".into()), ("b".into(), "v1".into())],
                changed_at: None,
                absent: vec![],
            },
        );
        p.event(
            &web,
            &StreamEvent::Ack {
                type_url: t.clone(),
                nonce: "2".into(),
                versions: vec![("a".into(), "v2".into()), ("b".into(), String::new())],
                changed_at: None,
                absent: vec![],
            },
        );
        p.event(
            &web,
            &StreamEvent::Nack {
                type_url: t.clone(),
                nonce: "3".into(),
                message: "bad endpoint".into(),
                versions: vec![("a".into(), "v3".into())],
            },
        );
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
}
