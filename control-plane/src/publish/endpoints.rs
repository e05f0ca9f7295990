//! Registry -> `isdp.v1.ServiceEndpoints`, one resource per service, named
//! after it.
//!
//! Changes are coalesced: after the first change the builder waits a short
//! debounce, then rebuilds every service touched meanwhile, once, and
//! publishes them as one batch (each stream is woken once for the lot).

use std::{
    collections::BTreeSet,
    sync::Arc,
    time::{Duration, Instant},
};

use isdp_proto::v1::ServiceEndpoints;
use isdp_xds::{Batch, Cache};
use prost::Message;
use tokio::sync::{broadcast, watch};

use crate::registry::{Change, Registry, quota::endpoint};

/// How long changes are gathered before resources are rebuilt. Short enough
/// to stay well inside the one-second propagation budget, long enough to
/// fold a burst (a restarting deployment) into one push.
pub const DEBOUNCE: Duration = Duration::from_millis(5);
/// The longest a change may wait while rebuilds are expensive.
pub const MAX_DEBOUNCE: Duration = Duration::from_millis(100);

/// The largest `ServiceEndpoints` resource published: half of what a
/// sidecar decodes in one xDS message
/// ([`isdp_core::dial::MAX_RESPONSE_BYTES`]), so one resource plus its
/// response's envelope always fits. `--max-service-endpoints-bytes` (at
/// most this much) refuses registrations well before; this cap catches
/// only writes that raced past that bound on several replicas at once. A
/// service over it keeps its previous resource, so its growth never breaks
/// the ADS stream of every sidecar that follows it.
pub const MAX_RESOURCE_BYTES: usize = isdp_core::dial::MAX_RESPONSE_BYTES / 2;

// Several resources share a delta response only up to the budget, and a
// single one is at most the cap: either way a response fits a sidecar.
const _: () = assert!(isdp_xds::DELTA_RESPONSE_BUDGET <= MAX_RESOURCE_BYTES);

/// The `ServiceEndpoints` resource for one service, or None if it has no
/// instances (the resource is then removed).
pub fn service_endpoints(registry: &Registry, service: &str) -> Option<ServiceEndpoints> {
    let instances = registry.instances(service);
    if instances.is_empty() {
        return None;
    }
    let endpoints = instances.iter().map(|s| endpoint(&s.instance)).collect();
    Some(ServiceEndpoints {
        service: service.to_owned(),
        endpoints,
    })
}

/// Adds one service's resource to `batch`, or its removal when it has no
/// instances left.
fn publish(batch: &mut Batch, registry: &Registry, service: &str) {
    match service_endpoints(registry, service) {
        Some(r) => {
            if let Some(r) = within_cap(&r) {
                batch.set(service, r);
            }
        }
        None => {
            batch.remove::<ServiceEndpoints>(service);
        }
    }
}

/// The resource, or None (logged) when it is over [`MAX_RESOURCE_BYTES`]
/// and must not be published.
fn within_cap(r: &ServiceEndpoints) -> Option<&ServiceEndpoints> {
    let len = r.encoded_len();
    if len > MAX_RESOURCE_BYTES {
        tracing::error!(
            service = %r.service,
            bytes = len,
            max = MAX_RESOURCE_BYTES,
            "ServiceEndpoints resource larger than sidecars decode; keeping the previous one"
        );
        return None;
    }
    Some(r)
}

/// Publishes `services` as one batch; `changed_at` is when the change was
/// first seen, where convergence is measured from.
fn publish_services<'a>(
    cache: &Cache,
    registry: &Registry,
    services: impl IntoIterator<Item = &'a str>,
    changed_at: Instant,
) {
    let mut batch = Batch::new();
    for s in services {
        publish(&mut batch, registry, s);
    }
    cache.apply_at(batch, changed_at);
}

/// Every registered service, and every one published that may be gone.
fn publish_all(cache: &Cache, registry: &Registry, changed_at: Instant) {
    let mut names: BTreeSet<String> = registry.services().into_keys().collect();
    names.extend(cache.names::<ServiceEndpoints>());
    publish_services(
        cache,
        registry,
        names.iter().map(String::as_str),
        changed_at,
    );
}

/// Publishes every service now, then follows the registry until shutdown.
pub fn spawn(
    registry: Registry,
    cache: Cache,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let mut changes = registry.subscribe();
    publish_all(&cache, &registry, Instant::now());
    tokio::spawn(async move {
        // Under a burst the window stretches to a few times the last
        // rebuild's cost, so rebuilding never eats most of a core; a lone
        // change still goes out after `DEBOUNCE`.
        let mut window = DEBOUNCE;
        loop {
            let first = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                c = changes.recv() => c,
            };
            let changed_at = Instant::now();
            let mut dirty: BTreeSet<Arc<str>> = BTreeSet::new();
            let mut all = false;
            let deadline = tokio::time::sleep(window);
            tokio::pin!(deadline);
            let mut next = Some(first);
            loop {
                match next.take() {
                    Some(Ok(Change::Service(s))) => {
                        dirty.insert(s);
                    }
                    Some(Ok(Change::All)) | Some(Err(broadcast::error::RecvError::Lagged(_))) => {
                        all = true
                    }
                    Some(Err(broadcast::error::RecvError::Closed)) => return,
                    None => {}
                }
                tokio::select! {
                    _ = &mut deadline => break,
                    c = changes.recv() => next = Some(c),
                }
            }
            let started = Instant::now();
            if all {
                publish_all(&cache, &registry, changed_at);
            } else {
                publish_services(&cache, &registry, dirty.iter().map(|s| &**s), changed_at);
            }
            window = (started.elapsed() * 4).clamp(DEBOUNCE, MAX_DEBOUNCE);
        }
    })
}

#[cfg(test)]
mod tests {
    use isdp_proto::v1::Endpoint;

    use super::*;

    #[test]
    fn a_resource_over_the_cap_is_not_published() {
        let with_value = |len: usize| ServiceEndpoints {
            service: "big".into(),
            endpoints: vec![Endpoint {
                instance_id: "a".into(),
                metadata: [("k".to_owned(), "v".repeat(len))].into(),
                ..Default::default()
            }],
        };
        assert!(within_cap(&with_value(1024)).is_some());
        assert!(within_cap(&with_value(MAX_RESOURCE_BYTES - 64)).is_some());
        assert!(within_cap(&with_value(MAX_RESOURCE_BYTES)).is_none());
    }
}
