//! Waiting for an in-memory view to reach a store revision.
//!
//! A view (the registry, the authorization rules, the traffic policies)
//! follows one key prefix through the store's watch, and a writer waits
//! until the view has applied its revision, so it reads its own write. The
//! revision a writer waits for is not always one at which its prefix
//! changed: a transaction that wrote nothing answers with the store's
//! current revision, which may belong to a write under another prefix (an
//! authorization rule, a token). The view reaches such a revision only
//! through the watch's progress batches, so a waiter that is ahead of the
//! view asks the follow task for progress ([`Reporter::progress_due`]),
//! and the follow task asks the watch ([`super::WatchStream::request_progress`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::Revision;

/// How long a follow task waits for an answer to a progress request before
/// asking again (etcd answers only once the watch has caught up).
const ASK_AGAIN: Duration = Duration::from_millis(250);

/// The waiters' side: cheap to clone.
#[derive(Clone)]
pub struct Applied {
    applied: watch::Receiver<Revision>,
    wanted: Arc<watch::Sender<Revision>>,
}

/// The follow task's side: publishes what the view applied and learns
/// what waiters want.
pub struct Reporter {
    applied: watch::Sender<Revision>,
    wanted: watch::Receiver<Revision>,
    /// When to ask for progress again while a waiter is still ahead.
    ask_again: Option<Instant>,
}

/// A pair for a view that starts at `revision`.
pub fn channel(revision: Revision) -> (Applied, Reporter) {
    let (applied_tx, applied) = watch::channel(revision);
    let (wanted_tx, wanted) = watch::channel(revision);
    (
        Applied {
            applied,
            wanted: Arc::new(wanted_tx),
        },
        Reporter {
            applied: applied_tx,
            wanted,
            ask_again: None,
        },
    )
}

// === impl Applied ===

impl Applied {
    /// The revision the view has applied.
    pub fn current(&self) -> Revision {
        *self.applied.borrow()
    }

    /// Waits until the view has applied `revision` (it may be a revision of
    /// another prefix: the view then reaches it through progress).
    pub async fn wait(&self, revision: Revision) {
        let mut applied = self.applied.clone();
        if *applied.borrow_and_update() >= revision {
            return;
        }
        self.wanted.send_if_modified(|w| {
            let ahead = *w < revision;
            if ahead {
                *w = revision;
            }
            ahead
        });
        let _ = applied.wait_for(|r| *r >= revision).await;
    }
}

// === impl Reporter ===

impl Reporter {
    /// The view has applied everything up to `revision`.
    pub fn applied(&mut self, revision: Revision) {
        self.applied.send_replace(revision);
        if *self.wanted.borrow() <= revision {
            self.ask_again = None;
        }
    }

    /// Resolves when the follow task should ask its watch for progress: a
    /// waiter wants a revision beyond `current`, and either nobody asked
    /// yet or the last request went unanswered for [`ASK_AGAIN`]. Pending
    /// otherwise. Cancel-safe: state lives in `self`.
    pub async fn progress_due(&mut self, current: Revision) {
        loop {
            let wanted = *self.wanted.borrow_and_update();
            if wanted <= current {
                self.ask_again = None;
                if self.wanted.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
                continue;
            }
            if let Some(at) = self.ask_again {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    changed = self.wanted.changed() => {
                        if changed.is_err() {
                            std::future::pending::<()>().await;
                        }
                        continue;
                    }
                }
            }
            self.ask_again = Some(Instant::now() + ASK_AGAIN);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_waiter_ahead_of_the_view_asks_for_progress_until_it_is_reached() {
        let (applied, mut reporter) = channel(5);
        // Nobody waits: nothing is due.
        let due = tokio::time::timeout(Duration::from_secs(10), reporter.progress_due(5)).await;
        assert!(due.is_err(), "progress asked for with no waiter");

        let waiter = tokio::spawn({
            let applied = applied.clone();
            async move { applied.wait(9).await }
        });
        // The waiter is ahead: due at once, then again every ASK_AGAIN.
        let start = Instant::now();
        reporter.progress_due(5).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        reporter.progress_due(5).await;
        assert_eq!(start.elapsed(), ASK_AGAIN);
        // Progress arrives: the waiter is released and nothing more is due.
        reporter.applied(9);
        waiter.await.unwrap();
        let due = tokio::time::timeout(Duration::from_secs(10), reporter.progress_due(9)).await;
        assert!(
            due.is_err(),
            "progress asked for after the waiter was served"
        );
    }

    #[tokio::test]
    async fn a_waiter_at_or_behind_the_view_returns_at_once() {
        let (applied, _reporter) = channel(7);
        applied.wait(3).await;
        applied.wait(7).await;
        assert_eq!(applied.current(), 7);
    }
}
