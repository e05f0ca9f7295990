//! Several changes, possibly to several types, published together.
//!
//! Every change of a batch is stored before any stream is woken, each
//! type's under one lock (which streams also read under), and each stream
//! is woken once with every name it watches that the batch changed. So a
//! stream never sends a response carrying part of a batch's changes to a
//! type, and a producer that rebuilds many resources at once (a burst of
//! registrations, a new rule set) wakes each stream once rather than once
//! per resource.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
    time::Instant,
};

use bytes::Bytes;
use prost::{Message, Name};

use super::{Cache, Wake};
use crate::resource::Encoded;

/// Changes to publish together with [`Cache::apply`].
#[derive(Debug, Default)]
pub struct Batch {
    changes: Vec<Change>,
}

#[derive(Debug)]
enum Change {
    Set {
        type_url: String,
        name: String,
        message: Bytes,
    },
    Remove {
        type_url: String,
        name: String,
    },
}

impl Change {
    fn type_url(&self) -> &str {
        match self {
            Change::Set { type_url, .. } | Change::Remove { type_url, .. } => type_url,
        }
    }
}

/// A stream to wake: its waker and the (type, name) pairs to mark.
type Woken = (Arc<Wake>, Vec<(Arc<str>, String)>);

// === impl Batch ===

impl Batch {
    pub fn new() -> Self {
        Batch::default()
    }

    /// Stores `resource` under `name` (its type URL is `T`'s).
    pub fn set<T: Message + Name>(&mut self, name: &str, resource: &T) -> &mut Self {
        self.set_raw(&T::type_url(), name, resource.encode_to_vec().into())
    }

    /// Removes `name` of `T`'s type.
    pub fn remove<T: Name>(&mut self, name: &str) -> &mut Self {
        self.remove_raw(&T::type_url(), name)
    }

    /// [`Batch::set`] for a message already encoded, of `type_url`.
    pub fn set_raw(&mut self, type_url: &str, name: &str, message: Bytes) -> &mut Self {
        self.changes.push(Change::Set {
            type_url: type_url.to_owned(),
            name: name.to_owned(),
            message,
        });
        self
    }

    /// [`Batch::remove`] by type URL.
    pub fn remove_raw(&mut self, type_url: &str, name: &str) -> &mut Self {
        self.changes.push(Change::Remove {
            type_url: type_url.to_owned(),
            name: name.to_owned(),
        });
        self
    }

    pub fn len(&self) -> usize {
        self.changes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}

// === impl Cache ===

impl Cache {
    /// Publishes every change of `batch` together. Returns how many
    /// resources changed (a set whose content is unchanged, or a removal of
    /// a name not held, changes nothing and wakes nobody); changes to a
    /// type the cache does not serve are logged and skipped.
    pub fn apply(&self, batch: Batch) -> usize {
        self.apply_at(batch, Instant::now())
    }

    /// [`Cache::apply`], for changes first seen at `changed_at` (the start
    /// of convergence as an observer measures it).
    pub fn apply_at(&self, batch: Batch, changed_at: Instant) -> usize {
        let mut by_type: Vec<(String, Vec<Change>)> = Vec::new();
        for change in batch.changes {
            match by_type.iter_mut().find(|(t, _)| t == change.type_url()) {
                Some((_, changes)) => changes.push(change),
                None => by_type.push((change.type_url().to_owned(), vec![change])),
            }
        }
        let mut changed = 0;
        let mut woken: HashMap<u64, Woken> = HashMap::new();
        for (type_url, changes) in by_type {
            let Some(tc) = self.type_cache(&type_url) else {
                tracing::error!(type_url, "change to a type the cache does not serve");
                continue;
            };
            // Encoded outside the lock; stored under one.
            let encoded: Vec<(String, Option<Arc<Encoded>>)> = changes
                .into_iter()
                .map(|c| match c {
                    Change::Set { name, message, .. } => {
                        let mut e = Encoded::new(&type_url, &name, &message);
                        e.changed_at = changed_at;
                        (name, Some(Arc::new(e)))
                    }
                    Change::Remove { name, .. } => (name, None),
                })
                .collect();
            let mut names = BTreeSet::new();
            {
                let mut res = tc.resources.write().expect("resources lock");
                for (name, new) in encoded {
                    let differs = match new {
                        Some(e) if res.get(&name).is_some_and(|r| r.version == e.version) => false,
                        Some(e) => {
                            res.insert(name.clone(), e);
                            true
                        }
                        None => res.remove(&name).is_some(),
                    };
                    if differs {
                        names.insert(name);
                    }
                }
            }
            changed += names.len();
            for name in names {
                tc.watchers_of(&name, |stream, wake| {
                    woken
                        .entry(stream)
                        .or_insert_with(|| (wake.clone(), Vec::new()))
                        .1
                        .push((tc.type_url().clone(), name.clone()));
                });
            }
        }
        for (wake, marks) in woken.into_values() {
            wake.mark(marks);
        }
        changed
    }
}
