//! The running publisher on a real (embedded) registry: Envoy's outbound
//! routes follow services as they appear and go, though the publisher
//! rebuilds them only when some service's virtual host changed.

use std::{sync::Arc, time::Duration};

use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};

use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use isdp_proto::v1::{HealthStatus as Health, Instance};
use prost::{Message, Name};
use tokio::sync::watch;

use super::super::{ENVOY_OUTBOUND, spawn};
use super::settings;
use crate::{
    load::{LoadView, LoadWeights, WeightConfig},
    policy::Policies,
    registry::Registry,
    store::{Store, embedded::EmbeddedStore},
};

fn instance(id: &str, service: &str, weight: u32) -> Instance {
    Instance {
        id: id.into(),
        service: service.into(),
        address: "127.0.0.1".into(),
        port: 8080,
        weight,
        status: Health::Healthy as i32,
        ..Default::default()
    }
}

/// The virtual hosts' names in Envoy's outbound routes, once they are
/// `want` (the publisher works behind a short debounce).
async fn hosts_become(cache: &isdp_xds::Cache, want: &[&str]) {
    let read = || {
        let encoded = cache.get(&RouteConfiguration::type_url(), ENVOY_OUTBOUND)?;
        let any = envoy_types::pb::google::protobuf::Any::decode(encoded.any.clone()).ok()?;
        let routes = RouteConfiguration::decode(any.value.as_slice()).ok()?;
        Some(
            routes
                .virtual_hosts
                .into_iter()
                .map(|h| h.name)
                .collect::<Vec<_>>(),
        )
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let hosts = read();
        if hosts.as_deref().is_some_and(|h| h == want) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "outbound hosts are {hosts:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn envoy_routes_follow_services_as_they_come_and_go() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let (stop, shutdown) = watch::channel(false);
    let registry = Registry::start(Arc::new(store.clone()), "/isdp/", shutdown.clone())
        .await
        .unwrap();
    let policies = Policies::start(
        Arc::new(store.clone()),
        "/isdp/",
        registry.clone(),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let cache = crate::publish::cache();
    let task = spawn(
        settings(),
        registry.clone(),
        policies,
        LoadWeights::operator_only(),
        cache.clone(),
        shutdown,
    );

    // An empty mesh still has Envoy's route configuration, empty.
    hosts_become(&cache, &[]).await;
    registry
        .register(instance("a-1", "alpha", 1))
        .await
        .unwrap();
    hosts_become(&cache, &["alpha"]).await;
    registry.register(instance("b-1", "beta", 1)).await.unwrap();
    hosts_become(&cache, &["alpha", "beta"]).await;
    // Endpoint changes leave the hosts as they are; the next change of
    // hosts is still seen after them.
    registry
        .register(instance("a-1", "alpha", 7))
        .await
        .unwrap();
    registry
        .register(instance("a-2", "alpha", 1))
        .await
        .unwrap();
    registry.deregister("b-1").await.unwrap();
    hosts_become(&cache, &["alpha"]).await;
    registry.deregister("a-1").await.unwrap();
    registry.deregister("a-2").await.unwrap();
    hosts_become(&cache, &[]).await;

    let _ = stop.send(true);
    task.await.unwrap();
    store.close().await;
}

/// The endpoint weights of `cluster`'s published assignment, by hostname
/// (the instance id).
fn assigned_weights(cache: &isdp_xds::Cache, cluster: &str) -> Vec<(String, u32)> {
    let Some(encoded) = cache.get(&ClusterLoadAssignment::type_url(), cluster) else {
        return Vec::new();
    };
    let any = envoy_types::pb::google::protobuf::Any::decode(encoded.any.clone()).unwrap();
    let a = ClusterLoadAssignment::decode(any.value.as_slice()).unwrap();
    let mut got: Vec<(String, u32)> = a
        .endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .map(|e| {
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                panic!("an endpoint: {e:?}")
            };
            (
                ep.hostname.clone(),
                e.load_balancing_weight.map_or(0, |w| w.value),
            )
        })
        .collect();
    got.sort();
    got
}

/// Summaries written after the assignment was published re-weigh it, as
/// they re-weigh ISDP's own endpoints: proxyless clients and Envoy get
/// the weights the sidecars get.
#[tokio::test]
async fn load_summaries_reweigh_the_assignment() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let (stop, shutdown) = watch::channel(false);
    let registry = Registry::start(store.clone(), "/isdp/", shutdown.clone())
        .await
        .unwrap();
    let policies = Policies::start(store.clone(), "/isdp/", registry.clone(), shutdown.clone())
        .await
        .unwrap();
    for (id, weight, port) in [("a", 1, 8081), ("b", 1, 8082), ("c", 2, 8083)] {
        registry
            .register(Instance {
                port,
                ..instance(id, "web", weight)
            })
            .await
            .unwrap();
    }
    let view = LoadView::start(store.clone(), "/isdp/", shutdown.clone())
        .await
        .unwrap();
    let cache = crate::publish::cache();
    let task = spawn(
        settings(),
        registry.clone(),
        policies,
        LoadWeights::new(WeightConfig::default(), view),
        cache.clone(),
        shutdown.clone(),
    );
    // No summary yet: every factor is 1 (the operator's weight × 100).
    let until = |want: Vec<(String, u32)>| {
        let cache = cache.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let got = assigned_weights(&cache, "web");
                if got == want {
                    return;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "weights are {got:?}, want {want:?}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    let named = |w: [(&str, u32); 3]| w.map(|(id, w)| (id.to_owned(), w)).to_vec();
    until(named([("a", 100), ("b", 100), ("c", 200)])).await;

    // b three times as busy per request as a and c.
    crate::load::write_summaries(&store, shutdown, &[("a", 0.25), ("b", 0.75), ("c", 0.25)]).await;
    until(named([("a", 100), ("b", 33), ("c", 200)])).await;

    let _ = stop.send(true);
    task.await.unwrap();
}
