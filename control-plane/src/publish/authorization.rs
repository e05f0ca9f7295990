//! Publishes one `isdp.v1.AuthorizationPolicy` per destination into the
//! xDS cache: for every registered service (its sidecars subscribe to their
//! own services' policies and refuse inbound calls until one arrives) and
//! every destination that has rules. Unchanged policies hash to the same
//! version and wake no stream.

use std::collections::BTreeSet;

use bytes::Bytes;
use isdp_proto::v1::AUTHORIZATION_POLICY_TYPE_URL;
use prost::Message;
use tokio::sync::{broadcast, watch};

use super::{Authz, Rules};
use crate::{
    registry::{Change, Registry},
    xds::Cache,
};

/// Publishes every policy now, then follows the rules and the registry
/// until shutdown.
pub fn spawn(
    authz: Authz,
    registry: Registry,
    cache: Cache,
    trust_domain: String,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let mut rules = authz.subscribe();
    let mut changes = registry.subscribe();
    tokio::spawn(async move {
        let mut current = Rules::from_entries(&rules.borrow_and_update());
        publish_all(&cache, &registry, &current, &trust_domain);
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                changed = rules.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    current = Rules::from_entries(&rules.borrow_and_update());
                    publish_all(&cache, &registry, &current, &trust_domain);
                }
                change = changes.recv() => match change {
                    Ok(Change::Service(s)) => publish(&cache, &registry, &current, &trust_domain, &s),
                    Ok(Change::All) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        publish_all(&cache, &registry, &current, &trust_domain)
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    })
}

fn publish(cache: &Cache, registry: &Registry, rules: &Rules, trust_domain: &str, service: &str) {
    let wanted =
        !registry.instances(service).is_empty() || rules.by_destination.contains_key(service);
    if wanted {
        let policy = rules.policy(service, trust_domain);
        cache.set(
            AUTHORIZATION_POLICY_TYPE_URL,
            service,
            Bytes::from(policy.encode_to_vec()),
        );
    } else {
        cache.remove(AUTHORIZATION_POLICY_TYPE_URL, service);
    }
}

fn publish_all(cache: &Cache, registry: &Registry, rules: &Rules, trust_domain: &str) {
    let mut names: BTreeSet<String> = registry.services().into_keys().collect();
    names.extend(rules.by_destination.keys().cloned());
    if let Some(tc) = cache.type_cache(AUTHORIZATION_POLICY_TYPE_URL) {
        names.extend(tc.names());
    }
    for s in names {
        publish(cache, registry, rules, trust_domain, &s);
    }
}
