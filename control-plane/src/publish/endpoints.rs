//! Registry -> `isdp.v1.ServiceEndpoints`, one resource per service, named
//! after it.
//!
//! Changes are coalesced: after the first change the builder waits a short
//! debounce, then rebuilds every service touched meanwhile, once, and
//! publishes them as one batch (each stream is woken once for the lot).
//!
//! Each endpoint's `weight` is its operator's weight times its load factor
//! ([`LoadWeights`]): a changed load summary rebuilds its service, and so
//! does the end of a summary's blackout ([`LoadFollow`]),
//! which no write announces.

use std::{
    collections::BTreeSet,
    sync::Arc,
    time::{Duration, Instant},
};

use isdp_proto::v1::ServiceEndpoints;
use isdp_xds::{Batch, Cache};
use prost::Message;
use tokio::sync::{broadcast, watch};

use crate::{
    load::{LoadFollow, LoadWeights, WeightObserver},
    registry::{Change, Registry, quota::endpoint},
};

/// What the publisher weighs endpoints with, and records weights in.
#[derive(Clone)]
pub struct Weighing {
    pub weights: LoadWeights,
    /// Told every service's weights as they are published (the metrics).
    pub observer: Option<Arc<dyn WeightObserver>>,
}

impl Weighing {
    /// Operator weights, recorded nowhere (tests).
    pub fn operator_only() -> Self {
        Weighing {
            weights: LoadWeights::operator_only(),
            observer: None,
        }
    }
}

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
pub fn service_endpoints(
    registry: &Registry,
    weighing: &Weighing,
    service: &str,
) -> Option<ServiceEndpoints> {
    let instances = registry.instances(service);
    if let Some(o) = &weighing.observer
        && instances.is_empty()
    {
        o.weighed(service, &[]);
    }
    if instances.is_empty() {
        return None;
    }
    let plain: Vec<_> = instances.iter().map(|s| &s.instance).collect();
    let weighed = weighing.weights.weigh(&plain);
    if let Some(o) = &weighing.observer {
        let series: Vec<_> = plain
            .iter()
            .zip(&weighed)
            .map(|(i, w)| (i.id.clone(), w.utilization, w.weight))
            .collect();
        o.weighed(service, &series);
    }
    let endpoints = plain
        .iter()
        .zip(weighed)
        .map(|(i, w)| {
            let mut e = endpoint(i);
            e.weight = w.weight;
            e.operator_weight = w.operator_weight;
            e.load_factor = w.factor;
            e.weight_reason = w.reason;
            e
        })
        .collect();
    Some(ServiceEndpoints {
        service: service.to_owned(),
        endpoints,
    })
}

/// Adds one service's resource to `batch`, or its removal when it has no
/// instances left.
fn publish(batch: &mut Batch, registry: &Registry, weighing: &Weighing, service: &str) {
    match service_endpoints(registry, weighing, service) {
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
    weighing: &Weighing,
    services: impl IntoIterator<Item = &'a str>,
    changed_at: Instant,
) {
    let mut batch = Batch::new();
    for s in services {
        publish(&mut batch, registry, weighing, s);
    }
    cache.apply_at(batch, changed_at);
}

/// Every registered service, and every one published that may be gone.
fn publish_all(cache: &Cache, registry: &Registry, weighing: &Weighing, changed_at: Instant) {
    let mut names: BTreeSet<String> = registry.services().into_keys().collect();
    names.extend(cache.names::<ServiceEndpoints>());
    publish_services(
        cache,
        registry,
        weighing,
        names.iter().map(String::as_str),
        changed_at,
    );
}

/// The services of the instances `ids` (those still registered).
fn services_of(registry: &Registry, ids: impl IntoIterator<Item = String>) -> BTreeSet<String> {
    ids.into_iter()
        .filter_map(|id| registry.get(&id).map(|s| s.instance.service.clone()))
        .collect()
}

/// Publishes every service now, then follows the registry until shutdown.
pub fn spawn(
    registry: Registry,
    cache: Cache,
    weighing: Weighing,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let mut changes = registry.subscribe();
    let mut loads = LoadFollow::new(&weighing.weights);
    publish_all(&cache, &registry, &weighing, Instant::now());
    tokio::spawn(async move {
        // Under a burst the window stretches to a few times the last
        // rebuild's cost, so rebuilding never eats most of a core; a lone
        // change still goes out after `DEBOUNCE`.
        let mut window = DEBOUNCE;
        loop {
            let first = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                c = changes.recv() => c,
                ids = LoadFollow::next(&mut loads) => {
                    // Summaries are written at most every few seconds per
                    // instance: no debounce needed.
                    let services = services_of(&registry, ids);
                    if !services.is_empty() {
                        publish_services(
                            &cache,
                            &registry,
                            &weighing,
                            services.iter().map(String::as_str),
                            Instant::now(),
                        );
                    }
                    continue;
                }
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
                publish_all(&cache, &registry, &weighing, changed_at);
            } else {
                publish_services(
                    &cache,
                    &registry,
                    &weighing,
                    dirty.iter().map(|s| &**s),
                    changed_at,
                );
            }
            window = (started.elapsed() * 4).clamp(DEBOUNCE, MAX_DEBOUNCE);
        }
    })
}

#[cfg(test)]
mod tests {
    use isdp_proto::v1::{Endpoint, Instance};

    use super::*;
    use crate::load::{LoadView, WeightConfig};
    use crate::store::{Store, embedded::EmbeddedStore};

    /// Reports -> the session's writer -> the store -> a replica's view ->
    /// weights in the published resource, composed with the operator's.
    #[tokio::test]
    async fn reports_weigh_the_published_endpoints() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let (_stop, shutdown) = watch::channel(false);
        let registry = Registry::start(store.clone(), "/isdp/", shutdown.clone())
            .await
            .unwrap();
        for (id, weight) in [("a", 1), ("b", 1), ("c", 2)] {
            registry
                .register(Instance {
                    id: id.into(),
                    service: "web".into(),
                    address: "127.0.0.1".into(),
                    port: 8080,
                    weight,
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        let view = LoadView::start(store.clone(), "/isdp/", shutdown.clone())
            .await
            .unwrap();
        let mut changes = view.subscribe();
        // a and c equally busy, b three times as busy per request.
        crate::load::write_summaries(&store, shutdown, &[("a", 0.25), ("b", 0.75), ("c", 0.25)])
            .await;
        tokio::time::timeout(Duration::from_secs(5), async {
            while changes.borrow_and_update().len() < 3 {
                changes.changed().await.unwrap();
            }
        })
        .await
        .unwrap();
        let weighing = Weighing {
            weights: LoadWeights::new(WeightConfig::default(), view),
            observer: None,
        };
        let r = service_endpoints(&registry, &weighing, "web").unwrap();
        let got: Vec<(&str, u32, u32, &str)> = r
            .endpoints
            .iter()
            .map(|e| {
                (
                    e.instance_id.as_str(),
                    e.weight,
                    e.operator_weight,
                    e.weight_reason.as_str(),
                )
            })
            .collect();
        // Raw 400, 133, 400 against their median 400: factors 1, 0.33,
        // 1; c's operator 2.
        assert_eq!(
            got,
            [
                ("a", 100, 1, "load: util 0.25 rps 100"),
                ("b", 33, 1, "load: util 0.75 rps 100"),
                ("c", 200, 2, "load: util 0.25 rps 100"),
            ]
        );
        let plain = service_endpoints(&registry, &Weighing::operator_only(), "web").unwrap();
        let weights: Vec<u32> = plain.endpoints.iter().map(|e| e.weight).collect();
        assert_eq!(weights, [1, 1, 2], "operator weights only");
    }

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
