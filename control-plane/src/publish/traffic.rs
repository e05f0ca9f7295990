//! Stored traffic policies -> `isdp.v1.TrafficPolicy`, one per service,
//! named by it; a deleted policy's resource is removed, so callers go back
//! to their defaults. Every change is published as one batch; unchanged
//! policies hash to the same version and wake nobody.

use std::collections::BTreeSet;

use isdp_proto::v1::TrafficPolicy;
use isdp_xds::{Batch, Cache};
use tokio::sync::watch;

use crate::policy::{Policies, decode_all};

pub fn spawn(
    policies: Policies,
    cache: Cache,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let mut changes = policies.subscribe();
    tokio::spawn(async move {
        loop {
            let current = decode_all(&changes.borrow_and_update());
            let mut stale: BTreeSet<String> = cache.names::<TrafficPolicy>().into_iter().collect();
            let mut batch = Batch::new();
            for (service, stored) in current {
                stale.remove(&service);
                batch.set(&service, &stored.policy.unwrap_or_default());
            }
            for service in stale {
                batch.remove::<TrafficPolicy>(&service);
            }
            cache.apply(batch);
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                changed = changes.changed() => if changed.is_err() { return },
            }
        }
    })
}
