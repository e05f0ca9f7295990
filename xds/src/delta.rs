//! Incremental (delta) xDS: responses carry only what changed, and the
//! client subscribes and unsubscribes names one by one.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::Arc,
    time::Instant,
};

use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use tonic::Status;

use crate::{
    DELTA_RESPONSE_BUDGET, WILDCARD,
    access::{Gate, StreamAccess},
    cache::{Cache, Subscriptions, TypeCache, Wake},
    event::StreamEvent,
    limits::{self, Limits},
    resource::{Encoded, Nonces, delta_response},
};

pub(crate) struct DeltaStream {
    cache: Cache,
    gate: Gate,
    subs: Subscriptions,
    types: HashMap<Arc<str>, TypeState>,
    /// Resource bytes per response ([`DELTA_RESPONSE_BUDGET`]).
    budget: usize,
    limits: Limits,
    nonces: Nonces,
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
    pub(crate) fn new(cache: Cache, access: Box<dyn StreamAccess>) -> Self {
        DeltaStream {
            gate: Gate::new(access),
            subs: Subscriptions::new(cache.clone()),
            cache,
            types: HashMap::new(),
            budget: DELTA_RESPONSE_BUDGET,
            limits: Limits::default(),
            nonces: Nonces::default(),
        }
    }

    pub(crate) fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// A stream whose responses carry at most `budget` resource bytes
    /// (tests).
    #[cfg(test)]
    pub(crate) fn with_budget(mut self, budget: usize) -> Self {
        self.budget = budget;
        self
    }

    /// The application's checks of a node id (whose message names its
    /// rule), then the engine's.
    pub(crate) fn check_node(&self, id: &str) -> Result<(), Status> {
        self.gate.node(id)?;
        limits::check_node_id(id)
    }

    pub(crate) fn wake(&self) -> &Arc<Wake> {
        &self.subs.wake
    }

    pub(crate) fn on_request(
        &mut self,
        req: DeltaDiscoveryRequest,
        out: &mut Vec<StreamEvent>,
    ) -> Result<(), Status> {
        let tc = self.cache.serving(&req.type_url)?;
        let type_url = tc.type_url().clone();
        let first = !self.types.contains_key(&type_url);
        self.check_names(&type_url, &req, first)?;
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
                    message: limits::nack_message(&e.message),
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
                self.gate.forget(&type_url, n);
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
                if !self.gate.refuses(&type_url, n) {
                    self.subs.add(&tc, n);
                }
            }
        }
        // A wildcard watches every name; what the stream may not read is
        // left out as each response is built.
        if st.wildcard && !self.subs.holds(&type_url, WILDCARD) {
            self.subs.add(&tc, WILDCARD);
            st.dirty.extend(tc.names());
            st.dirty.extend(st.known.keys().cloned());
        }
        self.flush_type(&type_url, out);
        Ok(())
    }

    /// The names the stream would subscribe to of `type_url` after `req`
    /// (those it holds, less those unsubscribed, plus those subscribed
    /// and, on the first request, those it says it holds), checked against
    /// the limits before any of it is kept.
    fn check_names(
        &self,
        type_url: &Arc<str>,
        req: &DeltaDiscoveryRequest,
        first: bool,
    ) -> Result<(), Status> {
        let added = req.resource_names_subscribe.iter().chain(
            first
                .then_some(req.initial_resource_versions.keys())
                .into_iter()
                .flatten(),
        );
        let mut after: HashSet<&str> = self
            .types
            .get(type_url)
            .map(|st| st.names.iter().map(String::as_str).collect())
            .unwrap_or_default();
        for n in &req.resource_names_unsubscribe {
            after.remove(n.as_str());
        }
        for n in added.filter(|n| *n != WILDCARD) {
            limits::check_name(type_url, n)?;
            after.insert(n);
        }
        self.limits.check_names(type_url, after.len())
    }

    pub(crate) fn on_wake(&mut self, out: &mut Vec<StreamEvent>) {
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
        let mut resources: Vec<Arc<Encoded>> = Vec::new();
        let mut removed = Vec::new();
        let mut size = 0;
        // The changed names' resources, read under one lock so a batch's
        // changes to this type go out together; then what the stream may
        // not read is taken for absent.
        let names = std::mem::take(&mut st.dirty);
        let current: Vec<Option<Arc<Encoded>>> = st
            .tc
            .read(|held| names.iter().map(|n| held.get(n).cloned()).collect());
        let mut dirty = names.into_iter().zip(current).map(|(n, r)| {
            let visible = r.filter(|_| self.gate.allows(type_url, &n));
            (n, visible)
        });
        while let Some((name, visible)) = dirty.next() {
            let explicit = st.names.contains(&name);
            if !explicit && !st.wildcard {
                continue;
            }
            let known = st.known.get(&name);
            match visible {
                Some(r) if known == Some(&r.version) => {}
                // Full: this one and the rest wait for the next response,
                // sent once this one is acknowledged.
                Some(r) if !resources.is_empty() && size + r.delta.len() > budget => {
                    st.dirty.insert(name);
                    st.dirty.extend(dirty.by_ref().map(|(n, _)| n));
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
        let nonce = self.nonces.next();
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
