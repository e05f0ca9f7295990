//! How a change reaches a stream: the names a stream watches in the cache,
//! and the waker the cache marks when one of them changes.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
};

use tokio::sync::Notify;

use super::{Cache, TypeCache};

/// The names that changed, per type, since the stream last looked, and a
/// notification that wakes the stream's task.
#[derive(Default)]
pub(crate) struct Wake {
    dirty: Mutex<HashMap<Arc<str>, HashSet<String>>>,
    pub(crate) notify: Notify,
}

impl Wake {
    /// Marks the (type, name) pairs changed and wakes the stream once.
    pub(super) fn mark(&self, changes: Vec<(Arc<str>, String)>) {
        let mut dirty = self.dirty.lock().expect("dirty lock");
        for (type_url, name) in changes {
            dirty.entry(type_url).or_default().insert(name);
        }
        drop(dirty);
        self.notify.notify_one();
    }

    pub(crate) fn take(&self) -> HashMap<Arc<str>, HashSet<String>> {
        std::mem::take(&mut *self.dirty.lock().expect("dirty lock"))
    }
}

/// The subscriptions one stream holds in the cache, released on drop so a
/// closed stream is never woken again.
pub(crate) struct Subscriptions {
    cache: Cache,
    stream: u64,
    pub(crate) wake: Arc<Wake>,
    /// Per type, the names watched: the same `Arc<str>` the stream's
    /// state and the cache's watcher table hold, one copy per name.
    held: HashMap<Arc<str>, HashSet<Arc<str>>>,
}

impl Subscriptions {
    pub(crate) fn new(cache: Cache) -> Self {
        Subscriptions {
            stream: cache.stream_id(),
            cache,
            wake: Arc::new(Wake::default()),
            held: HashMap::new(),
        }
    }

    pub(crate) fn add(&mut self, tc: &TypeCache, name: &Arc<str>) {
        if self
            .held
            .entry(tc.type_url.clone())
            .or_default()
            .insert(name.clone())
        {
            tc.watch(name, self.stream, &self.wake);
        }
    }

    pub(crate) fn remove(&mut self, tc: &TypeCache, name: &str) {
        if self
            .held
            .get_mut(&tc.type_url)
            .is_some_and(|s| s.remove(name))
        {
            tc.unwatch(name, self.stream);
        }
    }

    /// Whether the stream watches `name` of `type_url`.
    pub(crate) fn holds(&self, type_url: &str, name: &str) -> bool {
        self.held.get(type_url).is_some_and(|h| h.contains(name))
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
