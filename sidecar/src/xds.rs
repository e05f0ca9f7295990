//! The discovery client: follows the endpoints and traffic policies of
//! every upstream, the mesh's trust bundle and the authorization policies
//! of the local services over one delta ADS stream, and publishes them as a `watch` of
//! [`Snapshot`]s. The data plane
//! only reads `borrow()` and never waits on the control plane; while the
//! stream is down the last snapshot keeps being served.

mod client;
pub mod security;
mod state;
mod traffic;

use std::collections::BTreeMap;

use isdp_proto::v1::{AuthorizationPolicy, TrafficPolicy, TrustBundle};
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use state::{Endpoint, Resources, UpstreamState, apply, decode, held_versions};

/// The largest xDS response the client decodes (see
/// [`isdp_core::dial::MAX_RESPONSE_BYTES`]).
pub use isdp_core::dial::MAX_RESPONSE_BYTES;

/// What the client knows, published after every change.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Upstreams the control plane has answered for, by name. An upstream
    /// missing here has no answer yet.
    pub upstreams: Resources,
    /// True once every subscribed upstream has had an answer (or there are
    /// none); stays true across reconnects.
    pub ready: bool,
    /// Acknowledged versions of the endpoint resources held, by name.
    pub acked: BTreeMap<String, String>,
    /// Acknowledged versions of the other resources held, keyed by
    /// `<type>/<name>` (`TrustBundle/mesh`, `AuthorizationPolicy/<service>`,
    /// `TrafficPolicy/<upstream>`).
    pub acked_by_type: BTreeMap<String, String>,
    /// The mesh's roots, once the control plane has sent them. Until then
    /// the bundle of the last `SignResponse` is trusted.
    pub trust_bundle: Option<TrustBundle>,
    /// Authorization policies of the local services, by service.
    pub authz_policies: BTreeMap<String, AuthorizationPolicy>,
    /// Traffic policies of the upstreams that have one, by upstream, with
    /// the control plane's version. An upstream missing here runs on the
    /// sidecar's defaults.
    pub traffic_policies: BTreeMap<String, security::Versioned<TrafficPolicy>>,
    /// ACKs sent, over all streams.
    pub acks: u64,
    /// NACKs sent, over all streams.
    pub nacks: u64,
    /// The reason of the last NACK, for the admin page.
    pub last_nack: Option<String>,
    /// Times the stream broke or a connection attempt failed.
    pub reconnects: u64,
    /// Whether a stream is open right now.
    pub connected: bool,
    /// Why the control plane refuses this sidecar's stream
    /// (UNAUTHENTICATED or PERMISSION_DENIED: its token and certificate
    /// are revoked, or expired), until a stream opens again. Unlike an
    /// unreachable control plane, this will not pass by itself, so
    /// `/ready` reports it.
    pub refused: Option<String>,
    /// The control-plane URL of the current (or last) stream.
    pub control_plane: Option<String>,
}

/// What the client needs from the configuration.
#[derive(Clone, Debug)]
pub struct XdsSettings {
    /// Sent as `Node.id`.
    pub node_id: String,
    /// Control-plane URLs, tried in turn.
    pub control_plane: Vec<String>,
    /// Upstream names to subscribe to.
    pub upstreams: Vec<String>,
    /// Local service names whose authorization policies to follow.
    pub local_services: Vec<String>,
    /// TLS roots and token for the control plane.
    pub auth: isdp_core::dial::ControlAuth,
}

/// Starts the client. A stream is always opened (every sidecar follows the
/// trust bundle); with no upstreams the snapshot is ready at once, and no
/// endpoints are subscribed to (an empty delta subscription would mean
/// "everything").
pub fn spawn(
    settings: XdsSettings,
    shutdown: watch::Receiver<bool>,
) -> (watch::Receiver<Arc<Snapshot>>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(Arc::new(Snapshot {
        ready: settings.upstreams.is_empty(),
        ..Default::default()
    }));
    let task = tokio::spawn(client::Client::new(settings, tx).run(shutdown));
    (rx, task)
}

#[cfg(test)]
mod tests;
