//! A generic xDS server: ADS over `envoy.service.discovery.v3`, both
//! state-of-the-world and delta.
//!
//! The engine knows nothing of services or endpoints. Producers put opaque
//! resources (a type URL, a name and the encoded message) into the
//! [`Cache`]; streams subscribe to names and are woken only by changes to
//! the names they hold (go-control-plane's "linear cache" design). Each
//! resource is encoded once, as an `Any` and as a delta `Resource`, and those
//! bytes are shared by every stream that sends it: a response is a small
//! per-stream header followed by the shared bytes.
//!
//! Flow control follows xDS practice: one response per type is in flight on
//! a stream until the client ACKs or NACKs it; changes arriving meanwhile are
//! coalesced into the next response. A NACKed version is never resent; the
//! next change produces a new one. A delta response carries at most
//! [`DELTA_RESPONSE_BUDGET`] bytes of resources (always at least one); the
//! rest follow once it is acknowledged, so many large resources never add
//! up to a message the client cannot decode.
//!
//! # Layout
//! - `resource`: encoded resources and response assembly from shared bytes.
//! - `codec`: the gRPC codec that sends those pre-encoded bytes as is.
//! - `sotw`, `delta`: the per-stream protocol state machines (pure, no I/O).
//! - `scope`: what a stream's caller may subscribe to; other names are
//!   treated as absent (and logged), a wildcard is refused.
//! - `server`: the tonic service that drives streams, plus stream hooks.

mod codec;
mod delta;
pub mod resource;
mod scope;
pub mod server;
mod sotw;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use std::time::Instant;

use bytes::Bytes;
use tokio::sync::Notify;

pub use resource::Encoded;
pub use server::{AdsService, StreamObserver};

/// The most resource bytes one delta response carries, unless a single
/// resource is larger (it then goes alone). A quarter of what a sidecar
/// decodes in one message (`isdp_core::dial::MAX_RESPONSE_BYTES`): a
/// sidecar following many large upstreams gets them over several
/// responses, each of which it can decode. State-of-the-world responses
/// hold a stream's whole set by definition and cannot be split.
pub const DELTA_RESPONSE_BUDGET: usize = 4 << 20;

/// The resources the server holds, by type URL and name.
#[derive(Clone)]
pub struct Cache {
    shared: Arc<Shared>,
}

struct Shared {
    types: RwLock<HashMap<String, Arc<TypeCache>>>,
    next_nonce: AtomicU64,
    next_stream: AtomicU64,
}

/// All resources of one type and the streams watching them.
pub struct TypeCache {
    type_url: Arc<str>,
    resources: RwLock<BTreeMap<String, Arc<Encoded>>>,
    /// name (or `*` for wildcard subscribers) -> stream id -> its waker.
    watchers: Mutex<HashMap<String, HashMap<u64, Arc<Wake>>>>,
}

/// How a change reaches a stream: the names that changed, per type, and a
/// notification that wakes the stream's task.
#[derive(Default)]
pub struct Wake {
    dirty: Mutex<HashMap<Arc<str>, HashSet<String>>>,
    notify: Notify,
}

pub const WILDCARD: &str = "*";

// === impl Cache ===

impl Cache {
    /// A cache serving exactly these resource types; requests for any other
    /// type are refused.
    pub fn new(type_urls: &[&str]) -> Self {
        let types = type_urls
            .iter()
            .map(|t| {
                let tc = TypeCache {
                    type_url: Arc::from(*t),
                    resources: RwLock::default(),
                    watchers: Mutex::default(),
                };
                ((*t).to_owned(), Arc::new(tc))
            })
            .collect();
        Cache {
            shared: Arc::new(Shared {
                types: RwLock::new(types),
                next_nonce: AtomicU64::new(1),
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

    /// Stores `message` (the encoded resource) under `name`. Returns false
    /// when the content, and so the version, is unchanged: nobody is woken.
    pub fn set(&self, type_url: &str, name: &str, message: Bytes) -> bool {
        self.set_at(type_url, name, message, Instant::now())
    }

    /// [`Cache::set`], for a change first seen at `changed_at` (the start
    /// of convergence as the metrics measure it).
    pub fn set_at(&self, type_url: &str, name: &str, message: Bytes, changed_at: Instant) -> bool {
        let Some(tc) = self.type_cache(type_url) else {
            tracing::error!(type_url, "set on a type the cache does not serve");
            return false;
        };
        let mut encoded = Encoded::new(type_url, name, &message);
        encoded.changed_at = changed_at;
        let encoded = Arc::new(encoded);
        {
            let mut res = tc.resources.write().expect("resources lock");
            if res.get(name).is_some_and(|r| r.version == encoded.version) {
                return false;
            }
            res.insert(name.to_owned(), encoded);
        }
        tc.wake(name);
        true
    }

    /// Removes `name`; subscribers learn it no longer exists.
    pub fn remove(&self, type_url: &str, name: &str) -> bool {
        let Some(tc) = self.type_cache(type_url) else {
            return false;
        };
        if tc
            .resources
            .write()
            .expect("resources lock")
            .remove(name)
            .is_none()
        {
            return false;
        }
        tc.wake(name);
        true
    }

    pub fn get(&self, type_url: &str, name: &str) -> Option<Arc<Encoded>> {
        self.type_cache(type_url)?.get(name)
    }

    fn nonce(&self) -> String {
        self.shared
            .next_nonce
            .fetch_add(1, Ordering::Relaxed)
            .to_string()
    }

    fn stream_id(&self) -> u64 {
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

    pub fn names(&self) -> Vec<String> {
        self.resources
            .read()
            .expect("resources lock")
            .keys()
            .cloned()
            .collect()
    }

    pub fn len(&self) -> usize {
        self.resources.read().expect("resources lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn wake(&self, name: &str) {
        let watchers = self.watchers.lock().expect("watchers lock");
        for key in [name, WILDCARD] {
            for w in watchers.get(key).into_iter().flat_map(|m| m.values()) {
                w.mark(&self.type_url, name);
            }
        }
    }

    fn watch(&self, name: &str, stream: u64, wake: &Arc<Wake>) {
        self.watchers
            .lock()
            .expect("watchers lock")
            .entry(name.to_owned())
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

// === impl Wake ===

impl Wake {
    fn mark(&self, type_url: &Arc<str>, name: &str) {
        self.dirty
            .lock()
            .expect("dirty lock")
            .entry(type_url.clone())
            .or_default()
            .insert(name.to_owned());
        self.notify.notify_one();
    }

    fn take(&self) -> HashMap<Arc<str>, HashSet<String>> {
        std::mem::take(&mut *self.dirty.lock().expect("dirty lock"))
    }
}

/// The subscriptions one stream holds in the cache, released on drop so a
/// closed stream is never woken again.
struct Subscriptions {
    cache: Cache,
    stream: u64,
    wake: Arc<Wake>,
    held: HashMap<Arc<str>, HashSet<String>>,
}

impl Subscriptions {
    fn new(cache: Cache) -> Self {
        Subscriptions {
            stream: cache.stream_id(),
            cache,
            wake: Arc::new(Wake::default()),
            held: HashMap::new(),
        }
    }

    fn add(&mut self, tc: &TypeCache, name: &str) {
        if self
            .held
            .entry(tc.type_url.clone())
            .or_default()
            .insert(name.to_owned())
        {
            tc.watch(name, self.stream, &self.wake);
        }
    }

    fn remove(&mut self, tc: &TypeCache, name: &str) {
        if self
            .held
            .get_mut(&tc.type_url)
            .is_some_and(|s| s.remove(name))
        {
            tc.unwatch(name, self.stream);
        }
    }
}

impl Drop for Subscriptions {
    fn drop(&mut self) {
        for (type_url, names) in &self.held {
            if let Some(tc) = self.cache.type_cache(type_url) {
                for n in names {
                    tc.unwatch(n, self.stream);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
