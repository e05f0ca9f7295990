//! The xDS relay: a local plaintext ADS endpoint for xDS clients that
//! cannot authenticate to the control plane (`@grpc/grpc-js-xds` offers
//! only `insecure` channel credentials), relaying each stream to the
//! control plane over a connection made with this sidecar's credentials,
//! as Istio's node agent does for proxyless gRPC.
//!
//! A relayed client therefore reads exactly what this sidecar's principal
//! may read: the control plane applies the principal's scope to every
//! relayed stream, counts it against the principal's stream caps, and
//! shows it in `isdpctl proxy-status` under the client's node id with the
//! sidecar's principal. The relay adds no rule of its own and reads
//! nothing of the messages but their framing and a first request's node
//! id (`codec`). It is off by default, and listens only where the host
//! alone can reach it (`config::RelayListen`): whoever reaches it reads
//! with the sidecar's credentials.
//!
//! Each stream dials the control plane itself (the next configured URL,
//! then the others in turn), as Istio's agent opens an upstream connection
//! per downstream one: streams fail and reconnect independently, each new
//! one presents the sidecar's current certificate and learned roots, and a
//! client whose control plane died moves to a replica on its next stream.
//!
//! # Layout
//! - `listen`: the loopback or unix socket (0660, placed atomically).
//! - `activity`: the streams open on one connection (idle or not).
//! - `conn`: one h2c connection, its stream, idle and keep-alive bounds.
//! - `codec`: messages as bytes; the node id of a first request.
//! - `stream`: one relayed stream, from admission to its end.
//! - this file: [`Relay`], the shared state (the cap, the open streams for
//!   `/config`, dialling, metrics), and the accept loop.

mod activity;
mod codec;
mod conn;
pub mod listen;
mod stream;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use isdp_core::dial::{self, ControlAuth, ControlChannel};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;
use tonic::Status;

use crate::metrics::{Metrics, RelayMetrics};
pub use conn::{IDLE_TIMEOUT, MAX_STREAMS_PER_CONNECTION};
pub use listen::{BindError, Listener, UNIX_SOCKET_MODE};
pub use stream::{FIRST_REQUEST_TIMEOUT, MAX_REQUEST_BYTES};

/// What the relay answers a client itself; `as_str` is the
/// `isdp_xds_relay_errors_total` reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayError {
    /// `xds_relay_max_streams` streams are open already.
    MaxStreams,
    /// No control-plane URL could be dialled, or the control plane was
    /// lost during the stream.
    ControlPlaneUnreachable,
    /// A request over [`MAX_REQUEST_BYTES`].
    RequestTooLarge,
    /// A request tonic could not read as a gRPC message.
    BadRequest,
    /// No request within [`FIRST_REQUEST_TIMEOUT`] of the stream opening.
    NoFirstRequest,
    /// A response over the relay's decode limit (`dial::MAX_RESPONSE_BYTES`).
    ResponseTooLarge,
    /// The sidecar is stopping.
    ShuttingDown,
}

impl RelayError {
    pub fn as_str(self) -> &'static str {
        match self {
            RelayError::MaxStreams => "max-streams",
            RelayError::ControlPlaneUnreachable => "control-plane-unreachable",
            RelayError::RequestTooLarge => "request-too-large",
            RelayError::BadRequest => "bad-request",
            RelayError::NoFirstRequest => "no-first-request",
            RelayError::ResponseTooLarge => "response-too-large",
            RelayError::ShuttingDown => "shutting-down",
        }
    }
}

/// How the relay reaches the control plane, and its bounds.
#[derive(Clone, Debug)]
pub struct RelaySettings {
    /// Control-plane URLs, dialled in turn.
    pub control_plane: Vec<String>,
    /// The sidecar's credentials (token, current certificate, roots).
    pub auth: ControlAuth,
    /// `xds_relay_max_streams`.
    pub max_streams: usize,
    /// How long shutdown waits for connections to close.
    pub drain: Duration,
}

/// A relayed stream, as `/config` shows it.
#[derive(Clone, Debug)]
pub struct OpenStream {
    /// The node id of its first request (empty before it).
    pub node_id: String,
    /// The client's address, or `unix uid N`.
    pub peer: String,
    pub delta: bool,
    /// The control plane it was relayed to; None while dialling.
    pub control_plane: Option<String>,
    pub opened: SystemTime,
}

/// The relay's state; a cheap handle.
#[derive(Clone)]
pub struct Relay {
    shared: Arc<Shared>,
}

struct Shared {
    /// Where it listens, as the `listening:` line shows it.
    listen: String,
    settings: RelaySettings,
    /// One permit per stream under `xds_relay_max_streams`.
    slots: Arc<Semaphore>,
    open: Mutex<BTreeMap<u64, OpenStream>>,
    next_id: AtomicU64,
    /// Index of the control-plane URL the next stream dials first.
    next_url: AtomicUsize,
    metrics: RelayMetrics,
    shutdown: watch::Receiver<bool>,
    /// Every connection and stream task, so shutdown can wait for them.
    tasks: TaskTracker,
}

/// One stream's place under the cap and line in `/config`, given back
/// when dropped.
struct Slot {
    relay: Relay,
    id: u64,
    _permit: OwnedSemaphorePermit,
}

/// Starts relaying on `listener` until `shutdown`; the task ends once
/// every relayed stream has ended (each ends with UNAVAILABLE) and their
/// connections closed, or after `settings.drain`.
pub fn spawn(
    listener: Listener,
    settings: RelaySettings,
    metrics: &Metrics,
    shutdown: watch::Receiver<bool>,
) -> (Relay, JoinHandle<()>) {
    let relay = Relay {
        shared: Arc::new(Shared {
            listen: listener.local(),
            slots: Arc::new(Semaphore::new(settings.max_streams)),
            settings,
            open: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(0),
            next_url: AtomicUsize::new(0),
            metrics: metrics.relay(),
            shutdown,
            tasks: TaskTracker::new(),
        }),
    };
    tracing::info!(listen = %relay.listen(), max_streams = relay.max_streams(), "xds relay listening");
    let task = tokio::spawn(serve(listener, relay.clone()));
    (relay, task)
}

/// Accepts connections until shutdown. Connections are capped at twice
/// the stream cap, so a client over the stream cap is still answered
/// RESOURCE_EXHAUSTED rather than left unaccepted, while connections
/// holding no stream (closed after `conn::IDLE_TIMEOUT`) cannot pile up.
async fn serve(listener: Listener, relay: Relay) {
    let connections = Arc::new(Semaphore::new(2 * relay.max_streams()));
    let mut shutdown = relay.shutdown();
    loop {
        let permit = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            permit = connections.clone().acquire_owned() => permit.expect("never closed"),
        };
        let accepted = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            accepted = listener.accept() => accepted,
        };
        let (conn, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!(error = %e, "xds relay accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (relay2, shutdown) = (relay.clone(), relay.shutdown());
        let peer: Arc<str> = Arc::from(peer);
        relay.spawn(async move {
            let _permit = permit;
            match conn {
                listen::Conn::Tcp(s) => conn::serve(s, peer, relay2, shutdown).await,
                listen::Conn::Unix(s) => conn::serve(s, peer, relay2, shutdown).await,
            }
        });
    }
    // No new connection from here (a unix socket's file goes now).
    drop(listener);
    let tasks = &relay.shared.tasks;
    tasks.close();
    if tokio::time::timeout(relay.shared.settings.drain, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            tasks = tasks.len(),
            "xds relay: drain timeout reached; closing what is left"
        );
    }
}

// === impl Relay ===

impl Relay {
    /// Where it listens: `127.0.0.1:PORT` or `unix:/PATH`.
    pub fn listen(&self) -> &str {
        &self.shared.listen
    }

    pub fn max_streams(&self) -> usize {
        self.shared.settings.max_streams
    }

    /// The streams relayed now, oldest first.
    pub fn open_streams(&self) -> Vec<OpenStream> {
        self.shared
            .open
            .lock()
            .map(|open| open.values().cloned().collect())
            .unwrap_or_default()
    }

    fn shutdown(&self) -> watch::Receiver<bool> {
        self.shared.shutdown.clone()
    }

    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.shared.tasks.spawn(task);
    }

    /// A place for one more stream, or RESOURCE_EXHAUSTED naming the key.
    fn admit(&self, peer: &str, delta: bool) -> Result<Slot, Status> {
        let Ok(permit) = self.shared.slots.clone().try_acquire_owned() else {
            return Err(self.full());
        };
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let stream = OpenStream {
            node_id: String::new(),
            peer: peer.to_owned(),
            delta,
            control_plane: None,
            opened: SystemTime::now(),
        };
        if let Ok(mut open) = self.shared.open.lock() {
            open.insert(id, stream);
        }
        self.shared.metrics.streams.inc();
        self.shared.metrics.open.inc();
        Ok(Slot {
            relay: self.clone(),
            id,
            _permit: permit,
        })
    }

    /// A connection to the control plane with the sidecar's credentials:
    /// the next URL in turn, then the others; UNAVAILABLE naming each
    /// failure if none answers.
    async fn dial(&self) -> Result<(String, ControlChannel), Status> {
        let urls = &self.shared.settings.control_plane;
        let start = self.shared.next_url.fetch_add(1, Ordering::Relaxed);
        let mut failures = Vec::with_capacity(urls.len());
        for i in 0..urls.len() {
            let url = &urls[(start + i) % urls.len()];
            match dial::connect(url, &self.shared.settings.auth).await {
                Ok(channel) => return Ok((url.clone(), channel)),
                Err(e) => failures.push(e.to_string()),
            }
        }
        self.shared
            .metrics
            .error(RelayError::ControlPlaneUnreachable.as_str());
        Err(Status::unavailable(format!(
            "xds relay: the control plane is unreachable: {}",
            failures.join("; ")
        )))
    }

    /// RESOURCE_EXHAUSTED naming `xds_relay_max_streams`, counted.
    fn full(&self) -> Status {
        self.shared.metrics.error(RelayError::MaxStreams.as_str());
        let max = self.max_streams();
        Status::resource_exhausted(format!(
            "xds relay: xds_relay_max_streams ({max}) reached: this sidecar already relays {max} ADS streams"
        ))
    }

    /// UNAVAILABLE: the client reconnects, to this sidecar once restarted.
    fn shutting_down(&self) -> Status {
        self.shared.metrics.error(RelayError::ShuttingDown.as_str());
        Status::unavailable("xds relay: the sidecar is shutting down")
    }

    /// [`stream::from_control_plane`], counted.
    fn control_plane_failed(&self, status: &Status, url: &str) -> Status {
        let (status, error) = stream::from_control_plane(status, url);
        if let Some(error) = error {
            self.shared.metrics.error(error.as_str());
        }
        status
    }

    /// A stream that asked nothing in time, counted.
    fn no_first_request(&self) -> Status {
        self.shared
            .metrics
            .error(RelayError::NoFirstRequest.as_str());
        Status::deadline_exceeded(format!(
            "xds relay: no request within {} s of the stream opening",
            FIRST_REQUEST_TIMEOUT.as_secs()
        ))
    }

    /// [`stream::from_client`], counted.
    fn client_failed(&self, status: &Status) -> Option<Status> {
        let (status, error) = stream::from_client(status)?;
        self.shared.metrics.error(error.as_str());
        Some(status)
    }

    fn update(&self, id: u64, f: impl FnOnce(&mut OpenStream)) {
        if let Ok(mut open) = self.shared.open.lock()
            && let Some(stream) = open.get_mut(&id)
        {
            f(stream);
        }
    }
}

// === impl Slot ===

impl Slot {
    fn connected(&self, url: &str) {
        self.relay
            .update(self.id, |s| s.control_plane = Some(url.to_owned()));
    }

    fn node(&self, node_id: String) {
        self.relay.update(self.id, |s| s.node_id = node_id);
    }

    fn node_id(&self) -> String {
        let open = self.relay.shared.open.lock();
        open.ok()
            .and_then(|open| open.get(&self.id).map(|s| s.node_id.clone()))
            .unwrap_or_default()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.relay.shared.open.lock() {
            open.remove(&self.id);
        }
        self.relay.shared.metrics.open.dec();
    }
}

#[cfg(test)]
mod tests;
