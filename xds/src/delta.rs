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
    log_rate::LogRate,
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

/// One type's state. Each name is one `Arc<str>` shared by the maps here
/// and the stream's subscriptions, rather than a copy per map.
struct TypeState {
    tc: Arc<TypeCache>,
    wildcard: bool,
    names: HashSet<Arc<str>>,
    /// What the client holds: name -> version. An empty version records
    /// that the client was told the name does not exist.
    known: HashMap<Arc<str>, String>,
    /// What the names the first request said the client holds, without
    /// subscribing to them, cost ([`limits::name_cost`]): charged with
    /// the subscribed names until the stream ends.
    initial_bytes: usize,
    /// The response awaiting ACK.
    pending: Option<Pending>,
    dirty: BTreeSet<Arc<str>>,
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

    /// Logs refusals under the server's `rate`, shared by its streams.
    pub(crate) fn with_log_rate(mut self, rate: LogRate) -> Self {
        self.gate.set_log_rate(rate);
        self
    }

    /// A stream whose responses carry at most `budget` resource bytes
    /// (tests).
    #[cfg(test)]
    pub(crate) fn with_budget(mut self, budget: usize) -> Self {
        self.budget = budget;
        self
    }

    pub(crate) fn check_node(&self, id: &str) -> Result<(), Status> {
        self.gate.node(id)
    }

    pub(crate) fn wake(&self) -> &Arc<Wake> {
        &self.subs.wake
    }

    pub(crate) fn on_request(
        &mut self,
        mut req: DeltaDiscoveryRequest,
        out: &mut Vec<StreamEvent>,
    ) -> Result<(), Status> {
        let tc = self.cache.serving(&req.type_url)?;
        let type_url = tc.type_url().clone();
        let first = !self.types.contains_key(&type_url);
        let bytes = self.check_names(&type_url, &req, first)?;
        // Charged before anything of the request is kept: refused, it
        // changes nothing.
        self.gate.hold(&type_url, bytes)?;
        let st = self
            .types
            .entry(type_url.clone())
            .or_insert_with(|| TypeState {
                tc: tc.clone(),
                wildcard: false,
                names: HashSet::new(),
                known: HashMap::new(),
                initial_bytes: 0,
                pending: None,
                dirty: BTreeSet::new(),
            });
        let was_wildcard = st.wildcard;
        // What the first request says the client holds, for observers.
        let mut resumed = Vec::new();
        if first {
            st.known = std::mem::take(&mut req.initial_resource_versions)
                .into_iter()
                .map(|(n, v)| (Arc::from(n), v))
                .collect();
            resumed = st
                .known
                .iter()
                .filter(|(n, v)| &***n != WILDCARD && !v.is_empty())
                .map(|(n, v)| (n.to_string(), v.clone()))
                .collect();
            st.initial_bytes = st
                .known
                .keys()
                .filter(|n| {
                    &***n != WILDCARD && !req.resource_names_subscribe.iter().any(|s| s == &***n)
                })
                .map(|n| limits::name_cost(n))
                .sum();
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
                    versions,
                }),
                None => out.push(StreamEvent::Ack {
                    type_url: type_url.clone(),
                    nonce,
                    versions,
                    changed_at,
                    absent: Vec::new(),
                }),
            }
        }
        // The subscription's change, for observers (their copies of the
        // names are the stream's).
        let mut added = Vec::new();
        let mut removed = Vec::new();
        for n in &req.resource_names_unsubscribe {
            if n == WILDCARD {
                st.wildcard = false;
                self.subs.remove(&tc, WILDCARD);
            } else {
                removed.extend(st.names.take(n.as_str()));
                st.known.remove(n.as_str());
                st.dirty.remove(n.as_str());
                self.subs.remove(&tc, n);
                self.gate.forget(&type_url, n);
            }
        }
        for n in req.resource_names_subscribe {
            if n == WILDCARD {
                st.wildcard = true;
            } else if let Some(held) = st.names.get(n.as_str()) {
                st.dirty.insert(held.clone());
            } else {
                // One copy of the name, shared by every map that holds it
                // (the one `known` holds, if any).
                let n = st
                    .known
                    .get_key_value(n.as_str())
                    .map_or_else(|| Arc::from(n), |(k, _)| k.clone());
                st.names.insert(n.clone());
                st.dirty.insert(n.clone());
                added.push(n.clone());
                // Outside the caller's scope: answered as absent, never
                // watched, so its changes do not even wake the stream.
                if !self.gate.refuses(&type_url, &n) {
                    self.subs.add(&tc, &n);
                }
            }
        }
        if st.wildcard != was_wildcard || !added.is_empty() || !removed.is_empty() {
            out.push(StreamEvent::Subscribed {
                type_url: type_url.clone(),
                wildcard: st.wildcard,
                added,
                removed,
            });
        }
        if !resumed.is_empty() {
            out.push(StreamEvent::Resumed {
                type_url: type_url.clone(),
                versions: resumed,
                absent: Vec::new(),
            });
        }
        // A wildcard watches every name; what the stream may not read is
        // left out as each response is built.
        if st.wildcard && !self.subs.holds(&type_url, WILDCARD) {
            self.subs.add(&tc, &Arc::from(WILDCARD));
            st.dirty.extend(tc.names().into_iter().map(Arc::from));
            st.dirty.extend(st.known.keys().cloned());
        }
        self.flush_type(&type_url, out);
        Ok(())
    }

    /// The names the stream would subscribe to of `type_url` after `req`
    /// (those it holds, less those unsubscribed, plus those subscribed
    /// and, on the first request, those it says it holds), checked against
    /// the limits before any of it is kept; returns what they cost
    /// ([`limits::name_cost`]), with the names the first request said it
    /// held. Under a wildcard, the names of the resources sent are the
    /// server's, not the client's, and cost nothing.
    fn check_names(
        &self,
        type_url: &Arc<str>,
        req: &DeltaDiscoveryRequest,
        first: bool,
    ) -> Result<usize, Status> {
        let added = req.resource_names_subscribe.iter().chain(
            first
                .then_some(req.initial_resource_versions.keys())
                .into_iter()
                .flatten(),
        );
        let st = self.types.get(type_url);
        let mut after: HashSet<&str> = st
            .map(|st| st.names.iter().map(|n| &**n).collect())
            .unwrap_or_default();
        for n in &req.resource_names_unsubscribe {
            after.remove(n.as_str());
        }
        for n in added.filter(|n| *n != WILDCARD) {
            limits::check_name(type_url, n)?;
            after.insert(n);
        }
        self.limits.check_names(type_url, after.len())?;
        let initial = st.map_or(0, |st| st.initial_bytes);
        Ok(after.into_iter().map(limits::name_cost).sum::<usize>() + initial)
    }

    pub(crate) fn on_wake(&mut self, out: &mut Vec<StreamEvent>) {
        for (type_url, names) in self.subs.wake.take() {
            if let Some(st) = self.types.get_mut(&type_url) {
                st.dirty.extend(names.into_iter().map(Arc::from));
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
            .read(|held| names.iter().map(|n| held.get(&**n).cloned()).collect());
        let mut dirty = names.into_iter().zip(current);
        while let Some((name, r)) = dirty.next() {
            let explicit = st.names.contains(&name);
            if !explicit && !st.wildcard {
                continue;
            }
            // Named: what the stream may read; carried by the wildcard
            // only: what the application puts in wildcards.
            let visible = r.filter(|_| match explicit {
                true => self.gate.allows(type_url, &name),
                false => self.gate.in_wildcard(type_url, &name),
            });
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
        let removed: Vec<String> = removed.iter().map(|n| n.to_string()).collect();
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
