//! Incremental (delta) xDS: responses carry only what changed, and the
//! client subscribes and unsubscribes names one by one.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::Arc,
    time::Instant,
};

use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use tonic::Status;

use crate::auth::ReadScope;

use super::{
    Cache, Subscriptions, TypeCache, WILDCARD, resource::delta_response, scope::Scope,
    server::StreamEvent, sotw::unknown_type,
};

pub(super) struct DeltaStream {
    cache: Cache,
    scope: Scope,
    subs: Subscriptions,
    types: HashMap<Arc<str>, TypeState>,
    /// Resource bytes per response ([`super::DELTA_RESPONSE_BUDGET`]).
    budget: usize,
}

struct TypeState {
    tc: Arc<TypeCache>,
    wildcard: bool,
    names: HashSet<String>,
    /// What the client holds: name -> version. An empty version records
    /// that the client was told the name does not exist.
    known: HashMap<String, String>,
    /// The response awaiting ACK.
    pending: Option<Pending>,
    dirty: BTreeSet<String>,
}

/// A response sent and not yet ACKed or NACKed.
struct Pending {
    nonce: String,
    /// (name, version) pairs, reported in the ACK event.
    versions: Vec<(String, String)>,
    /// The newest change the response carries.
    changed_at: Option<Instant>,
}

impl DeltaStream {
    pub(super) fn new(cache: Cache, scope: ReadScope) -> Self {
        DeltaStream {
            scope: Scope::new(scope),
            subs: Subscriptions::new(cache.clone()),
            cache,
            types: HashMap::new(),
            budget: super::DELTA_RESPONSE_BUDGET,
        }
    }

    /// A stream whose responses carry at most `budget` resource bytes
    /// (tests).
    #[cfg(test)]
    pub(super) fn with_budget(mut self, budget: usize) -> Self {
        self.budget = budget;
        self
    }

    pub(super) fn wake(&self) -> &Arc<super::Wake> {
        &self.subs.wake
    }

    pub(super) fn on_request(
        &mut self,
        req: DeltaDiscoveryRequest,
        out: &mut Vec<StreamEvent>,
    ) -> Result<(), Status> {
        let tc = self
            .cache
            .type_cache(&req.type_url)
            .ok_or_else(|| unknown_type(&self.cache, &req.type_url))?;
        let type_url = tc.type_url().clone();
        let first = !self.types.contains_key(&type_url);
        let st = self
            .types
            .entry(type_url.clone())
            .or_insert_with(|| TypeState {
                tc: tc.clone(),
                wildcard: false,
                names: HashSet::new(),
                known: HashMap::new(),
                pending: None,
                dirty: BTreeSet::new(),
            });
        if first {
            st.known = req.initial_resource_versions.clone();
            if req.resource_names_subscribe.is_empty() {
                // Legacy wildcard: a first request naming nothing.
                st.wildcard = true;
            }
        }
        if !req.response_nonce.is_empty()
            && st
                .pending
                .as_ref()
                .is_some_and(|p| p.nonce == req.response_nonce)
        {
            let Pending {
                nonce,
                versions,
                changed_at,
            } = st.pending.take().expect("checked");
            match &req.error_detail {
                Some(e) => out.push(StreamEvent::Nack {
                    type_url: type_url.clone(),
                    nonce,
                    message: e.message.clone(),
                }),
                None => out.push(StreamEvent::Ack {
                    type_url: type_url.clone(),
                    nonce,
                    versions,
                    changed_at,
                }),
            }
        }
        for n in &req.resource_names_unsubscribe {
            if n == WILDCARD {
                st.wildcard = false;
                self.subs.remove(&tc, WILDCARD);
            } else {
                st.names.remove(n);
                st.known.remove(n);
                st.dirty.remove(n);
                self.subs.remove(&tc, n);
            }
        }
        for n in &req.resource_names_subscribe {
            if n == WILDCARD {
                st.wildcard = true;
            } else {
                st.names.insert(n.clone());
                st.dirty.insert(n.clone());
                // Outside the caller's scope: answered as absent, never
                // watched, so its changes do not even wake the stream.
                if !self.scope.refuses(&type_url, n) {
                    self.subs.add(&tc, n);
                }
            }
        }
        if st.wildcard {
            self.scope.wildcard(&type_url)?;
        }
        if st.wildcard
            && !self
                .subs
                .held
                .get(&type_url)
                .is_some_and(|h| h.contains(WILDCARD))
        {
            self.subs.add(&tc, WILDCARD);
            st.dirty.extend(tc.names());
            st.dirty.extend(st.known.keys().cloned());
        }
        self.flush_type(&type_url, out);
        Ok(())
    }

    pub(super) fn on_wake(&mut self, out: &mut Vec<StreamEvent>) {
        for (type_url, names) in self.subs.wake.take() {
            if let Some(st) = self.types.get_mut(&type_url) {
                st.dirty.extend(names);
            }
            self.flush_type(&type_url, out);
        }
    }

    fn flush_type(&mut self, type_url: &Arc<str>, out: &mut Vec<StreamEvent>) {
        let budget = self.budget;
        let Some(st) = self.types.get_mut(type_url) else {
            return;
        };
        if st.pending.is_some() || st.dirty.is_empty() {
            return;
        }
        let mut resources: Vec<Arc<super::Encoded>> = Vec::new();
        let mut removed = Vec::new();
        let mut size = 0;
        let mut dirty = std::mem::take(&mut st.dirty).into_iter();
        while let Some(name) = dirty.next() {
            let explicit = st.names.contains(&name);
            if !explicit && !st.wildcard {
                continue;
            }
            let known = st.known.get(&name);
            let visible = st
                .tc
                .get(&name)
                .filter(|_| self.scope.allows(type_url, &name));
            match visible {
                Some(r) if known == Some(&r.version) => {}
                // Full: this one and the rest wait for the next response,
                // sent once this one is acknowledged.
                Some(r) if !resources.is_empty() && size + r.delta.len() > budget => {
                    st.dirty.insert(name);
                    st.dirty.extend(dirty.by_ref());
                }
                Some(r) => {
                    size += r.delta.len();
                    st.known.insert(name, r.version.clone());
                    resources.push(r);
                }
                // Tell an explicit subscriber once that the name does not
                // exist; wildcard subscribers hear only of removals.
                None if known.is_some_and(|v| v.is_empty()) => {}
                None if known.is_none() && !explicit => {}
                None => {
                    if explicit {
                        st.known.insert(name.clone(), String::new());
                    } else {
                        st.known.remove(&name);
                    }
                    size += name.len();
                    removed.push(name);
                }
            }
        }
        if resources.is_empty() && removed.is_empty() {
            return;
        }
        let nonce = self.cache.nonce();
        let versions = resources
            .iter()
            .map(|r| (r.name.clone(), r.version.clone()))
            .chain(removed.iter().map(|n| (n.clone(), String::new())))
            .collect();
        let changed_at = resources.iter().map(|r| r.changed_at).max();
        let bytes = delta_response(type_url, &nonce, &resources, removed);
        st.pending = Some(Pending {
            nonce: nonce.clone(),
            versions,
            changed_at,
        });
        out.push(StreamEvent::Response {
            type_url: type_url.clone(),
            nonce,
            bytes,
            resources: resources.len(),
        });
    }
}
