//! Serves each stored policy over xDS as `isdp.v1.TrafficPolicy`, named by
//! its service; a deleted policy's resource is removed, so callers go back
//! to their defaults. Unchanged policies hash to the same version and wake
//! nobody.

use std::collections::BTreeSet;

use bytes::Bytes;
use isdp_proto::v1::TRAFFIC_POLICY_TYPE_URL;
use prost::Message;
use tokio::sync::watch;

use super::{Policies, decode_all};
use crate::xds::Cache;

pub fn spawn(
    policies: Policies,
    cache: Cache,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let mut changes = policies.subscribe();
    tokio::spawn(async move {
        loop {
            let current = decode_all(&changes.borrow_and_update());
            let mut stale: BTreeSet<String> = cache
                .type_cache(TRAFFIC_POLICY_TYPE_URL)
                .map(|tc| tc.names().into_iter().collect())
                .unwrap_or_default();
            for (service, stored) in current {
                stale.remove(&service);
                let policy = stored.policy.unwrap_or_default();
                cache.set(
                    TRAFFIC_POLICY_TYPE_URL,
                    &service,
                    Bytes::from(policy.encode_to_vec()),
                );
            }
            for service in stale {
                cache.remove(TRAFFIC_POLICY_TYPE_URL, &service);
            }
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                changed = changes.changed() => if changed.is_err() { return },
            }
        }
    })
}
