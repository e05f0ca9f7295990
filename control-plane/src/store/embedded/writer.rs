//! The single writer thread: group commit of queued requests.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use redb::{Database, ReadableMultimapTable, ReadableTable, WriteTransaction};
use tokio::sync::{mpsc, oneshot};

use super::{
    KV, LEASE_KEYS, LEASES, LeaseState, META, Request, Shared, encode_kv,
    failure::{Failed, Pending},
    file::{self, Opener, decode_kv, lease_of},
};
use crate::store::{
    Compare, Event, KeyValue, LeaseId, Op, Revision, StoreError, Txn, TxnOutcome, WatchBatch,
};

pub(super) struct Writer {
    pub(super) shared: Arc<Shared>,
    /// `None` while failed: dropped, so the file can be reopened.
    pub(super) db: Option<Arc<Database>>,
    pub(super) revision: Revision,
    pub(super) open: Opener,
    pub(super) failed: Option<Failed>,
}

/// The work of one queued request.
enum Work {
    Txn(Txn),
    Grant(Duration),
    Revoke(LeaseId),
}

/// Where its answer goes.
enum Reply {
    Txn(oneshot::Sender<Result<TxnOutcome, StoreError>>),
    Grant(oneshot::Sender<Result<LeaseId, StoreError>>),
    Revoke(oneshot::Sender<Result<(), StoreError>>),
}

/// What one request produced inside a batch, delivered after the commit.
enum Outcome {
    Txn(Result<TxnOutcome, StoreError>),
    Grant(Result<(LeaseId, Duration), StoreError>),
    Revoke(Result<LeaseId, StoreError>),
}

/// An error of the file itself (I/O, corruption): the batch is not
/// committed, and the database must be reopened before the next.
pub(super) struct Fatal(pub(super) String);

fn fatal(e: impl std::fmt::Display) -> Fatal {
    Fatal(e.to_string())
}

impl Writer {
    pub(super) fn new(
        shared: Arc<Shared>,
        db: Arc<Database>,
        revision: Revision,
        open: Opener,
    ) -> Self {
        Writer {
            shared,
            db: Some(db),
            revision,
            open,
            failed: None,
        }
    }

    /// Runs until closed or every store handle is dropped; then releases
    /// the database. While failed, every request is answered with the
    /// cause at once, and the file is reopened with backoff.
    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Request>, rt: tokio::runtime::Runtime) {
        let mut open = true;
        while open {
            let first = match self.failed.as_ref().map(Failed::next_attempt) {
                None => rt.block_on(rx.recv()),
                Some(at) => match rt
                    .block_on(async { tokio::time::timeout_at(at.into(), rx.recv()).await })
                {
                    Ok(first) => first,
                    Err(_) => {
                        self.recover();
                        continue;
                    }
                },
            };
            let Some(first) = first else {
                break;
            };
            let mut batch = vec![first];
            while batch.len() < super::MAX_BATCH {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            if let Some(at) = batch.iter().position(|r| matches!(r, Request::Close)) {
                open = false;
                for late in batch.drain(at..) {
                    late.fail(StoreError::Closed);
                }
            }
            if batch.is_empty() {
                continue;
            }
            match &self.failed {
                Some(failed) => {
                    for r in batch {
                        r.fail(failed.refusal());
                    }
                }
                None => self.commit_batch(batch),
            }
        }
        rx.close();
        while let Ok(late) = rx.try_recv() {
            late.fail(StoreError::Closed);
        }
    }

    /// Commits a batch and answers its callers. A failure of the file
    /// (an error, or a panic inside redb) answers every caller of the
    /// batch with it, and leaves the writer failed until a reopen works.
    fn commit_batch(&mut self, batch: Vec<Request>) {
        let (work, replies): (Vec<Work>, Vec<Reply>) =
            batch.into_iter().filter_map(Request::split).unzip();
        let start_rev = self.revision;
        let committed =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.commit(work)));
        let failure = match committed {
            Ok(Ok((outcomes, produced))) => {
                self.publish(produced);
                self.answer(replies, outcomes);
                return;
            }
            Ok(Err((Fatal(cause), pending))) => (cause, pending),
            Err(panic) => (
                format!("redb panicked: {}", file::panic_text(&*panic)),
                None,
            ),
        };
        self.revision = start_rev;
        let (cause, pending) = failure;
        self.fail(cause, pending);
        for reply in replies {
            reply.fail(
                self.failed
                    .as_ref()
                    .map_or(StoreError::Closed, Failed::refusal),
            );
        }
    }

    /// Applies every request in one write transaction and commits it.
    #[allow(clippy::type_complexity)]
    fn commit(
        &mut self,
        work: Vec<Work>,
    ) -> Result<(Vec<Outcome>, Vec<WatchBatch>), (Fatal, Option<Pending>)> {
        let mut outcomes = Vec::with_capacity(work.len());
        let mut produced: Vec<WatchBatch> = Vec::new();
        let db = self.db.clone().ok_or((Fatal("not open".into()), None))?;
        let w = db.begin_write().map_err(|e| (fatal(e), None))?;
        for item in work {
            let outcome = match item {
                Work::Txn(txn) => self.apply_txn(&w, txn, &mut produced).map(Outcome::Txn),
                Work::Grant(ttl) => self.grant(&w, ttl).map(Outcome::Grant),
                Work::Revoke(id) => self.revoke(&w, id, &mut produced).map(Outcome::Revoke),
            };
            outcomes.push(outcome.map_err(|f| (f, None))?);
        }
        file::write_revision(&w, self.revision).map_err(|e| (fatal(e), None))?;
        if let Err(e) = w.commit() {
            let pending = Pending {
                to: self.revision,
                produced,
                grants: outcomes.iter().filter_map(Outcome::granted).collect(),
                revokes: outcomes.iter().filter_map(Outcome::revoked).collect(),
            };
            return Err((fatal(e), Some(pending)));
        }
        Ok((outcomes, produced))
    }

    /// Durable: publishes to watchers (under the history lock, so a new
    /// watcher sees each revision exactly once).
    pub(super) fn publish(&self, produced: Vec<WatchBatch>) {
        let mut history = self.shared.history.lock().expect("history lock");
        for b in produced {
            let b = Arc::new(b);
            history.batches.push_back(b.clone());
            if history.batches.len() > super::HISTORY
                && let Some(old) = history.batches.pop_front()
            {
                history.start = old.revision;
            }
            let _ = self.shared.events.send(b);
        }
    }

    /// Durable leases enter the reaper's table; revoked ones leave it.
    pub(super) fn track_leases(&self, grants: &[(LeaseId, Duration)], revokes: &[LeaseId]) {
        let now = Instant::now();
        let mut leases = self.shared.leases.lock().expect("lease lock");
        for &(id, ttl) in grants {
            leases.insert(
                id,
                LeaseState {
                    ttl,
                    deadline: now + ttl,
                },
            );
        }
        for id in revokes {
            leases.remove(id);
        }
    }

    fn answer(&self, replies: Vec<Reply>, outcomes: Vec<Outcome>) {
        let grants: Vec<_> = outcomes.iter().filter_map(Outcome::granted).collect();
        let revokes: Vec<_> = outcomes.iter().filter_map(Outcome::revoked).collect();
        self.track_leases(&grants, &revokes);
        for (reply, outcome) in replies.into_iter().zip(outcomes) {
            match (reply, outcome) {
                (Reply::Txn(r), Outcome::Txn(o)) => drop(r.send(o)),
                (Reply::Grant(r), Outcome::Grant(o)) => drop(r.send(o.map(|(id, _)| id))),
                (Reply::Revoke(r), Outcome::Revoke(o)) => drop(r.send(o.map(|_| ()))),
                (reply, _) => reply.fail(StoreError::Unavailable(
                    "embedded store: answer of another kind (a bug)".into(),
                )),
            }
        }
    }

    /// Applies one transaction inside the batch's write transaction. The
    /// inner result is the caller's (a failed compare, an unknown lease, a
    /// damaged value); the outer one fails the whole batch.
    fn apply_txn(
        &mut self,
        w: &WriteTransaction,
        txn: Txn,
        produced: &mut Vec<WatchBatch>,
    ) -> Result<Result<TxnOutcome, StoreError>, Fatal> {
        let mut kv = w.open_table(KV).map_err(fatal)?;
        for c in &txn.compares {
            let Compare::ModRevision { key, revision } = c;
            let current = match kv.get(key.as_str()).map_err(fatal)? {
                Some(g) => match decode_kv(key, g.value()) {
                    Ok(stored) => stored.mod_revision,
                    Err(e) => return Ok(Err(e)),
                },
                None => 0,
            };
            if current != *revision {
                return Ok(Ok(TxnOutcome {
                    succeeded: false,
                    revision: self.revision,
                }));
            }
        }
        // Check leases before touching anything, so a bad op writes nothing.
        let leases = w.open_table(LEASES).map_err(fatal)?;
        for op in &txn.ops {
            if let Op::Put { lease: Some(l), .. } = op
                && leases.get(*l).map_err(fatal)?.is_none()
            {
                return Ok(Err(StoreError::LeaseNotFound(*l)));
            }
        }
        if txn.ops.is_empty() {
            return Ok(Ok(TxnOutcome {
                succeeded: true,
                revision: self.revision,
            }));
        }
        let rev = self.revision + 1;
        let mut events = Vec::with_capacity(txn.ops.len());
        // Each key's lease is indexed in the same transaction as the key,
        // so the index is exactly as durable as what it indexes.
        let mut by_lease = w.open_multimap_table(LEASE_KEYS).map_err(fatal)?;
        for op in txn.ops {
            match op {
                Op::Put { key, value, lease } => {
                    let before = kv
                        .insert(key.as_str(), encode_kv(rev, lease, &value).as_slice())
                        .map_err(fatal)?
                        .and_then(|old| lease_of(old.value()));
                    if before != lease {
                        if let Some(old) = before {
                            by_lease.remove(old, key.as_str()).map_err(fatal)?;
                        }
                        if let Some(new) = lease {
                            by_lease.insert(new, key.as_str()).map_err(fatal)?;
                        }
                    }
                    events.push(Event::Put(KeyValue {
                        key,
                        value,
                        mod_revision: rev,
                        lease,
                    }));
                }
                Op::Delete { key } => {
                    if let Some(old) = kv.remove(key.as_str()).map_err(fatal)? {
                        if let Some(lease) = lease_of(old.value()) {
                            by_lease.remove(lease, key.as_str()).map_err(fatal)?;
                        }
                        events.push(Event::Delete { key });
                    }
                }
            }
        }
        if events.is_empty() {
            return Ok(Ok(TxnOutcome {
                succeeded: true,
                revision: self.revision,
            }));
        }
        self.revision = rev;
        produced.push(WatchBatch {
            revision: rev,
            events,
        });
        Ok(Ok(TxnOutcome {
            succeeded: true,
            revision: rev,
        }))
    }

    fn grant(
        &mut self,
        w: &WriteTransaction,
        ttl: Duration,
    ) -> Result<Result<(LeaseId, Duration), StoreError>, Fatal> {
        let mut meta = w.open_table(META).map_err(fatal)?;
        let id = meta
            .get("next_lease")
            .map_err(fatal)?
            .map(|g| g.value())
            .unwrap_or(1);
        meta.insert("next_lease", id + 1).map_err(fatal)?;
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        w.open_table(LEASES)
            .map_err(fatal)?
            .insert(id, ttl_ms)
            .map_err(fatal)?;
        Ok(Ok((id, ttl)))
    }

    fn revoke(
        &mut self,
        w: &WriteTransaction,
        id: LeaseId,
        produced: &mut Vec<WatchBatch>,
    ) -> Result<Result<LeaseId, StoreError>, Fatal> {
        if w.open_table(LEASES)
            .map_err(fatal)?
            .remove(id)
            .map_err(fatal)?
            .is_none()
        {
            return Ok(Err(StoreError::LeaseNotFound(id)));
        }
        // The lease's keys from the index, not a scan of every key: a
        // session ending must not cost the one writer time in proportion
        // to the whole store.
        let keys: Vec<String> = {
            let by_lease = w.open_multimap_table(LEASE_KEYS).map_err(fatal)?;
            let mut keys = Vec::new();
            for k in by_lease.get(id).map_err(fatal)? {
                keys.push(k.map_err(fatal)?.value().to_owned());
            }
            keys
        };
        let txn = keys.into_iter().fold(Txn::default(), |t, k| t.delete(k));
        Ok(self.apply_txn(w, txn, produced)?.map(|_| id))
    }
}

// === impl Request ===

impl Request {
    /// The work and where its answer goes; `None` for `Close`.
    fn split(self) -> Option<(Work, Reply)> {
        Some(match self {
            Request::Txn(txn, r) => (Work::Txn(txn), Reply::Txn(r)),
            Request::Grant(ttl, r) => (Work::Grant(ttl), Reply::Grant(r)),
            Request::Revoke(id, r) => (Work::Revoke(id), Reply::Revoke(r)),
            Request::Close => return None,
        })
    }

    fn fail(self, e: StoreError) {
        if let Some((_, reply)) = self.split() {
            reply.fail(e);
        }
    }
}

// === impl Reply ===

impl Reply {
    fn fail(self, e: StoreError) {
        match self {
            Reply::Txn(r) => drop(r.send(Err(e))),
            Reply::Grant(r) => drop(r.send(Err(e))),
            Reply::Revoke(r) => drop(r.send(Err(e))),
        }
    }
}

// === impl Outcome ===

impl Outcome {
    fn granted(&self) -> Option<(LeaseId, Duration)> {
        match self {
            Outcome::Grant(Ok(g)) => Some(*g),
            _ => None,
        }
    }

    fn revoked(&self) -> Option<LeaseId> {
        match self {
            Outcome::Revoke(Ok(id)) => Some(*id),
            _ => None,
        }
    }
}
