//! What happens on a stream, told to observers: the stream lifecycle hooks
//! (opened, each response, ACK and NACK, closed) that feed an application's
//! logs, metrics and record of what each client holds.
//!
//! A leaf module: the state machines produce these events and the server
//! reports them, so both import this file and neither imports the other.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use bytes::Bytes;

/// What happened on a stream, for observers.
///
/// Per type, in the order a request's effects happen: the answer to the
/// response it acknowledges (`Ack` or `Nack`), then the change of
/// subscription it makes (`Subscribed`), then what the stream holds or is
/// sent (`Resumed`, `Response`).
#[derive(Debug)]
pub enum StreamEvent {
    Response {
        type_url: Arc<str>,
        nonce: String,
        bytes: Bytes,
        resources: usize,
    },
    /// The client accepted a response; `versions` are the (name, version)
    /// pairs it now holds (state of the world reports one set version with
    /// an empty name; an empty version means "does not exist").
    Ack {
        type_url: Arc<str>,
        nonce: String,
        versions: Vec<(String, String)>,
        /// The newest change the acknowledged response carried (None when
        /// it carried only removals).
        changed_at: Option<Instant>,
        /// State of the world: the names subscribed by name that the
        /// response did not carry (they do not exist, or the stream may
        /// not read them), which the client now takes for absent. Delta
        /// reports those in `versions`, with an empty version.
        absent: Vec<Arc<str>>,
    },
    /// The client rejected a response: `versions` are the (name, version)
    /// pairs the response carried (state of the world: one, the set's,
    /// with an empty name), none of which it holds now.
    Nack {
        type_url: Arc<str>,
        nonce: String,
        message: String,
        versions: Vec<(String, String)>,
    },
    /// What the stream subscribes to of `type_url` changed: apply
    /// `removed`, then `added`. The names are the engine's own copies (one
    /// `Arc<str>` per name, shared by the stream's state and the cache's
    /// watcher table), so an observer keeping them holds no copy of its
    /// own; the engine bounds them ([`crate::Limits`]). Names the stream
    /// may not read are included: the client asked for them, and is
    /// answered that they do not exist. `wildcard`: the stream also
    /// subscribes to every resource of the type it may read.
    Subscribed {
        type_url: Arc<str>,
        wildcard: bool,
        added: Vec<Arc<str>>,
        removed: Vec<Arc<str>>,
    },
    /// On its first request of `type_url` the client said it already holds
    /// these (name, version) pairs, and the engine took its word: delta's
    /// `initial_resource_versions` (an unchanged resource is then not sent
    /// again, so no ACK will tell), and state of the world's
    /// `version_info` when it is the version the stream would be sent
    /// (with the names it lacks, as in `Ack`). Observers may count them as
    /// acknowledged; they are no ACK of this server's.
    Resumed {
        type_url: Arc<str>,
        versions: Vec<(String, String)>,
        absent: Vec<Arc<str>>,
    },
}

#[derive(Clone, Debug)]
pub struct StreamInfo {
    pub id: u64,
    /// When the stream sent its first request; changes older than this
    /// reached it on connect, not by propagation.
    pub opened: Instant,
    pub node_id: String,
    pub delta: bool,
    pub peer: Option<SocketAddr>,
    /// Who opened the stream, as the application's access named it
    /// ([`crate::StreamAccess::caller`]). The node id is the client's
    /// word; this is what the application authenticated.
    pub caller: String,
    /// The first request's `node.user_agent_name` ("gRPC Python",
    /// "envoy"; empty when unset): the client's word, at most
    /// [`crate::MAX_NODE_FIELD_BYTES`] bytes without control characters,
    /// as are the fields below.
    pub user_agent_name: String,
    /// `node.user_agent_version`, or `node.user_agent_build_version` as
    /// `major.minor.patch` (Envoy's form).
    pub user_agent_version: String,
    /// `node.cluster`.
    pub cluster: String,
    /// `node.locality.zone`.
    pub zone: String,
}

/// Stream lifecycle hooks. `closed` is also the signal that a client went
/// away.
pub trait StreamObserver: Send + Sync + 'static {
    fn opened(&self, _stream: &StreamInfo) {}
    fn event(&self, _stream: &StreamInfo, _event: &StreamEvent) {}
    fn closed(&self, _stream: &StreamInfo) {}
}

/// Two observers, both told everything (metrics and proxy status, say).
impl<A: StreamObserver, B: StreamObserver> StreamObserver for (A, B) {
    fn opened(&self, s: &StreamInfo) {
        self.0.opened(s);
        self.1.opened(s);
    }

    fn event(&self, s: &StreamInfo, e: &StreamEvent) {
        self.0.event(s, e);
        self.1.event(s, e);
    }

    fn closed(&self, s: &StreamInfo) {
        self.0.closed(s);
        self.1.closed(s);
    }
}
