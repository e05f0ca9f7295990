//! The running publisher on a real (embedded) registry: Envoy's outbound
//! routes follow services as they appear and go, though the publisher
//! rebuilds them only when some service's virtual host changed.

use std::{sync::Arc, time::Duration};

use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use isdp_proto::v1::{HealthStatus as Health, Instance};
use prost::{Message, Name};
use tokio::sync::watch;

use super::super::{ENVOY_OUTBOUND, spawn};
use super::settings;
use crate::{policy::Policies, registry::Registry, store::embedded::EmbeddedStore};

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
