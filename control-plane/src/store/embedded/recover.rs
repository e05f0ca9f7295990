//! The writer after a failure of the file (a full disk, an I/O error, a
//! panic inside redb): redb refuses every later operation ("Previous I/O
//! error occurred") until the database is reopened. So the writer answers
//! every caller at once with the cause, drops the database, and reopens it
//! with backoff; a reopen counts only once a commit has worked again. The
//! views keep serving what they hold meanwhile, and `/ready` says why the
//! store is failed.

use std::{sync::Arc, time::Instant};

use redb::{Database, ReadableDatabase};

use super::{
    Slot,
    failure::{FIRST_RETRY, Failed, MAX_RETRY, Pending, READ_WAIT},
    file,
    writer::Writer,
};
use crate::store::Revision;

// === impl Writer ===

impl Writer {
    /// Enters the failed state: the database is dropped (readers see the
    /// cause), health says why, and the first reopen is scheduled.
    pub(super) fn fail(&mut self, cause: String, pending: Option<Pending>) {
        let old = self
            .db
            .take()
            .map(|db| Arc::downgrade(&db))
            .unwrap_or_default();
        tracing::error!(error = %cause, "store write failed; refusing writes and reopening the store file");
        let failed = Failed {
            cause,
            last_attempt: None,
            attempts: 0,
            backoff: FIRST_RETRY,
            next: Instant::now() + FIRST_RETRY,
            old,
            pending,
        };
        self.show(&failed);
        {
            let mut health = self.shared.health.lock().expect("health lock");
            if health.problem.is_none() {
                health.failures += 1;
            }
            health.problem = Some(failed.cause.clone());
        }
        self.failed = Some(failed);
    }

    /// Readers are refused with what writers are told.
    fn show(&self, failed: &Failed) {
        let mut slot = self.shared.db.write().expect("db lock");
        if !matches!(*slot, Slot::Closed) {
            *slot = Slot::Failed(failed.describe());
        }
    }

    /// One reopen attempt, when its time has come.
    pub(super) fn recover(&mut self) {
        let Some(failed) = self.failed.as_mut() else {
            return;
        };
        if failed.old.strong_count() > 0 {
            failed.next = Instant::now() + READ_WAIT;
            return;
        }
        failed.attempts += 1;
        let mut pending = failed.pending.take();
        match self.reopen(&mut pending) {
            Ok(db) => {
                let attempts = self.failed.take().map_or(0, |f| f.attempts);
                {
                    let mut slot = self.shared.db.write().expect("db lock");
                    if matches!(*slot, Slot::Failed(_)) {
                        *slot = Slot::Open(db.clone());
                    }
                }
                self.db = Some(db);
                self.shared.health.lock().expect("health lock").problem = None;
                tracing::info!(attempts, "store file reopened; writes are accepted again");
            }
            Err(e) => {
                let Some(failed) = self.failed.as_mut() else {
                    return;
                };
                tracing::warn!(attempt = failed.attempts, error = %e, "reopening the store file");
                failed.pending = pending;
                failed.last_attempt = Some(e);
                failed.backoff = (failed.backoff * 2).min(MAX_RETRY);
                failed.next = Instant::now() + failed.backoff;
                let failed = self.failed.take();
                if let Some(failed) = failed {
                    self.show(&failed);
                    self.failed = Some(failed);
                }
            }
        }
    }

    /// Opens the file again, settles the batch whose commit failed, and
    /// proves writes work with a commit of their own.
    fn reopen(&mut self, pending: &mut Option<Pending>) -> Result<Arc<Database>, String> {
        let db = file::open(&self.open)?;
        let on_disk = file::revision(&db)?;
        self.settle(on_disk, pending);
        let w = db.begin_write().map_err(|e| e.to_string())?;
        file::write_revision(&w, self.revision).map_err(|e| e.to_string())?;
        w.commit().map_err(|e| e.to_string())?;
        // Reads must work too before readers are let back in.
        db.begin_read().map_err(|e| e.to_string())?;
        Ok(Arc::new(db))
    }

    /// The file's revision against the writer's: equal when the failed
    /// batch left nothing; the batch's own when it was committed after
    /// all (its callers were told it failed, which a caller must allow
    /// for: "nothing may be assumed"), so watchers get it now.
    fn settle(&mut self, on_disk: Revision, pending: &mut Option<Pending>) {
        if on_disk == self.revision {
            *pending = None;
            return;
        }
        match pending.take() {
            Some(p) if p.to == on_disk => {
                tracing::warn!(
                    revision = on_disk,
                    "a batch reported as failed was committed after all; publishing it"
                );
                self.revision = on_disk;
                self.track_leases(&p.grants, &p.revokes);
                self.publish(p.produced);
            }
            _ => {
                tracing::error!(
                    on_disk,
                    expected = self.revision,
                    "the reopened store file is at another revision; watchers resync"
                );
                self.revision = on_disk;
                let mut history = self.shared.history.lock().expect("history lock");
                history.batches.clear();
                history.start = on_disk;
            }
        }
    }
}
