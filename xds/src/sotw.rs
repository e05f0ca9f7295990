//! State of the world: every response carries the full set of subscribed
//! resources of its type.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::Arc,
    time::Instant,
};

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use tonic::Status;

use crate::auth::ReadScope;

use super::{
    Cache, Subscriptions, TypeCache, WILDCARD,
    resource::{set_version, sotw_response},
    scope::Scope,
    server::StreamEvent,
};

pub(super) struct SotwStream {
    cache: Cache,
    scope: Scope,
    subs: Subscriptions,
    types: HashMap<Arc<str>, TypeState>,
}

struct TypeState {
    tc: Arc<TypeCache>,
    /// None: wildcard (every resource of the type).
    names: Option<BTreeSet<String>>,
    /// Version of the set last sent (or that the client said it holds).
    sent: Option<String>,
    acked: Option<String>,
    /// Nonce of the response awaiting ACK/NACK; nothing more is sent for
    /// this type until it is answered.
    /// The response awaiting ACK: its nonce and the newest change it carries.
    pending: Option<(String, Option<Instant>)>,
    /// Nonce of the latest response sent; requests naming an older one
    /// are stale.
    last_nonce: Option<String>,
    dirty: bool,
}

impl SotwStream {
    pub(super) fn new(cache: Cache, scope: ReadScope) -> Self {
        SotwStream {
            scope: Scope::new(scope),
            subs: Subscriptions::new(cache.clone()),
            cache,
            types: HashMap::new(),
        }
    }

    pub(super) fn wake(&self) -> &Arc<super::Wake> {
        &self.subs.wake
    }

    pub(super) fn on_request(
        &mut self,
        req: DiscoveryRequest,
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
                names: Some(BTreeSet::new()),
                sent: None,
                acked: None,
                pending: None,
                last_nonce: None,
                dirty: true,
            });

        if req.response_nonce.is_empty() {
            if first && !req.version_info.is_empty() {
                // A reconnecting client: it holds this version already.
                st.sent = Some(req.version_info.clone());
                st.acked = Some(req.version_info.clone());
            }
        } else if st.last_nonce.as_deref() != Some(req.response_nonce.as_str()) {
            // A stale nonce: the client has not seen our latest response
            // yet. Per the protocol, ignore the request.
            return Ok(());
        } else if let Some((_, changed_at)) = st.pending.take_if(|(n, _)| *n == req.response_nonce)
        {
            match &req.error_detail {
                Some(e) => out.push(StreamEvent::Nack {
                    type_url: type_url.clone(),
                    nonce: req.response_nonce.clone(),
                    message: e.message.clone(),
                }),
                None => {
                    st.acked = Some(req.version_info.clone());
                    out.push(StreamEvent::Ack {
                        type_url: type_url.clone(),
                        nonce: req.response_nonce.clone(),
                        versions: vec![(String::new(), req.version_info.clone())],
                        changed_at,
                    });
                }
            }
        }
        // Otherwise: a request carrying the latest (already answered) nonce,
        // e.g. a subscription change after an ACK.

        let wanted: Option<BTreeSet<String>> = if (first && req.resource_names.is_empty())
            || req.resource_names.iter().any(|n| n == WILDCARD)
        {
            None
        } else {
            Some(req.resource_names.iter().cloned().collect())
        };
        let wanted = match wanted {
            Some(names) => Some(self.scope.filter(&type_url, names)),
            None => {
                self.scope.wildcard(&type_url)?;
                None
            }
        };
        if wanted != st.names {
            let old: HashSet<String> = key_set(&st.names);
            let new: HashSet<String> = key_set(&wanted);
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
    pub(super) fn on_wake(&mut self, out: &mut Vec<StreamEvent>) {
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
        let resources: Vec<_> = match &st.names {
            None => st.tc.names().iter().filter_map(|n| st.tc.get(n)).collect(),
            Some(names) => names.iter().filter_map(|n| st.tc.get(n)).collect(),
        };
        let version = set_version(resources.iter().map(|r| &**r));
        if st.sent.as_deref() == Some(version.as_str()) {
            return;
        }
        let nonce = self.cache.nonce();
        let bytes = sotw_response(type_url, &version, &nonce, &resources);
        st.sent = Some(version);
        let changed_at = resources.iter().map(|r| r.changed_at).max();
        st.pending = Some((nonce.clone(), changed_at));
        st.last_nonce = Some(nonce.clone());
        out.push(StreamEvent::Response {
            type_url: type_url.clone(),
            nonce,
            bytes,
            resources: resources.len(),
        });
    }
}

fn key_set(names: &Option<BTreeSet<String>>) -> HashSet<String> {
    match names {
        None => HashSet::from([WILDCARD.to_owned()]),
        Some(n) => n.iter().cloned().collect(),
    }
}

pub(super) fn unknown_type(cache: &Cache, type_url: &str) -> Status {
    let mut served = cache.type_urls();
    served.sort();
    Status::invalid_argument(format!(
        "type_url: {type_url:?} is not served; served types: {}",
        served.join(", ")
    ))
}
