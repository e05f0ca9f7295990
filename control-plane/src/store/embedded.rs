//! The default store: a redb file in the data directory.
//!
//! One writer thread owns the database. Callers queue transactions; the
//! writer takes everything queued, applies it in a single redb write
//! transaction and commits once (fsync), then answers each caller. That group
//! commit is what lets durable writes scale with concurrency instead of with
//! the disk's fsync rate. Watchers are served from an in-memory history of
//! recent revisions plus a broadcast of new ones.
//!
//! Faults: a damaged file is an error at open naming it (`file`); after an
//! I/O error (a full disk) the writer answers every caller UNAVAILABLE with
//! the cause and reopens the file with backoff until a commit works again
//! (`failure`, `recover`), and [`Store::health`] says so meanwhile.

use std::{
    collections::{HashMap, VecDeque},
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use isdp_xds::LogRate;
use redb::{Database, MultimapTableDefinition, ReadableDatabase, TableDefinition};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::{
    Event, KeyValue, LeaseId, Revision, Store, StoreError, StoreHealth, Txn, TxnOutcome,
    WatchBatch, WatchStream,
};
use file::decode_kv;

/// key -> [mod_revision u64 LE][lease u64 LE, 0 = none][value].
const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
/// "revision", "next_lease".
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// lease id -> ttl in milliseconds. Leases restart their full TTL when the
/// store opens, as etcd's do on a leader change.
const LEASES: TableDefinition<u64, u64> = TableDefinition::new("leases");
/// lease id -> the keys put under it: revoking a lease (a session ending)
/// reads its keys here instead of scanning every key in the writer thread.
/// Written in the same transactions as the keys; built once from the keys
/// when a store written before it existed is opened ("lease_index" in
/// META says it is complete).
const LEASE_KEYS: MultimapTableDefinition<u64, &str> = MultimapTableDefinition::new("lease_keys");

/// Revisions kept for watchers that resume from the past.
const HISTORY: usize = 16_384;
/// Most transactions folded into one commit.
const MAX_BATCH: usize = 4_096;
/// A watcher behind a steady stream of commits outside its prefix reports
/// progress at least this often, so a writer waiting on it is not starved.
const PROGRESS_EVERY: usize = 64;

#[derive(Clone)]
pub struct EmbeddedStore {
    shared: Arc<Shared>,
    writer: mpsc::Sender<Request>,
    /// Turns true once the writer thread has released the database file.
    closed: tokio::sync::watch::Receiver<bool>,
}

struct Shared {
    /// The open database for reads; the writer swaps it on a reopen, and
    /// [`EmbeddedStore::close`] takes it out, so the file is released even
    /// while other handles (timers, tasks) still exist.
    db: std::sync::RwLock<Slot>,
    /// Recent revisions, oldest first, plus the revision before the oldest
    /// one kept (watching from earlier than that needs a resync).
    history: Mutex<History>,
    events: broadcast::Sender<Arc<WatchBatch>>,
    leases: Mutex<HashMap<LeaseId, LeaseState>>,
    /// Set by the writer: why writes fail now, and how often they have.
    health: Mutex<StoreHealth>,
}

/// The database as readers find it.
enum Slot {
    Open(Arc<Database>),
    /// An I/O error stopped the database; the writer is reopening it.
    Failed(String),
    Closed,
}

struct History {
    batches: VecDeque<Arc<WatchBatch>>,
    start: Revision,
}

struct LeaseState {
    ttl: Duration,
    deadline: Instant,
}

enum Request {
    Txn(Txn, oneshot::Sender<Result<TxnOutcome, StoreError>>),
    Grant(Duration, oneshot::Sender<Result<LeaseId, StoreError>>),
    Revoke(LeaseId, oneshot::Sender<Result<(), StoreError>>),
    /// Finish what is queued before this, then release the database.
    Close,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("embedded store: {e}"))
}

// === impl EmbeddedStore ===

impl EmbeddedStore {
    /// Opens (or creates) `<dir>/store.redb` and starts the writer thread and
    /// the lease reaper. The reaper stops when the last handle is dropped.
    /// A new directory is made 0700 and a new file 0600 (redb itself would
    /// create it with the umask's mode). A file that cannot be opened or
    /// read (damaged, truncated, in use) is an error naming it and what to
    /// do.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        crate::data_dir::create_dir(dir).map_err(unavailable)?;
        let path = dir.join(crate::data_dir::STORE_FILE);
        crate::data_dir::create_secret_file(&path).map_err(unavailable)?;
        Self::open_with(&path, file::opener(path.clone()))
    }

    /// Opens the database `open` gives (the file at `path`, or in tests a
    /// backend that fails on demand).
    fn open_with(path: &Path, open: file::Opener) -> Result<Self, StoreError> {
        let db = file::open(&open)
            .map_err(|cause| file::startup_error(path, &cause, file::already_open(&cause)))?;
        let loaded = file::load(&db).map_err(|cause| file::startup_error(path, &cause, false))?;
        let (events, _) = broadcast::channel(HISTORY);
        let db = Arc::new(db);
        let shared = Arc::new(Shared {
            db: std::sync::RwLock::new(Slot::Open(db.clone())),
            history: Mutex::new(History {
                batches: VecDeque::new(),
                start: loaded.revision,
            }),
            events,
            leases: Mutex::new(loaded.leases),
            health: Mutex::new(StoreHealth::default()),
        });
        let (tx, rx) = mpsc::channel(MAX_BATCH * 4);
        let writer = Writer::new(shared.clone(), db, loaded.revision, open);
        let writer_shared = shared.clone();
        let (closed_tx, closed) = tokio::sync::watch::channel(false);
        // The writer's own clock, to wait for requests and for its next
        // reopen attempt at once.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(unavailable)?;
        std::thread::Builder::new()
            .name("isdp-store-writer".into())
            .spawn(move || {
                let run = std::panic::AssertUnwindSafe(|| writer.run(rx, rt));
                if let Err(panic) = std::panic::catch_unwind(run) {
                    let cause = format!(
                        "the store's writer thread stopped ({}); restart the control plane",
                        file::panic_text(&*panic)
                    );
                    tracing::error!(error = %cause, "store writer panicked");
                    let mut health = writer_shared.health.lock().expect("health lock");
                    health.failures += 1;
                    health.problem = Some(cause.clone());
                    let mut slot = writer_shared.db.write().expect("db lock");
                    if !matches!(*slot, Slot::Closed) {
                        *slot = Slot::Failed(format!("embedded store: {cause}"));
                    }
                }
                let _ = closed_tx.send(true);
            })
            .map_err(unavailable)?;
        let store = EmbeddedStore {
            shared,
            writer: tx,
            closed,
        };
        tokio::spawn(reap_leases(
            Arc::downgrade(&store.shared),
            store.writer.downgrade(),
        ));
        Ok(store)
    }

    /// Commits what is queued, then closes the database file so it can be
    /// opened again; every handle fails with [`StoreError::Closed`] after.
    pub async fn close(self) {
        *self.shared.db.write().expect("db lock") = Slot::Closed;
        let _ = self.writer.send(Request::Close).await;
        let mut closed = self.closed.clone();
        drop(self);
        let _ = closed.wait_for(|c| *c).await;
    }

    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Request,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .send(make(tx))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

/// Revokes leases whose keep-alives stopped; their keys go with them.
/// Runs as long as the store does: while the store cannot be written it
/// waits (the leases stay expired and are revoked once it recovers).
/// Clients cause expiries (a join token can open sessions and drop them),
/// so each is logged at info within a [`LogRate`] bound of the reaper's
/// own and at debug past it, the lines left out counted in one line.
async fn reap_leases(shared: std::sync::Weak<Shared>, writer: mpsc::WeakSender<Request>) {
    let log = LogRate::default();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        // The count of lines left out, once their window is over.
        log.tick();
        let (Some(shared), Some(writer)) = (shared.upgrade(), writer.upgrade()) else {
            return;
        };
        if !shared.health.lock().expect("health lock").is_healthy() {
            continue;
        }
        let now = Instant::now();
        let expired: Vec<LeaseId> = shared
            .leases
            .lock()
            .expect("lease lock")
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let (tx, rx) = oneshot::channel();
            if writer.send(Request::Revoke(id, tx)).await.is_err() {
                return;
            }
            match rx.await {
                Ok(Ok(())) if log.admit() => {
                    tracing::info!(lease = id, "lease expired; its keys were deleted");
                }
                Ok(Ok(())) => tracing::debug!(lease = id, "lease expired; its keys were deleted"),
                Ok(Err(StoreError::Closed)) | Err(_) => return,
                Ok(Err(e)) => {
                    tracing::warn!(lease = id, error = %e, "revoking expired lease; retrying");
                    break;
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let db = match &*self.shared.db.read().expect("db lock") {
            Slot::Open(db) => db.clone(),
            Slot::Failed(reason) => return Err(StoreError::Unavailable(reason.clone())),
            Slot::Closed => return Err(StoreError::Closed),
        };
        let prefix = prefix.to_owned();
        tokio::task::spawn_blocking(move || {
            let r = db.begin_read().map_err(unavailable)?;
            let rev = r
                .open_table(META)
                .map_err(unavailable)?
                .get("revision")
                .map_err(unavailable)?
                .map(|g| g.value())
                .unwrap_or(0);
            let table = r.open_table(KV).map_err(unavailable)?;
            let mut out = Vec::new();
            for row in table.range(prefix.as_str()..).map_err(unavailable)? {
                let (k, v) = row.map_err(unavailable)?;
                if !k.value().starts_with(&prefix) {
                    break;
                }
                out.push(decode_kv(k.value(), v.value())?);
            }
            Ok((out, rev))
        })
        .await
        .map_err(unavailable)?
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        self.request(|tx| Request::Txn(txn, tx)).await
    }

    fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream, StoreError> {
        let (backlog, rx) = {
            let history = self.shared.history.lock().expect("history lock");
            if after < history.start {
                return Err(StoreError::Compacted {
                    requested: after,
                    oldest: history.start,
                });
            }
            let backlog: VecDeque<Arc<WatchBatch>> = history
                .batches
                .iter()
                .filter(|b| b.revision > after)
                .cloned()
                .collect();
            (backlog, self.shared.events.subscribe())
        };
        let prefix = prefix.to_owned();
        let state = (backlog, rx, prefix, after, false);
        Ok(WatchStream::new(futures::stream::unfold(
            state,
            |(mut backlog, mut rx, prefix, mut last, done)| async move {
                if done {
                    return None;
                }
                // Commits outside the prefix seen since the last batch:
                // reported as progress once nothing more is queued (or
                // every PROGRESS_EVERY of them, under a steady stream).
                let mut skipped = 0usize;
                loop {
                    let batch = match backlog.pop_front() {
                        Some(b) => b,
                        None => match rx.recv().await {
                            Ok(b) => b,
                            Err(broadcast::error::RecvError::Lagged(_)) => {
                                let err = StoreError::Compacted {
                                    requested: last,
                                    oldest: last + 1,
                                };
                                return Some((Err(err), (backlog, rx, prefix, last, true)));
                            }
                            Err(broadcast::error::RecvError::Closed) => return None,
                        },
                    };
                    if batch.revision <= last {
                        continue;
                    }
                    last = batch.revision;
                    let events: Vec<Event> = batch
                        .events
                        .iter()
                        .filter(|e| e.key().starts_with(&prefix))
                        .cloned()
                        .collect();
                    let caught_up = backlog.is_empty() && rx.is_empty();
                    if events.is_empty() {
                        skipped += 1;
                        if !caught_up && skipped < PROGRESS_EVERY {
                            continue;
                        }
                    }
                    let out = WatchBatch {
                        revision: batch.revision,
                        events,
                    };
                    return Some((Ok(out), (backlog, rx, prefix, last, false)));
                }
            },
        )))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.request(|tx| Request::Grant(ttl, tx)).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut leases = self.shared.leases.lock().expect("lease lock");
        let state = leases
            .get_mut(&lease)
            .ok_or(StoreError::LeaseNotFound(lease))?;
        state.deadline = Instant::now() + state.ttl;
        Ok(())
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.request(|tx| Request::Revoke(lease, tx)).await
    }

    fn health(&self) -> StoreHealth {
        self.shared.health.lock().expect("health lock").clone()
    }
}

mod failure;
mod file;
mod recover;
mod writer;
use file::encode_kv;
use writer::Writer;

#[cfg(test)]
mod faults;
#[cfg(test)]
mod tests;
