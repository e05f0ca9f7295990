//! The writer's failure path, on a storage backend that fails on demand
//! the way a full disk does (every write, resize and sync: ENOSPC).

use std::{
    fs::OpenOptions,
    io,
    ops::Bound,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures::StreamExt;
use redb::{BackendError, Database, StorageBackend, backends::FileBackend};

use super::{EmbeddedStore, file};
use crate::store::{Store, StoreError, Txn};

/// The store file, failing like a full disk while `full` is set.
#[derive(Debug)]
struct Disk {
    file: FileBackend,
    full: Arc<AtomicBool>,
}

impl Disk {
    fn check(&self) -> io::Result<()> {
        if self.full.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(28)); // ENOSPC
        }
        Ok(())
    }
}

impl StorageBackend for Disk {
    fn len(&self) -> io::Result<u64> {
        self.file.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.file.read(offset, out)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check()?;
        self.file.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.check()?;
        self.file.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check()?;
        self.file.write(offset, data)
    }
    fn close(&self) -> io::Result<()> {
        self.file.close()
    }
    fn try_lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, BackendError> {
        self.file.try_lock_range(s, e)
    }
    fn try_lock_shared_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, BackendError> {
        self.file.try_lock_shared_range(s, e)
    }
    fn lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
        self.file.lock_range(s, e)
    }
    fn lock_shared_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
        self.file.lock_shared_range(s, e)
    }
    fn unlock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
        self.file.unlock_range(s, e)
    }
    fn query_lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, BackendError> {
        self.file.query_lock_range(s, e)
    }
}

/// A store on `dir` whose disk fills up while the flag is set.
fn store_on_disk(dir: &Path) -> (EmbeddedStore, Arc<AtomicBool>) {
    let full = Arc::new(AtomicBool::new(false));
    let path = dir.join(crate::data_dir::STORE_FILE);
    let flag = full.clone();
    let open: file::Opener = Arc::new(move || {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let disk = Disk {
            file: FileBackend::new(f)?,
            full: flag.clone(),
        };
        Database::builder()
            .set_check_integrity_on_open(true)
            .create_with_backend(disk)
    });
    let store = EmbeddedStore::open_with(&dir.join(crate::data_dir::STORE_FILE), open).unwrap();
    (store, full)
}

fn put(i: usize) -> Txn {
    Txn::default().put(format!("/k/{i:04}"), Bytes::from_static(b"v"), None)
}

fn failed_with_enospc(r: &Result<impl std::fmt::Debug, StoreError>) -> bool {
    matches!(r, Err(StoreError::Unavailable(m)) if m.contains("No space left on device"))
}

/// A full disk: every queued and later caller is answered UNAVAILABLE
/// naming the cause (none is dropped), health says why, reads of the
/// file are refused rather than hang; once space is back the writer
/// reopens the file by itself, and every acknowledged write is there.
#[tokio::test]
async fn a_full_disk_fails_every_caller_and_the_store_recovers_when_space_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let (store, full) = store_on_disk(dir.path());
    let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    store
        .txn(Txn::default().put("/k/leased", Bytes::from_static(b"l"), Some(lease)))
        .await
        .unwrap();
    for i in 0..10 {
        store.txn(put(i)).await.unwrap();
    }
    let mut watch = store.watch("/k/", 11).unwrap();
    assert!(store.health().is_healthy());

    full.store(true, Ordering::SeqCst);
    // Many callers at once: some fail in the commit, the rest are queued
    // behind it; every one gets an answer.
    let tasks: Vec<_> = (100..300)
        .map(|i| {
            let s = store.clone();
            tokio::spawn(async move { s.txn(put(i)).await })
        })
        .collect();
    for t in tasks {
        let r = t.await.unwrap();
        assert!(failed_with_enospc(&r), "{r:?}");
    }
    let health = store.health();
    assert!(
        health.problem.as_deref().unwrap().contains("No space left"),
        "{health:?}"
    );
    assert_eq!(health.failures, 1);
    assert!(failed_with_enospc(
        &store.grant_lease(Duration::from_secs(1)).await
    ));
    assert!(failed_with_enospc(&store.revoke(lease).await));
    assert!(failed_with_enospc(&store.range("/k/").await));

    // Still full after a few reopen attempts: still refused, same cause.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(failed_with_enospc(&store.txn(put(400)).await));

    full.store(false, Ordering::SeqCst);
    let recovered = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(out) = store.txn(put(500)).await {
                return out;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the store reopens by itself once space is back");
    assert_eq!(recovered.revision, 12, "no failed write took a revision");
    assert!(store.health().is_healthy());
    assert_eq!(store.health().failures, 1);

    // Watchers carry on from where they were; the lease still works.
    let b = watch.next().await.unwrap().unwrap();
    assert_eq!(b.revision, 12);
    let keys: Vec<String> = store
        .range("/k/")
        .await
        .unwrap()
        .0
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    let mut want: Vec<String> = (0..10).map(|i| format!("/k/{i:04}")).collect();
    want.push("/k/0500".into());
    want.push("/k/leased".into());
    assert_eq!(keys, want);
    store.revoke(lease).await.unwrap();
    assert_eq!(store.range("/k/leased").await.unwrap().0.len(), 0);
    store.close().await;
}

/// Closing while failed answers what is queued and releases the file.
#[tokio::test]
async fn closing_a_failed_store_releases_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (store, full) = store_on_disk(dir.path());
    store.txn(put(1)).await.unwrap();
    full.store(true, Ordering::SeqCst);
    assert!(failed_with_enospc(&store.txn(put(2)).await));
    store.close().await;
    let store = EmbeddedStore::open(dir.path()).unwrap();
    assert_eq!(store.range("/k/").await.unwrap().0.len(), 1);
}

/// A value too short for its header is an error naming the key, in reads
/// and in compares, never a panic of the writer.
#[tokio::test]
async fn a_value_too_short_to_decode_is_an_error_not_a_panic() {
    assert!(file::decode_kv("/k", &[1, 2, 3]).is_err());
    assert!(file::decode_kv("/k", &[0; 16]).is_ok());
    let dir = tempfile::tempdir().unwrap();
    EmbeddedStore::open(dir.path()).unwrap().close().await;
    {
        let db = Database::open(dir.path().join(crate::data_dir::STORE_FILE)).unwrap();
        let w = db.begin_write().unwrap();
        w.open_table(super::KV)
            .unwrap()
            .insert("/bad", [7u8; 5].as_slice())
            .unwrap();
        w.commit().unwrap();
    }
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let err = store.range("/").await.unwrap_err().to_string();
    assert!(err.contains("/bad is 5 bytes"), "{err}");
    let err = store
        .txn(Txn::default().when_mod_revision("/bad", 0).delete("/bad"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("/bad is 5 bytes"), "{err}");
    // The writer is still there.
    store.txn(put(1)).await.unwrap();
    assert!(store.health().is_healthy());
}

/// A store with a few keys, closed, and the bytes of its file.
async fn closed_store(dir: &Path) -> Vec<u8> {
    let store = EmbeddedStore::open(dir).unwrap();
    for i in 0..200 {
        store.txn(put(i)).await.unwrap();
    }
    store.close().await;
    std::fs::read(dir.join(crate::data_dir::STORE_FILE)).unwrap()
}

fn open_error(dir: &Path) -> String {
    match EmbeddedStore::open(dir) {
        Ok(_) => panic!("a damaged store file opened"),
        Err(e) => e.to_string(),
    }
}

/// A truncated or altered store file is an error at open naming the file
/// and what to do, never a panic and never a store that half works.
#[tokio::test]
async fn a_damaged_store_file_is_an_open_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = closed_store(dir.path()).await;
    let path = dir.path().join(crate::data_dir::STORE_FILE);

    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = open_error(dir.path());
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("restore it from a backup"), "{err}");

    let mut altered = bytes.clone();
    for b in &mut altered[4096..] {
        *b ^= 0x5a;
    }
    std::fs::write(&path, &altered).unwrap();
    let err = open_error(dir.path());
    assert!(err.contains("restore it from a backup"), "{err}");

    std::fs::write(&path, b"not a store at all").unwrap();
    let err = open_error(dir.path());
    assert!(err.contains("restore it from a backup"), "{err}");
}
