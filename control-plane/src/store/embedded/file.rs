//! The store file: opening it (at startup, and again after an I/O error),
//! what is read from it once opened, and the layout of a stored value.

use std::{
    collections::HashMap,
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use redb::{Database, DatabaseError, ReadableDatabase, ReadableTable};

use super::{KV, LEASE_KEYS, LEASES, LeaseState, META};
use crate::store::{KeyValue, LeaseId, Revision, StoreError};

/// Bytes before the value in a stored row: mod revision, lease.
const HEADER: usize = 16;

/// Opens the database; called again after an I/O error, since redb
/// refuses every later operation until the file is reopened.
pub(super) type Opener = Arc<dyn Fn() -> Result<Database, DatabaseError> + Send + Sync>;

/// The real file, with every page's checksum verified on open: a file
/// altered outside redb fails to open rather than being trusted.
pub(super) fn opener(path: PathBuf) -> Opener {
    Arc::new(move || {
        Database::builder()
            .set_cache_size(16 << 20)
            .set_check_integrity_on_open(true)
            .create(&path)
    })
}

/// Opens the database, turning a panic inside redb (a damaged file it did
/// not expect) into an error like any other.
pub(super) fn open(open: &Opener) -> Result<Database, String> {
    match catch_unwind(AssertUnwindSafe(|| open())) {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => Err(format!("redb panicked: {}", panic_text(&*panic))),
    }
}

pub(super) fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_owned())
}

/// The startup error for a store file that cannot be opened or read:
/// the file, the cause, and what the operator can do about it.
pub(super) fn startup_error(path: &Path, cause: &str, already_open: bool) -> StoreError {
    let advice = if already_open {
        "another control plane is using this data directory; stop it or give this one \
         another --data-dir"
    } else {
        "the file is damaged or is not an ISDP store: restore it from a backup, or move it \
         aside to start with an empty store (its registrations, CA, tokens and policies are \
         then lost)"
    };
    StoreError::Unavailable(format!(
        "embedded store: cannot open {}: {cause}; {advice}",
        path.display()
    ))
}

/// Whether opening failed because the file is in use.
pub(super) fn already_open(cause: &str) -> bool {
    cause == DatabaseError::DatabaseAlreadyOpen.to_string()
}

/// What the store holds besides its keys, read once it is open.
pub(super) struct Loaded {
    pub revision: Revision,
    pub leases: HashMap<LeaseId, LeaseState>,
}

/// Creates the tables (and the lease index of a store written before it
/// existed) and reads the revision and the leases. Leases restart their
/// full TTL, as etcd's do on a leader change.
pub(super) fn load(db: &Database) -> Result<Loaded, String> {
    let w = db.begin_write().map_err(|e| e.to_string())?;
    let (revision, leases) = {
        index_leases(&w).map_err(|e| e.to_string())?;
        w.open_table(KV).map_err(|e| e.to_string())?;
        let rev = read_revision(&w.open_table(META).map_err(|e| e.to_string())?)?;
        let table = w.open_table(LEASES).map_err(|e| e.to_string())?;
        let now = Instant::now();
        let mut leases = HashMap::new();
        for row in table.iter().map_err(|e| e.to_string())? {
            let (id, ttl) = row.map_err(|e| e.to_string())?;
            let ttl = Duration::from_millis(ttl.value());
            leases.insert(
                id.value(),
                LeaseState {
                    ttl,
                    deadline: now + ttl,
                },
            );
        }
        (rev, leases)
    };
    w.commit().map_err(|e| e.to_string())?;
    Ok(Loaded { revision, leases })
}

/// The revision the file holds.
pub(super) fn revision(db: &Database) -> Result<Revision, String> {
    let r = db.begin_read().map_err(|e| e.to_string())?;
    match r.open_table(META) {
        Ok(meta) => read_revision(&meta),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
        Err(e) => Err(e.to_string()),
    }
}

fn read_revision(meta: &impl ReadableTable<&'static str, u64>) -> Result<Revision, String> {
    Ok(meta
        .get("revision")
        .map_err(|e| e.to_string())?
        .map(|g| g.value())
        .unwrap_or(0))
}

/// Records the store's revision in the transaction.
pub(super) fn write_revision(w: &redb::WriteTransaction, rev: Revision) -> Result<(), redb::Error> {
    w.open_table(META)?.insert("revision", rev)?;
    Ok(())
}

/// Builds the lease index of a store written before it existed: one scan,
/// at startup, outside any caller's wait.
fn index_leases(w: &redb::WriteTransaction) -> Result<(), redb::Error> {
    let mut meta = w.open_table(META)?;
    if meta.get("lease_index")?.is_some() {
        return Ok(());
    }
    let kv = w.open_table(KV)?;
    let mut by_lease = w.open_multimap_table(LEASE_KEYS)?;
    for row in kv.iter()? {
        let (k, v) = row?;
        if let Some(lease) = lease_of(v.value()) {
            by_lease.insert(lease, k.value())?;
        }
    }
    meta.insert("lease_index", 1)?;
    Ok(())
}

/// The lease of a stored value, without copying the value.
pub(super) fn lease_of(raw: &[u8]) -> Option<LeaseId> {
    let lease = u64::from_le_bytes(raw.get(8..HEADER)?.try_into().ok()?);
    (lease != 0).then_some(lease)
}

/// A stored row back as a [`KeyValue`]; a row too short for its header
/// (a damaged file) is an error naming the key, never a panic.
pub(super) fn decode_kv(key: &str, raw: &[u8]) -> Result<KeyValue, StoreError> {
    let (Some(rev), Some(lease)) = (raw.get(0..8), raw.get(8..HEADER)) else {
        return Err(StoreError::Unavailable(format!(
            "embedded store: the value of {key} is {} bytes, shorter than its {HEADER}-byte \
             header: the store file is damaged",
            raw.len()
        )));
    };
    let word = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes sliced"));
    let lease = word(lease);
    Ok(KeyValue {
        key: key.to_owned(),
        value: Bytes::copy_from_slice(&raw[HEADER..]),
        mod_revision: word(rev),
        lease: (lease != 0).then_some(lease),
    })
}

pub(super) fn encode_kv(rev: Revision, lease: Option<LeaseId>, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + value.len());
    out.extend_from_slice(&rev.to_le_bytes());
    out.extend_from_slice(&lease.unwrap_or(0).to_le_bytes());
    out.extend_from_slice(value);
    out
}
