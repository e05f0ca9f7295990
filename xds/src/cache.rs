//! The resources the server holds, by type URL and name, and who watches
//! them.
//!
//! Producers put typed messages ([`Cache::set`]) or several changes at once
//! ([`Cache::apply`] with a [`Batch`]); each resource is encoded once
//! ([`Encoded`]) and shared by every stream that sends it. Streams watch
//! names (or the wildcard) and are woken only by changes to what they
//! watch (go-control-plane's "linear cache"). A change whose content hash
//! equals the stored one wakes nobody.

mod batch;
mod subscriptions;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use bytes::Bytes;
use prost::{Message, Name};
use tonic::Status;

pub use batch::Batch;
pub(crate) use subscriptions::{Subscriptions, Wake};

use crate::{WILDCARD, resource::Encoded};

/// The resources the server holds, by type URL and name. A cheap handle:
/// clones share one cache.
#[derive(Clone)]
pub struct Cache {
    shared: Arc<Shared>,
}

struct Shared {
    types: RwLock<HashMap<String, Arc<TypeCache>>>,
    next_stream: AtomicU64,
}

/// All resources of one type and the streams watching them.
pub struct TypeCache {
    type_url: Arc<str>,
    resources: RwLock<BTreeMap<String, Arc<Encoded>>>,
    /// name (or `*` for wildcard subscribers) -> stream id -> its waker.
    watchers: Mutex<HashMap<Arc<str>, Watchers>>,
}

/// The streams watching one name: stream id -> its waker.
type Watchers = HashMap<u64, Arc<Wake>>;

// === impl Cache ===

impl Cache {
    /// A cache serving exactly these resource types; requests for any other
    /// type are refused.
    pub fn new<I>(type_urls: I) -> Self
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let types = type_urls
            .into_iter()
            .map(|t| {
                let t = t.as_ref();
                let tc = TypeCache {
                    type_url: Arc::from(t),
                    resources: RwLock::default(),
                    watchers: Mutex::default(),
                };
                (t.to_owned(), Arc::new(tc))
            })
            .collect();
        Cache {
            shared: Arc::new(Shared {
                types: RwLock::new(types),
                next_stream: AtomicU64::new(1),
            }),
        }
    }

    pub fn type_cache(&self, type_url: &str) -> Option<Arc<TypeCache>> {
        self.shared
            .types
            .read()
            .expect("types lock")
            .get(type_url)
            .cloned()
    }

    pub fn type_urls(&self) -> Vec<String> {
        self.shared
            .types
            .read()
            .expect("types lock")
            .keys()
            .cloned()
            .collect()
    }

    /// The cache of a type a client asked for, or INVALID_ARGUMENT naming
    /// the types served.
    pub(crate) fn serving(&self, type_url: &str) -> Result<Arc<TypeCache>, Status> {
        self.type_cache(type_url).ok_or_else(|| {
            let mut served = self.type_urls();
            served.sort();
            Status::invalid_argument(format!(
                "type_url: {} is not served; served types: {}",
                crate::limits::quoted(type_url),
                served.join(", ")
            ))
        })
    }

    /// Stores `resource` under `name` (its type URL is `T`'s). Returns
    /// false when the content, and so the version, is unchanged: nobody is
    /// woken.
    pub fn set<T: Message + Name>(&self, name: &str, resource: &T) -> bool {
        self.set_at(name, resource, Instant::now())
    }

    /// [`Cache::set`], for a change first seen at `changed_at` (the start
    /// of convergence as an observer measures it).
    pub fn set_at<T: Message + Name>(&self, name: &str, resource: &T, changed_at: Instant) -> bool {
        let mut batch = Batch::new();
        batch.set(name, resource);
        self.apply_at(batch, changed_at) > 0
    }

    /// Removes `name` of `T`'s type; subscribers learn it no longer exists.
    pub fn remove<T: Name>(&self, name: &str) -> bool {
        self.remove_raw(&T::type_url(), name)
    }

    /// [`Cache::set`] for a message already encoded, of `type_url`.
    pub fn set_raw(&self, type_url: &str, name: &str, message: Bytes) -> bool {
        let mut batch = Batch::new();
        batch.set_raw(type_url, name, message);
        self.apply(batch) > 0
    }

    /// [`Cache::remove`] by type URL.
    pub fn remove_raw(&self, type_url: &str, name: &str) -> bool {
        let mut batch = Batch::new();
        batch.remove_raw(type_url, name);
        self.apply(batch) > 0
    }

    pub fn get(&self, type_url: &str, name: &str) -> Option<Arc<Encoded>> {
        self.type_cache(type_url)?.get(name)
    }

    /// The names held of `T`'s type (none if the type is not served).
    pub fn names<T: Name>(&self) -> Vec<String> {
        self.type_cache(&T::type_url())
            .map(|tc| tc.names())
            .unwrap_or_default()
    }

    pub(crate) fn stream_id(&self) -> u64 {
        self.shared.next_stream.fetch_add(1, Ordering::Relaxed)
    }
}

// === impl TypeCache ===

impl TypeCache {
    pub fn type_url(&self) -> &Arc<str> {
        &self.type_url
    }

    pub fn get(&self, name: &str) -> Option<Arc<Encoded>> {
        self.resources
            .read()
            .expect("resources lock")
            .get(name)
            .cloned()
    }

    /// Reads the resources under one lock: a [`Batch`] is applied to a
    /// type under one lock too, so a response built here carries all of a
    /// batch's changes to this type or none.
    pub(crate) fn read<R>(&self, f: impl FnOnce(&BTreeMap<String, Arc<Encoded>>) -> R) -> R {
        f(&self.resources.read().expect("resources lock"))
    }

    pub fn names(&self) -> Vec<String> {
        self.read(|r| r.keys().cloned().collect())
    }

    pub fn len(&self) -> usize {
        self.read(|r| r.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The streams to wake for a change to `name`: its watchers and the
    /// wildcard's.
    fn watchers_of(&self, name: &str, mut each: impl FnMut(u64, &Arc<Wake>)) {
        let watchers = self.watchers.lock().expect("watchers lock");
        for key in [name, WILDCARD] {
            for (stream, w) in watchers.get(key).into_iter().flatten() {
                each(*stream, w);
            }
        }
    }

    fn watch(&self, name: &Arc<str>, stream: u64, wake: &Arc<Wake>) {
        self.watchers
            .lock()
            .expect("watchers lock")
            .entry(name.clone())
            .or_default()
            .insert(stream, wake.clone());
    }

    fn unwatch(&self, name: &str, stream: u64) {
        let mut watchers = self.watchers.lock().expect("watchers lock");
        if let Some(m) = watchers.get_mut(name) {
            m.remove(&stream);
            if m.is_empty() {
                watchers.remove(name);
            }
        }
    }

    /// Streams watching at least one name of this type.
    pub fn watcher_count(&self) -> usize {
        let watchers = self.watchers.lock().expect("watchers lock");
        watchers
            .values()
            .flat_map(|m| m.keys())
            .collect::<HashSet<_>>()
            .len()
    }
}

#[cfg(test)]
mod tests;
