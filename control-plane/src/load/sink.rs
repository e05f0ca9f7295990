//! Load summaries to the store, off the sessions' path: sessions queue
//! writes ([`Sink::send`] never waits), one task per replica applies them
//! one transaction at a time. The queue is bounded ([`QUEUE`]); a write
//! that does not fit is dropped and counted, and the session's writer
//! writes that summary again with the next report.
//!
//! Keys are `<prefix>loads/<instance id>`, attached to the session's
//! lease, so a summary goes with its session (revoked on close, expired
//! when the sidecar is gone).

use std::sync::Arc;

use bytes::Bytes;
use prost::Message;
use tokio::sync::{mpsc, watch};

use super::writer::Write;
use crate::store::{LeaseId, Store, Txn};

/// Writes queued at most; at one write per instance every few seconds,
/// room for bursts of thousands of instances.
pub const QUEUE: usize = 4096;

/// A cheap handle sessions queue their summaries' writes on.
#[derive(Clone, Debug)]
pub struct Sink {
    tx: mpsc::Sender<(Write, Option<LeaseId>)>,
}

/// The key prefix of load summaries under the mesh's prefix.
pub fn prefix(mesh_prefix: &str) -> String {
    format!("{mesh_prefix}loads/")
}

// === impl Sink ===

impl Sink {
    /// Starts the task that writes under `mesh_prefix` until `shutdown`.
    pub fn spawn(
        store: Arc<dyn Store>,
        mesh_prefix: &str,
        shutdown: watch::Receiver<bool>,
    ) -> (Sink, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(run(store, prefix(mesh_prefix), rx, shutdown));
        (Sink { tx }, task)
    }

    /// Queues `write` (a put on `lease`); false when the queue is full
    /// and it was dropped.
    pub fn send(&self, write: Write, lease: Option<LeaseId>) -> bool {
        self.tx.try_send((write, lease)).is_ok()
    }
}

async fn run(
    store: Arc<dyn Store>,
    prefix: String,
    mut rx: mpsc::Receiver<(Write, Option<LeaseId>)>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (write, lease) = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            w = rx.recv() => match w {
                Some(w) => w,
                None => return,
            },
        };
        let txn = match &write {
            Write::Put(s) => Txn::default().put(
                format!("{prefix}{}", s.instance_id),
                Bytes::from(s.encode_to_vec()),
                lease,
            ),
            Write::Delete(id) => Txn::default().delete(format!("{prefix}{id}")),
        };
        // A lost write costs a stale figure until the next one; the lease
        // may also be gone (the session ended meanwhile): nothing to keep.
        if let Err(e) = store.txn(txn).await {
            tracing::debug!(error = %e, ?write, "load summary not written");
        }
    }
}
