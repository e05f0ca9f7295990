//! State of the world: every response carries the full set of subscribed
//! resources of its type.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::Arc,
    time::Instant,
};

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use tonic::Status;

use crate::{
    WILDCARD,
    access::{Gate, StreamAccess},
    cache::{Cache, Subscriptions, TypeCache, Wake},
    event::StreamEvent,
    limits::{self, Limits},
    log_rate::LogRate,
    resource::{Nonces, set_version, sotw_response},
};

pub(crate) struct SotwStream {
    cache: Cache,
    gate: Gate,
    subs: Subscriptions,
    types: HashMap<Arc<str>, TypeState>,
    limits: Limits,
    nonces: Nonces,
}

struct TypeState {
    tc: Arc<TypeCache>,
    /// None: wildcard (every resource of the type the stream may read).
    /// Each name is one `Arc<str>` shared with the stream's subscriptions.
    names: Option<BTreeSet<Arc<str>>>,
    /// Version of the set last sent (or that the client said it holds).
    sent: Option<String>,
    acked: Option<String>,
    /// The response awaiting ACK/NACK; nothing more is sent for this type
    /// until it is answered.
    pending: Option<Pending>,
    /// Nonce of the latest response sent; requests naming an older one
    /// are stale.
    last_nonce: Option<String>,
    dirty: bool,
    /// The first request said the client holds `sent` already: the first
    /// flush tells observers whether that is what it would be sent.
    resumed: bool,
}

/// A response sent and not yet ACKed or NACKed.
struct Pending {
    nonce: String,
    /// The newest change it carries.
    changed_at: Option<Instant>,
    /// The names subscribed by name it does not carry, reported with its
    /// ACK ([`StreamEvent::Ack`]).
    absent: Vec<Arc<str>>,
}

impl SotwStream {
    pub(crate) fn new(cache: Cache, access: Box<dyn StreamAccess>) -> Self {
        SotwStream {
            gate: Gate::new(access),
            subs: Subscriptions::new(cache.clone()),
            cache,
            types: HashMap::new(),
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

    pub(crate) fn check_node(&self, id: &str) -> Result<(), Status> {
        self.gate.node(id)
    }

    pub(crate) fn wake(&self) -> &Arc<Wake> {
        &self.subs.wake
    }

    pub(crate) fn on_request(
        &mut self,
        req: DiscoveryRequest,
        out: &mut Vec<StreamEvent>,
    ) -> Result<(), Status> {
        let tc = self.cache.serving(&req.type_url)?;
        let type_url = tc.type_url().clone();
        // The request names the whole set: checked, and charged, before
        // anything of it is kept.
        for n in &req.resource_names {
            limits::check_name(&type_url, n)?;
        }
        let requested: BTreeSet<&str> = req.resource_names.iter().map(String::as_str).collect();
        self.limits.check_names(&type_url, requested.len())?;
        let bytes = requested.iter().map(|n| limits::name_cost(n)).sum();
        self.gate.hold(&type_url, bytes)?;
        let first = !self.types.contains_key(&type_url);
        let st = self
            .types
            .entry(type_url.clone())
            .or_insert_with(|| TypeState {
                tc: tc.clone(),
                names: Some(BTreeSet::new()),
                sent: None,
                acked: None,
                pending: None,
                last_nonce: None,
                dirty: true,
                resumed: false,
            });

        if req.response_nonce.is_empty() {
            if first && !req.version_info.is_empty() {
                // A reconnecting client: it holds this version already.
                st.sent = Some(req.version_info.clone());
                st.acked = Some(req.version_info.clone());
                st.resumed = true;
            }
        } else if st.last_nonce.as_deref() != Some(req.response_nonce.as_str()) {
            // A stale nonce: the client has not seen our latest response
            // yet. Per the protocol, ignore the request.
            return Ok(());
        } else if let Some(pending) = st.pending.take_if(|p| p.nonce == req.response_nonce) {
            match &req.error_detail {
                Some(e) => out.push(StreamEvent::Nack {
                    type_url: type_url.clone(),
                    nonce: pending.nonce,
                    message: limits::nack_message(&e.message),
                    versions: vec![(String::new(), st.sent.clone().unwrap_or_default())],
                }),
                None => {
                    st.acked = Some(req.version_info.clone());
                    out.push(StreamEvent::Ack {
                        type_url: type_url.clone(),
                        nonce: pending.nonce,
                        versions: vec![(String::new(), req.version_info.clone())],
                        changed_at: pending.changed_at,
                        absent: pending.absent,
                    });
                }
            }
        }
        // Otherwise: a request carrying the latest (already answered) nonce,
        // e.g. a subscription change after an ACK.

        let wanted: Option<BTreeSet<Arc<str>>> =
            if (first && req.resource_names.is_empty()) || requested.contains(WILDCARD) {
                None
            } else {
                // One copy of each name: the one already held (subscribed,
                // or refused), if any.
                let held = st.names.as_ref();
                Some(
                    requested
                        .into_iter()
                        .map(|n| {
                            held.and_then(|h| h.get(n))
                                .or_else(|| self.gate.refused_name(&type_url, n))
                                .cloned()
                                .unwrap_or_else(|| n.into())
                        })
                        .collect(),
                )
            };
        // What the client subscribes to, refused names included, before
        // and after this request: observers hear of the difference.
        let before: BTreeSet<Arc<str>> = st
            .names
            .iter()
            .flatten()
            .chain(self.gate.refused_names(&type_url))
            .cloned()
            .collect();
        let no_names = BTreeSet::new();
        let after = wanted.as_ref().unwrap_or(&no_names);
        let added: Vec<Arc<str>> = after.difference(&before).cloned().collect();
        let removed: Vec<Arc<str>> = before.difference(after).cloned().collect();
        if wanted.is_none() != st.names.is_none() || !added.is_empty() || !removed.is_empty() {
            out.push(StreamEvent::Subscribed {
                type_url: type_url.clone(),
                wildcard: wanted.is_none(),
                added,
                removed,
            });
        }
        // Named: the names outside the stream's access are dropped (and
        // read as absent). Wildcard: filtered as each response is built.
        let wanted = match wanted {
            Some(names) => Some(self.gate.filter(&type_url, names)),
            None => {
                self.gate.keep_only(&type_url, &BTreeSet::new());
                None
            }
        };
        if wanted != st.names {
            let old = key_set(&st.names);
            let new = key_set(&wanted);
            for n in old.difference(&new) {
                self.subs.remove(&tc, n);
            }
            for n in new.difference(&old) {
                self.subs.add(&tc, n);
            }
            st.names = wanted;
            st.dirty = true;
        }
        self.flush_type(&type_url, out);
        Ok(())
    }

    /// Called when the cache signalled a change to something subscribed.
    pub(crate) fn on_wake(&mut self, out: &mut Vec<StreamEvent>) {
        for (type_url, _) in self.subs.wake.take() {
            if let Some(st) = self.types.get_mut(&type_url) {
                st.dirty = true;
            }
            self.flush_type(&type_url, out);
        }
    }

    fn flush_type(&mut self, type_url: &Arc<str>, out: &mut Vec<StreamEvent>) {
        let Some(st) = self.types.get_mut(type_url) else {
            return;
        };
        if st.pending.is_some() || !st.dirty {
            return;
        }
        st.dirty = false;
        // Read under one lock, so a batch's changes to this type go out
        // together; a wildcard carries only what the stream may read. The
        // names subscribed to that it does not carry are absent to the
        // client: those that do not exist, and those it may not read.
        let (mut resources, mut absent) = st.tc.read(|held| match &st.names {
            None => (held.values().cloned().collect::<Vec<_>>(), Vec::new()),
            Some(names) => {
                let mut absent = Vec::new();
                let found = names
                    .iter()
                    .filter_map(|n| {
                        let r = held.get(&**n).cloned();
                        if r.is_none() {
                            absent.push(n.clone());
                        }
                        r
                    })
                    .collect();
                (found, absent)
            }
        });
        if st.names.is_none() {
            resources.retain(|r| self.gate.in_wildcard(type_url, &r.name));
        } else {
            absent.extend(self.gate.refused_names(type_url).cloned());
        }
        let version = set_version(resources.iter().map(|r| &**r));
        let resumed = std::mem::take(&mut st.resumed);
        if st.sent.as_deref() == Some(version.as_str()) {
            if resumed {
                out.push(StreamEvent::Resumed {
                    type_url: type_url.clone(),
                    versions: vec![(String::new(), version)],
                    absent,
                });
            }
            return;
        }
        let nonce = self.nonces.next();
        let bytes = sotw_response(type_url, &version, &nonce, &resources);
        st.sent = Some(version);
        let changed_at = resources.iter().map(|r| r.changed_at).max();
        st.pending = Some(Pending {
            nonce: nonce.clone(),
            changed_at,
            absent,
        });
        st.last_nonce = Some(nonce.clone());
        out.push(StreamEvent::Response {
            type_url: type_url.clone(),
            nonce,
            bytes,
            resources: resources.len(),
        });
    }
}

fn key_set(names: &Option<BTreeSet<Arc<str>>>) -> HashSet<Arc<str>> {
    match names {
        None => HashSet::from([Arc::from(WILDCARD)]),
        Some(n) => n.iter().cloned().collect(),
    }
}
