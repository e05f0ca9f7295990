//! Proxyless gRPC's protocol: one state-of-the-world ADS stream holding
//! the service's `Listener`, `RouteConfiguration`, `Cluster` and
//! `ClusterLoadAssignment`, each subscribed by name.
//!
//! gRPC subscribes in that order, each type once the previous resource
//! has arrived and named the next (the listener names its routes, a route
//! its cluster, the cluster its assignment); ISDP names all four after the
//! service, so each request names `service`. Every response is ACKed with
//! its version and nonce and the same names, as a client that accepted it.

use std::time::Instant;

use anyhow::Context as _;
use envoy_types::pb::envoy::{
    config::{core::v3::Node, endpoint::v3::ClusterLoadAssignment},
    service::discovery::v3::{
        DiscoveryRequest, DiscoveryResponse,
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
};
use isdp_control_plane::publish::standard::{
    CLUSTER, CLUSTER_LOAD_ASSIGNMENT, LISTENER, ROUTE_CONFIGURATION,
};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::{Seen, support::Channel};

/// The types in the order gRPC subscribes to them.
const CHAIN: [&str; 4] = [
    LISTENER,
    ROUTE_CONFIGURATION,
    CLUSTER,
    CLUSTER_LOAD_ASSIGNMENT,
];

/// One stand-in proxyless client: subscribes down the chain, ACKs every
/// response, and logs when it first sees each change in the assignment.
/// Returns once it has seen all `total`.
pub async fn follow(
    channel: Channel,
    node_id: String,
    service: &'static str,
    total: usize,
    ready: mpsc::UnboundedSender<()>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<Vec<(usize, Instant)>> {
    let (tx, rx) = mpsc::channel(8);
    let names = vec![service.to_owned()];
    tx.send(DiscoveryRequest {
        node: Some(Node {
            id: node_id.clone(),
            ..Default::default()
        }),
        type_url: CHAIN[0].to_owned(),
        resource_names: names.clone(),
        ..Default::default()
    })
    .await?;
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let mut inbound = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .with_context(|| format!("{node_id}: opening the state-of-the-world stream"))?
        .into_inner();
    let mut subscribed = 1;
    let mut seen = Seen::new(total);
    let mut first = true;
    while !seen.complete() {
        let resp = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            msg = inbound.message() => match msg.with_context(|| format!("{node_id}: stream failed"))? {
                Some(resp) => resp,
                None => break,
            },
        };
        let at = Instant::now();
        // ACK before decoding, so the next change can be on its way.
        tx.send(ack(&resp, &names)).await?;
        if subscribed < CHAIN.len()
            && resp.type_url == CHAIN[subscribed - 1]
            && !resp.resources.is_empty()
        {
            tx.send(DiscoveryRequest {
                type_url: CHAIN[subscribed].to_owned(),
                resource_names: names.clone(),
                ..Default::default()
            })
            .await?;
            subscribed += 1;
        }
        if resp.type_url != CLUSTER_LOAD_ASSIGNMENT {
            continue;
        }
        seen.saw(changes(&resp)?, at);
        if std::mem::take(&mut first) {
            let _ = ready.send(());
        }
    }
    Ok(seen.into_log())
}

fn ack(resp: &DiscoveryResponse, names: &[String]) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: resp.version_info.clone(),
        type_url: resp.type_url.clone(),
        response_nonce: resp.nonce.clone(),
        resource_names: names.to_vec(),
        ..Default::default()
    }
}

/// The change number every endpoint of the assignment carries: the
/// bench registers change `i` with weight `i + 1`, which the assignment
/// carries as the endpoint's `load_balancing_weight`.
fn changes(resp: &DiscoveryResponse) -> anyhow::Result<Vec<Option<usize>>> {
    let mut out = Vec::new();
    for any in &resp.resources {
        let cla = ClusterLoadAssignment::decode(any.value.as_slice())
            .context("decoding ClusterLoadAssignment")?;
        out.extend(cla.endpoints.iter().flat_map(|l| &l.lb_endpoints).map(|e| {
            e.load_balancing_weight
                .map(|w| (w.value as usize).saturating_sub(1))
        }));
    }
    Ok(out)
}
