//! The sidecar's protocol: one delta ADS stream subscribing to the
//! service's `isdp.v1.ServiceEndpoints`.

use std::time::Instant;

use anyhow::Context as _;
use envoy_types::pb::envoy::{
    config::core::v3::Node,
    service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse,
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
};
use isdp_proto::v1::{SERVICE_ENDPOINTS_TYPE_URL, ServiceEndpoints};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::{Seen, support::Channel};

/// One stand-in sidecar: subscribes, ACKs every response, and logs when it
/// first sees each change. Returns once it has seen all `total`.
pub async fn follow(
    channel: Channel,
    node_id: String,
    service: &'static str,
    total: usize,
    ready: mpsc::UnboundedSender<()>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<Vec<(usize, Instant)>> {
    let (tx, rx) = mpsc::channel(8);
    tx.send(DeltaDiscoveryRequest {
        node: Some(Node {
            id: node_id.clone(),
            ..Default::default()
        }),
        type_url: SERVICE_ENDPOINTS_TYPE_URL.to_owned(),
        resource_names_subscribe: vec![service.to_owned()],
        ..Default::default()
    })
    .await?;
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let mut inbound = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .with_context(|| format!("{node_id}: opening the delta stream"))?
        .into_inner();
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
        tx.send(ack(&resp)).await?;
        seen.saw(changes(&resp)?, at);
        if std::mem::take(&mut first) {
            let _ = ready.send(());
        }
    }
    Ok(seen.into_log())
}

fn ack(resp: &DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: resp.type_url.clone(),
        response_nonce: resp.nonce.clone(),
        ..Default::default()
    }
}

/// The change number every endpoint in the response carries (its
/// `change` metadata; None where it has none).
fn changes(resp: &DeltaDiscoveryResponse) -> anyhow::Result<Vec<Option<usize>>> {
    let mut out = Vec::new();
    for r in &resp.resources {
        let Some(any) = &r.resource else { continue };
        let eps =
            ServiceEndpoints::decode(any.value.as_slice()).context("decoding ServiceEndpoints")?;
        out.extend(
            eps.endpoints
                .iter()
                .map(|e| e.metadata.get("change").and_then(|c| c.parse().ok())),
        );
    }
    Ok(out)
}
