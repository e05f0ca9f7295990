//! The reconnecting delta-ADS stream behind [`super::spawn`].

use std::collections::BTreeSet;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{Node, node::UserAgentVersionType};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status;
use isdp_proto::v1::{
    AUTHORIZATION_POLICY_TYPE_URL, AuthorizationPolicy, SERVICE_ENDPOINTS_TYPE_URL,
    TRAFFIC_POLICY_TYPE_URL, TRUST_BUNDLE_NAME, TRUST_BUNDLE_TYPE_URL, TrafficPolicy, TrustBundle,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use super::security::{self, Held, Kind};
use super::state::{Resources, apply, held_versions};
use super::{Snapshot, XdsSettings};
use isdp_core::backoff::Backoff;
use isdp_core::dial::{DialError, Dialer, SIDECAR_USER_AGENT};

/// gRPC `INVALID_ARGUMENT`, the code of a NACK's `error_detail`.
const INVALID_ARGUMENT: i32 = 3;

/// Why one stream ended (other than shutdown).
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error("stream failed: {0}")]
    Status(#[from] tonic::Status),
    #[error("stream ended by the control plane")]
    Ended,
}

impl StreamError {
    /// The control plane's message when it refused the caller rather than
    /// failed: UNAUTHENTICATED (its credentials are revoked or expired) or
    /// PERMISSION_DENIED.
    fn refusal(&self) -> Option<String> {
        match self {
            StreamError::Status(s)
                if matches!(
                    s.code(),
                    tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                ) =>
            {
                Some(s.message().to_owned())
            }
            _ => None,
        }
    }
}

/// The client's task state.
pub(super) struct Client {
    /// Node id and URLs.
    settings: XdsSettings,
    /// Endpoint names subscribed to; responses about other names are ignored.
    subscribed: BTreeSet<String>,
    /// `{"mesh"}`: the one trust bundle.
    bundle_names: BTreeSet<String>,
    /// Local services, whose policies are subscribed to.
    policy_names: BTreeSet<String>,
    /// What the client holds; survives reconnects.
    resources: Resources,
    bundles: Held<TrustBundle>,
    authz_policies: Held<AuthorizationPolicy>,
    /// Traffic policies of the upstreams (named like `subscribed`).
    traffic_policies: Held<TrafficPolicy>,
    /// Where snapshots are published.
    tx: watch::Sender<Arc<Snapshot>>,
    /// URL rotation.
    dialer: Dialer,
    /// Reconnect pacing.
    backoff: Backoff,
}

// === impl Client ===

impl Client {
    pub(super) fn new(settings: XdsSettings, tx: watch::Sender<Arc<Snapshot>>) -> Self {
        Self {
            subscribed: settings.upstreams.iter().cloned().collect(),
            bundle_names: [TRUST_BUNDLE_NAME.to_owned()].into(),
            policy_names: settings.local_services.iter().cloned().collect(),
            bundles: Held::new(),
            authz_policies: Held::new(),
            traffic_policies: Held::new(),
            dialer: Dialer::new(settings.control_plane.clone(), settings.auth.clone()),
            settings,
            resources: Resources::new(),
            tx,
            backoff: Backoff::default(),
        }
    }

    /// Runs streams until `shutdown`, reconnecting with backoff.
    pub(super) async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        loop {
            if *shutdown.borrow() {
                break;
            }
            let url = self.dialer.next_url();
            let refused = match self.stream(&url, &mut shutdown).await {
                Ok(()) => break,
                Err(error) => {
                    tracing::warn!(%url, %error, "xds stream down");
                    error.refusal()
                }
            };
            self.backoff.disconnected();
            self.publish(|s| {
                s.connected = false;
                s.reconnects += 1;
                s.refused = refused;
            });
            if !self.backoff.wait(&mut shutdown).await {
                break;
            }
        }
        self.publish(|s| s.connected = false);
        tracing::debug!("xds client stopped");
    }

    fn publish(&self, update: impl FnOnce(&mut Snapshot)) {
        self.tx.send_modify(|s| update(Arc::make_mut(s)));
    }

    /// One stream; `Ok(())` means shutdown.
    async fn stream(
        &mut self,
        url: &str,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), StreamError> {
        let channel = tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
            channel = self.dialer.connect(url) => channel?,
        };
        let mut client = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(super::MAX_RESPONSE_BYTES);
        let (requests, rx) = mpsc::channel(16);
        // Queued before the call so a server that waits for the first
        // request before answering with headers does not deadlock us.
        for request in self.initial_requests() {
            let _ = requests.send(request).await;
        }
        let response = tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
            response = client.delta_aggregated_resources(ReceiverStream::new(rx)) => response?,
        };
        let mut inbound = response.into_inner();
        self.backoff.connected();
        self.publish(|s| {
            s.connected = true;
            s.refused = None;
            s.control_plane = Some(url.to_owned());
        });
        tracing::info!(%url, held = self.resources.len(), "xds stream open");
        loop {
            let message = tokio::select! {
                biased;
                _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
                message = inbound.message() => message?,
            };
            let response = message.ok_or(StreamError::Ended)?;
            self.handle(response, &requests).await?;
        }
    }

    /// One subscription per type, endpoints first. A type with no names is
    /// not subscribed at all: an empty delta subscription means "all".
    fn initial_requests(&self) -> Vec<DeltaDiscoveryRequest> {
        // The user agent tells the control plane which kind of client
        // this is (its proxy status lists gRPC and Envoy nodes beside
        // sidecars).
        let node = Some(Node {
            id: self.settings.node_id.clone(),
            user_agent_name: SIDECAR_USER_AGENT.to_owned(),
            user_agent_version_type: Some(UserAgentVersionType::UserAgentVersion(
                env!("CARGO_PKG_VERSION").to_owned(),
            )),
            ..Default::default()
        });
        let request = |type_url: &str, names: &BTreeSet<String>, held| DeltaDiscoveryRequest {
            node: node.clone(),
            type_url: type_url.to_owned(),
            resource_names_subscribe: names.iter().cloned().collect(),
            initial_resource_versions: held,
            ..Default::default()
        };
        let mut out = Vec::with_capacity(4);
        if !self.subscribed.is_empty() {
            out.push(request(
                SERVICE_ENDPOINTS_TYPE_URL,
                &self.subscribed,
                held_versions(&self.resources),
            ));
            out.push(request(
                TRAFFIC_POLICY_TYPE_URL,
                &self.subscribed,
                security::versions(&self.traffic_policies).collect(),
            ));
        }
        out.push(request(
            TRUST_BUNDLE_TYPE_URL,
            &self.bundle_names,
            security::versions(&self.bundles).collect(),
        ));
        if !self.policy_names.is_empty() {
            out.push(request(
                AUTHORIZATION_POLICY_TYPE_URL,
                &self.policy_names,
                security::versions(&self.authz_policies).collect(),
            ));
        }
        out
    }

    /// Applies a response to the state of its type.
    fn apply(&mut self, response: &DeltaDiscoveryResponse) -> Result<(), String> {
        fn held<K: Kind>(
            held: &mut Held<K>,
            names: &BTreeSet<String>,
            response: &DeltaDiscoveryResponse,
        ) -> Result<(), String> {
            if let Some(next) = security::apply::<K>(held, names, response)? {
                *held = next;
            }
            Ok(())
        }
        match response.type_url.as_str() {
            TRUST_BUNDLE_TYPE_URL => held(&mut self.bundles, &self.bundle_names, response),
            AUTHORIZATION_POLICY_TYPE_URL => {
                held(&mut self.authz_policies, &self.policy_names, response)
            }
            TRAFFIC_POLICY_TYPE_URL => held(&mut self.traffic_policies, &self.subscribed, response),
            _ => {
                if let Some(next) = apply(&self.resources, &self.subscribed, response)? {
                    self.resources = next;
                }
                Ok(())
            }
        }
    }

    /// Applies a response and sends its ACK or NACK.
    async fn handle(
        &mut self,
        response: DeltaDiscoveryResponse,
        requests: &mpsc::Sender<DeltaDiscoveryRequest>,
    ) -> Result<(), StreamError> {
        let mut reply = DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            ..Default::default()
        };
        match self.apply(&response) {
            Ok(()) => {
                tracing::debug!(type_url = %response.type_url, nonce = %response.nonce, "xds ack");
                requests.send(reply).await.map_err(|_| StreamError::Ended)?;
                let ready = self
                    .subscribed
                    .iter()
                    .all(|n| self.resources.contains_key(n));
                let resources = self.resources.clone();
                let (bundles, policies) = (&self.bundles, &self.authz_policies);
                let bundle = bundles.get(TRUST_BUNDLE_NAME).map(|b| b.value.clone());
                let policy_values = policies
                    .iter()
                    .map(|(n, p)| (n.clone(), p.value.clone()))
                    .collect();
                let mut acked_by_type = std::collections::BTreeMap::new();
                security::acked(bundles, &mut acked_by_type);
                security::acked(policies, &mut acked_by_type);
                security::acked(&self.traffic_policies, &mut acked_by_type);
                let traffic = self.traffic_policies.clone();
                self.publish(|s| {
                    s.acked = held_versions(&resources).into_iter().collect();
                    s.upstreams = resources;
                    s.acked_by_type = acked_by_type;
                    if s.trust_bundle != bundle {
                        s.trust_bundle = bundle;
                    }
                    s.authz_policies = policy_values;
                    if s.traffic_policies != traffic {
                        s.traffic_policies = traffic;
                    }
                    s.ready |= ready;
                    s.acks += 1;
                });
            }
            Err(reason) => {
                tracing::warn!(type_url = %response.type_url, nonce = %response.nonce, %reason, "xds nack");
                reply.error_detail = Some(Status {
                    code: INVALID_ARGUMENT,
                    message: reason.clone(),
                    details: Vec::new(),
                });
                requests.send(reply).await.map_err(|_| StreamError::Ended)?;
                self.publish(|s| {
                    s.nacks += 1;
                    s.last_nack = Some(reason);
                });
            }
        }
        Ok(())
    }
}
