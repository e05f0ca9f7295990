//! The single writer thread: group commit of queued requests.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use redb::{ReadableMultimapTable, ReadableTable, WriteTransaction};
use tokio::sync::{mpsc, oneshot};

use super::{
    KV, LEASE_KEYS, LEASES, LeaseState, META, Request, Shared, decode_kv, encode_kv, lease_of,
    unavailable,
};
use crate::store::{
    Compare, Event, KeyValue, LeaseId, Op, Revision, StoreError, Txn, TxnOutcome, WatchBatch,
};

pub(super) struct Writer {
    shared: Arc<Shared>,
    db: Arc<redb::Database>,
    revision: Revision,
}

/// What one request produced inside a batch, delivered after the commit.
enum Done {
    Txn(
        oneshot::Sender<Result<TxnOutcome, StoreError>>,
        Result<TxnOutcome, StoreError>,
    ),
    Grant(
        oneshot::Sender<Result<LeaseId, StoreError>>,
        Result<(LeaseId, Duration), StoreError>,
    ),
    Revoke(
        oneshot::Sender<Result<(), StoreError>>,
        Result<LeaseId, StoreError>,
    ),
}

impl Writer {
    pub(super) fn new(shared: Arc<Shared>, db: Arc<redb::Database>, revision: Revision) -> Self {
        Writer {
            shared,
            db,
            revision,
        }
    }

    /// Runs until closed or every store handle is dropped; then releases
    /// the database.
    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let mut open = true;
        while open {
            let Some(first) = rx.blocking_recv() else {
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
            if !batch.is_empty() {
                self.commit_batch(batch);
            }
        }
        rx.close();
        while let Ok(late) = rx.try_recv() {
            late.fail(StoreError::Closed);
        }
    }

    fn commit_batch(&mut self, batch: Vec<Request>) {
        let start_rev = self.revision;
        let mut done = Vec::with_capacity(batch.len());
        let mut produced: Vec<WatchBatch> = Vec::new();
        let result = (|| -> Result<(), StoreError> {
            let w = self.db.begin_write().map_err(unavailable)?;
            for req in batch {
                done.push(match req {
                    Request::Txn(txn, reply) => {
                        let r = self.apply_txn(&w, txn, &mut produced);
                        Done::Txn(reply, r)
                    }
                    Request::Grant(ttl, reply) => Done::Grant(reply, self.grant(&w, ttl)),
                    Request::Revoke(id, reply) => {
                        let r = self.revoke(&w, id, &mut produced).map(|()| id);
                        Done::Revoke(reply, r)
                    }
                    Request::Close => unreachable!("handled before the batch"),
                });
            }
            w.open_table(META)
                .map_err(unavailable)?
                .insert("revision", self.revision)
                .map_err(unavailable)?;
            w.commit().map_err(unavailable)
        })();

        if let Err(e) = result {
            // Nothing of this batch is on disk: fail every caller.
            self.revision = start_rev;
            tracing::error!(error = %e, "store commit failed");
            for d in done {
                let msg = e.to_string();
                match d {
                    Done::Txn(r, _) => drop(r.send(Err(StoreError::Unavailable(msg)))),
                    Done::Grant(r, _) => drop(r.send(Err(StoreError::Unavailable(msg)))),
                    Done::Revoke(r, _) => drop(r.send(Err(StoreError::Unavailable(msg)))),
                }
            }
            return;
        }

        // Durable: publish to watchers (under the history lock, so a new
        // watcher sees each revision exactly once), then answer callers.
        {
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
        let now = Instant::now();
        for d in done {
            match d {
                Done::Txn(reply, r) => drop(reply.send(r)),
                Done::Grant(reply, r) => drop(reply.send(r.map(|(id, ttl)| {
                    let state = LeaseState {
                        ttl,
                        deadline: now + ttl,
                    };
                    self.shared
                        .leases
                        .lock()
                        .expect("lease lock")
                        .insert(id, state);
                    id
                }))),
                Done::Revoke(reply, r) => drop(reply.send(r.map(|id| {
                    self.shared.leases.lock().expect("lease lock").remove(&id);
                }))),
            }
        }
    }

    fn apply_txn(
        &mut self,
        w: &WriteTransaction,
        txn: Txn,
        produced: &mut Vec<WatchBatch>,
    ) -> Result<TxnOutcome, StoreError> {
        let mut kv = w.open_table(KV).map_err(unavailable)?;
        for c in &txn.compares {
            let Compare::ModRevision { key, revision } = c;
            let current = kv
                .get(key.as_str())
                .map_err(unavailable)?
                .map(|g| decode_kv(key, g.value()).mod_revision)
                .unwrap_or(0);
            if current != *revision {
                return Ok(TxnOutcome {
                    succeeded: false,
                    revision: self.revision,
                });
            }
        }
        // Check leases before touching anything, so a bad op writes nothing.
        let leases = w.open_table(LEASES).map_err(unavailable)?;
        for op in &txn.ops {
            if let Op::Put { lease: Some(l), .. } = op
                && leases.get(*l).map_err(unavailable)?.is_none()
            {
                return Err(StoreError::LeaseNotFound(*l));
            }
        }
        if txn.ops.is_empty() {
            return Ok(TxnOutcome {
                succeeded: true,
                revision: self.revision,
            });
        }
        let rev = self.revision + 1;
        let mut events = Vec::with_capacity(txn.ops.len());
        // Each key's lease is indexed in the same transaction as the key,
        // so the index is exactly as durable as what it indexes.
        let mut by_lease = w.open_multimap_table(LEASE_KEYS).map_err(unavailable)?;
        for op in txn.ops {
            match op {
                Op::Put { key, value, lease } => {
                    let before = kv
                        .insert(key.as_str(), encode_kv(rev, lease, &value).as_slice())
                        .map_err(unavailable)?
                        .and_then(|old| lease_of(old.value()));
                    if before != lease {
                        if let Some(old) = before {
                            by_lease.remove(old, key.as_str()).map_err(unavailable)?;
                        }
                        if let Some(new) = lease {
                            by_lease.insert(new, key.as_str()).map_err(unavailable)?;
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
                    if let Some(old) = kv.remove(key.as_str()).map_err(unavailable)? {
                        if let Some(lease) = lease_of(old.value()) {
                            by_lease.remove(lease, key.as_str()).map_err(unavailable)?;
                        }
                        events.push(Event::Delete { key });
                    }
                }
            }
        }
        if events.is_empty() {
            return Ok(TxnOutcome {
                succeeded: true,
                revision: self.revision,
            });
        }
        self.revision = rev;
        produced.push(WatchBatch {
            revision: rev,
            events,
        });
        Ok(TxnOutcome {
            succeeded: true,
            revision: rev,
        })
    }

    fn grant(
        &mut self,
        w: &WriteTransaction,
        ttl: Duration,
    ) -> Result<(LeaseId, Duration), StoreError> {
        let mut meta = w.open_table(META).map_err(unavailable)?;
        let id = meta
            .get("next_lease")
            .map_err(unavailable)?
            .map(|g| g.value())
            .unwrap_or(1);
        meta.insert("next_lease", id + 1).map_err(unavailable)?;
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        w.open_table(LEASES)
            .map_err(unavailable)?
            .insert(id, ttl_ms)
            .map_err(unavailable)?;
        Ok((id, ttl))
    }

    fn revoke(
        &mut self,
        w: &WriteTransaction,
        id: LeaseId,
        produced: &mut Vec<WatchBatch>,
    ) -> Result<(), StoreError> {
        if w.open_table(LEASES)
            .map_err(unavailable)?
            .remove(id)
            .map_err(unavailable)?
            .is_none()
        {
            return Err(StoreError::LeaseNotFound(id));
        }
        // The lease's keys from the index, not a scan of every key: a
        // session ending must not cost the one writer time in proportion
        // to the whole store.
        let keys: Vec<String> = {
            let by_lease = w.open_multimap_table(LEASE_KEYS).map_err(unavailable)?;
            let mut keys = Vec::new();
            for k in by_lease.get(id).map_err(unavailable)? {
                keys.push(k.map_err(unavailable)?.value().to_owned());
            }
            keys
        };
        let txn = keys.into_iter().fold(Txn::default(), |t, k| t.delete(k));
        self.apply_txn(w, txn, produced).map(|_| ())
    }
}

impl Request {
    fn fail(self, e: StoreError) {
        match self {
            Request::Txn(_, r) => drop(r.send(Err(e))),
            Request::Grant(_, r) => drop(r.send(Err(e))),
            Request::Revoke(_, r) => drop(r.send(Err(e))),
            Request::Close => {}
        }
    }
}
