//! What happens on a stream, told to observers: the stream lifecycle hooks
//! (opened, each response, ACK and NACK, closed) that feed an application's
//! logs, metrics and record of what each client holds.
//!
//! A leaf module: the state machines produce these events and the server
//! reports them, so both import this file and neither imports the other.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use bytes::Bytes;

/// What happened on a stream, for observers.
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
    },
    Nack {
        type_url: Arc<str>,
        nonce: String,
        message: String,
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
