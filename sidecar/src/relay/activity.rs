//! The streams open on one connection, for `conn` to tell an idle
//! connection from a busy one: each call holds an [`Active`] from the
//! moment it arrives (admission and dialling included) to its end.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// The streams open on one connection; a cheap handle.
#[derive(Clone)]
pub(super) struct Activity(Arc<watch::Sender<usize>>);

/// One stream's place in its connection's [`Activity`], given back when
/// dropped.
pub(super) struct Active(Arc<watch::Sender<usize>>);

// === impl Activity ===

impl Activity {
    pub(super) fn new() -> Self {
        Activity(Arc::new(watch::Sender::new(0)))
    }

    /// Counts one more stream until the returned guard drops.
    pub(super) fn stream(&self) -> Active {
        self.0.send_modify(|n| *n += 1);
        Active(self.0.clone())
    }

    /// Resolves once no stream is open.
    pub(super) async fn none_open(&self) {
        let _ = self.0.subscribe().wait_for(|n| *n == 0).await;
    }

    /// Resolves once no stream has been open for `timeout`.
    pub(super) async fn idle_for(&self, timeout: Duration) {
        let mut open = self.0.subscribe();
        loop {
            let _ = open.wait_for(|n| *n == 0).await;
            tokio::select! {
                _ = tokio::time::sleep(timeout) => return,
                _ = open.wait_for(|n| *n > 0) => {}
            }
        }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}
