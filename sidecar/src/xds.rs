//! The discovery client: follows the endpoints of every upstream over delta
//! ADS and publishes them as a `watch` of [`Snapshot`]s. The data plane
//! only reads `borrow()` and never waits on the control plane; while the
//! stream is down the last snapshot keeps being served.

mod client;
mod state;

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use state::{Endpoint, Resources, UpstreamState, apply, decode, held_versions};

/// What the client knows, published after every change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Upstreams the control plane has answered for, by name. An upstream
    /// missing here has no answer yet.
    pub upstreams: Resources,
    /// True once every subscribed upstream has had an answer (or there are
    /// none); stays true across reconnects.
    pub ready: bool,
    /// Acknowledged versions of the resources held, by name.
    pub acked: BTreeMap<String, String>,
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
    /// TLS roots and token for the control plane.
    pub auth: crate::dial::ControlAuth,
}

/// Starts the client. With no upstreams there is nothing to subscribe to
/// (an empty delta subscription would mean "everything"), so the snapshot
/// is ready at once and no stream is opened.
pub fn spawn(
    settings: XdsSettings,
    shutdown: watch::Receiver<bool>,
) -> (watch::Receiver<Arc<Snapshot>>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    if settings.upstreams.is_empty() {
        tx.send_modify(|s| Arc::make_mut(s).ready = true);
        // Keep the sender alive until shutdown so readers never see it closed.
        let mut shutdown = shutdown;
        let task = tokio::spawn(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
            drop(tx);
        });
        return (rx, task);
    }
    let task = tokio::spawn(client::Client::new(settings, tx).run(shutdown));
    (rx, task)
}

#[cfg(test)]
mod tests;
