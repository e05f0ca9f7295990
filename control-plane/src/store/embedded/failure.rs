//! The state of a writer whose file failed, and the batch whose commit
//! failed (`recover.rs` acts on them).

use std::{
    sync::Weak,
    time::{Duration, Instant},
};

use redb::Database;

use crate::store::{LeaseId, Revision, StoreError, WatchBatch};

/// A batch whose commit failed with an I/O error: usually nothing of it
/// is on disk, but an error while syncing leaves that open. The reopen
/// reads the file's revision and, if the batch is there, publishes it.
pub(super) struct Pending {
    pub(super) to: Revision,
    pub(super) produced: Vec<WatchBatch>,
    pub(super) grants: Vec<(LeaseId, Duration)>,
    pub(super) revokes: Vec<LeaseId>,
}

/// First wait before reopening, doubled after each failed attempt.
pub(super) const FIRST_RETRY: Duration = Duration::from_millis(100);
/// Longest wait between attempts.
pub(super) const MAX_RETRY: Duration = Duration::from_secs(5);
/// Wait while a read still holds the old database.
pub(super) const READ_WAIT: Duration = Duration::from_millis(10);

pub(super) struct Failed {
    /// The error that failed the store.
    pub(super) cause: String,
    /// Why the latest reopen did not work.
    pub(super) last_attempt: Option<String>,
    pub(super) attempts: u32,
    pub(super) backoff: Duration,
    pub(super) next: Instant,
    /// The failed database: a reopen waits until no read holds it.
    pub(super) old: Weak<Database>,
    /// The batch that failed in its commit, in case it landed after all.
    pub(super) pending: Option<Pending>,
}

impl Failed {
    pub(super) fn next_attempt(&self) -> Instant {
        self.next
    }

    /// What every caller is answered while the store is failed.
    pub(super) fn refusal(&self) -> StoreError {
        StoreError::Unavailable(self.describe())
    }

    pub(super) fn describe(&self) -> String {
        let mut text = format!("embedded store: {}; writes are refused", self.cause);
        match &self.last_attempt {
            Some(e) => text.push_str(&format!(
                " until the file can be reopened (attempt {} failed: {e})",
                self.attempts
            )),
            None => text.push_str(" until the file is reopened"),
        }
        text
    }
}
