//! Authorization rules + registry -> `isdp.v1.AuthorizationPolicy`, one per
//! destination: for every registered service (its sidecars subscribe to
//! their own services' policies and refuse inbound calls until one arrives)
//! and every destination that has rules. Unchanged policies hash to the
//! same version and wake no stream; a new rule set is published as one
//! batch.

use std::collections::BTreeSet;

use isdp_proto::v1::AuthorizationPolicy;
use isdp_xds::{Batch, Cache};
use tokio::sync::{broadcast, watch};

use crate::{
    authz::{Authz, Rules},
    registry::{Change, Registry},
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
                    Ok(Change::Service(s)) => {
                        let mut batch = Batch::new();
                        publish(&mut batch, &registry, &current, &trust_domain, &s);
                        cache.apply(batch);
                    }
                    Ok(Change::All) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        publish_all(&cache, &registry, &current, &trust_domain)
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    })
}

/// Adds `service`'s policy to `batch`, or its removal when the service is
/// neither registered nor the destination of a rule.
fn publish(
    batch: &mut Batch,
    registry: &Registry,
    rules: &Rules,
    trust_domain: &str,
    service: &str,
) {
    let wanted =
        !registry.instances(service).is_empty() || rules.by_destination.contains_key(service);
    if wanted {
        batch.set(service, &rules.policy(service, trust_domain));
    } else {
        batch.remove::<AuthorizationPolicy>(service);
    }
}

fn publish_all(cache: &Cache, registry: &Registry, rules: &Rules, trust_domain: &str) {
    let mut names: BTreeSet<String> = registry.services().into_keys().collect();
    names.extend(rules.by_destination.keys().cloned());
    names.extend(cache.names::<AuthorizationPolicy>());
    let mut batch = Batch::new();
    for s in names {
        publish(&mut batch, registry, rules, trust_domain, &s);
    }
    cache.apply(batch);
}
