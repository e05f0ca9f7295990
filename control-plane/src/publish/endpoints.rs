//! Turns registry changes into xDS resources.
//!
//! Each service becomes one `isdp.v1.ServiceEndpoints` resource named after
//! it. Changes are coalesced: after the first change the builder waits a
//! short debounce, then rebuilds every service touched meanwhile, once.

use std::{
    collections::BTreeSet,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use isdp_proto::v1::{SERVICE_ENDPOINTS_TYPE_URL, ServiceEndpoints};
use prost::Message;
use tokio::sync::{broadcast, watch};

use crate::{
    registry::{Change, Registry, quota::endpoint},
    xds::Cache,
};

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
const _: () = assert!(crate::xds::DELTA_RESPONSE_BUDGET <= MAX_RESOURCE_BYTES);

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

/// Publishes one service's resource; `changed_at` is when the change was
/// first seen, where convergence is measured from.
fn publish(cache: &Cache, registry: &Registry, service: &str, changed_at: Instant) {
    match service_endpoints(registry, service) {
        Some(r) => {
            let Some(encoded) = within_cap(&r) else {
                return;
            };
            cache.set_at(
                SERVICE_ENDPOINTS_TYPE_URL,
                service,
                Bytes::from(encoded),
                changed_at,
            )
        }
        None => cache.remove(SERVICE_ENDPOINTS_TYPE_URL, service),
    };
}

/// The encoded resource, or None (logged) when it is over
/// [`MAX_RESOURCE_BYTES`] and must not be published.
fn within_cap(r: &ServiceEndpoints) -> Option<Vec<u8>> {
    let encoded = r.encode_to_vec();
    if encoded.len() > MAX_RESOURCE_BYTES {
        tracing::error!(
            service = %r.service,
            bytes = encoded.len(),
            max = MAX_RESOURCE_BYTES,
            "ServiceEndpoints resource larger than sidecars decode; keeping the previous one"
        );
        return None;
    }
    Some(encoded)
}

fn publish_all(cache: &Cache, registry: &Registry, changed_at: Instant) {
    let mut names: BTreeSet<String> = registry.services().into_keys().collect();
    if let Some(tc) = cache.type_cache(SERVICE_ENDPOINTS_TYPE_URL) {
        names.extend(tc.names());
    }
    for s in names {
        publish(cache, registry, &s, changed_at);
    }
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
                for s in &dirty {
                    publish(&cache, &registry, s, changed_at);
                }
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
