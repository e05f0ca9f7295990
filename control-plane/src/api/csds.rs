//! `envoy.service.status.v3.ClientStatusDiscoveryService` (CSDS): what
//! every xDS client connected to this control plane holds, per resource,
//! in the standard form xDS tooling reads (`grpcdebug ... xds status`,
//! for one).
//!
//! Served from `proxies.rs`, the record `isdp.v1.ProxyStatus` lists too:
//! one `ClientConfig` per open stream (two streams of one node, or two
//! clients claiming one node id, appear twice: a node id is the client's
//! word), with the node as its client sent it (id, user agent, cluster,
//! zone), and one `GenericXdsConfig` per (type URL, resource name) the
//! stream subscribes to: the version the client holds, `client_status`
//! (REQUESTED, ACKED, NACKED with `error_state` holding the NACK's text
//! and the rejected version, DOES_NOT_EXIST) and the server's view in
//! `config_status` (SYNCED; STALE while a response of its type awaits
//! the client's answer; NOT_SENT; ERROR after a NACK). Resource contents
//! (`xds_config`) are not included: the current ones are the cache's,
//! and the version the client holds may be older.
//!
//! `node_matchers` select streams by node id, exactly or by prefix,
//! either optionally ignoring ASCII case (any matcher may match). Any
//! other matcher is refused with INVALID_ARGUMENT naming the field rather
//! than ignored, since a filter dropped silently answers with every node.

use std::{pin::Pin, time::SystemTime};

use envoy_types::pb::{
    envoy::{
        admin::v3::{ClientResourceStatus, UpdateFailureState},
        config::core::v3::{Locality, Node, node::UserAgentVersionType},
        service::status::v3::{
            ClientConfig, ClientStatusRequest, ClientStatusResponse, ConfigStatus,
            client_config::GenericXdsConfig,
            client_status_discovery_service_server::{
                ClientStatusDiscoveryService, ClientStatusDiscoveryServiceServer,
            },
        },
        r#type::matcher::v3::{NodeMatcher, string_matcher::MatchPattern},
    },
    google::protobuf::Timestamp,
};
use futures::{Stream, StreamExt as _};
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use crate::proxies::{ClientStatus, Proxies, ResourceState, ResourceStatus};

pub struct CsdsApi {
    proxies: Proxies,
    shutdown: watch::Receiver<bool>,
}

impl CsdsApi {
    pub fn new(proxies: Proxies, shutdown: watch::Receiver<bool>) -> Self {
        CsdsApi { proxies, shutdown }
    }

    pub fn into_server(self) -> ClientStatusDiscoveryServiceServer<Self> {
        ClientStatusDiscoveryServiceServer::new(self)
            .max_decoding_message_size(super::MAX_REQUEST_BYTES)
    }
}

type StatusStream = Pin<Box<dyn Stream<Item = Result<ClientStatusResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ClientStatusDiscoveryService for CsdsApi {
    type StreamClientStatusStream = StatusStream;

    /// One answer per request, until the client ends the stream, a
    /// request is refused (its status ends the stream), or shutdown.
    async fn stream_client_status(
        &self,
        req: Request<Streaming<ClientStatusRequest>>,
    ) -> Result<Response<StatusStream>, Status> {
        let proxies = self.proxies.clone();
        let mut shutdown = self.shutdown.clone();
        let answers = req
            .into_inner()
            .map(move |r| r.and_then(|r| answer(&proxies, &r)))
            .take_until(async move {
                let _ = shutdown.wait_for(|s| *s).await;
            });
        Ok(Response::new(Box::pin(answers)))
    }

    async fn fetch_client_status(
        &self,
        req: Request<ClientStatusRequest>,
    ) -> Result<Response<ClientStatusResponse>, Status> {
        answer(&self.proxies, req.get_ref()).map(Response::new)
    }
}

/// The answer to one request, or INVALID_ARGUMENT naming the matcher
/// field it cannot apply.
fn answer(proxies: &Proxies, req: &ClientStatusRequest) -> Result<ClientStatusResponse, Status> {
    let matchers = req
        .node_matchers
        .iter()
        .enumerate()
        .map(|(i, m)| IdMatcher::read(i, m))
        .collect::<Result<Vec<_>, _>>()?;
    let wanted = |id: &str| matchers.is_empty() || matchers.iter().any(|m| m.matches(id));
    Ok(ClientStatusResponse {
        config: proxies
            .client_status(wanted)
            .into_iter()
            .map(client_config)
            .collect(),
    })
}

/// What a `NodeMatcher` asks of a node id.
#[derive(Debug, PartialEq, Eq)]
enum IdMatcher {
    /// A matcher without `node_id`: every node.
    Any,
    Exact {
        id: String,
        ignore_case: bool,
    },
    Prefix {
        prefix: String,
        ignore_case: bool,
    },
}

impl IdMatcher {
    /// `node_matchers[i]`, or why it cannot be applied.
    fn read(i: usize, m: &NodeMatcher) -> Result<Self, Status> {
        let field = format!("node_matchers[{i}]");
        if !m.node_metadatas.is_empty() {
            return Err(Status::invalid_argument(format!(
                "{field}.node_metadatas: matching node metadata is not supported; match node_id (exact or prefix)"
            )));
        }
        let Some(id) = &m.node_id else {
            return Ok(IdMatcher::Any);
        };
        let ignore_case = id.ignore_case;
        let unsupported = |pattern: &str| {
            Err(Status::invalid_argument(format!(
                "{field}.node_id.{pattern}: not supported; use exact or prefix"
            )))
        };
        match &id.match_pattern {
            Some(MatchPattern::Exact(id)) => Ok(IdMatcher::Exact {
                id: id.clone(),
                ignore_case,
            }),
            // Envoy's own rule (`min_len: 1`): an empty prefix is no filter.
            Some(MatchPattern::Prefix(p)) if p.is_empty() => Err(Status::invalid_argument(
                format!("{field}.node_id.prefix: empty; leave node_id unset to match every node"),
            )),
            Some(MatchPattern::Prefix(p)) => Ok(IdMatcher::Prefix {
                prefix: p.clone(),
                ignore_case,
            }),
            Some(MatchPattern::Suffix(_)) => unsupported("suffix"),
            Some(MatchPattern::SafeRegex(_)) => unsupported("safe_regex"),
            Some(MatchPattern::Contains(_)) => unsupported("contains"),
            Some(MatchPattern::Custom(_)) => unsupported("custom"),
            None => Err(Status::invalid_argument(format!(
                "{field}.node_id: no pattern; set exact or prefix"
            ))),
        }
    }

    fn matches(&self, node_id: &str) -> bool {
        match self {
            IdMatcher::Any => true,
            IdMatcher::Exact { id, ignore_case } => {
                if *ignore_case {
                    node_id.eq_ignore_ascii_case(id)
                } else {
                    node_id == id
                }
            }
            IdMatcher::Prefix {
                prefix,
                ignore_case,
            } => {
                let head = node_id.as_bytes().get(..prefix.len());
                head.is_some_and(|h| {
                    if *ignore_case {
                        h.eq_ignore_ascii_case(prefix.as_bytes())
                    } else {
                        h == prefix.as_bytes()
                    }
                })
            }
        }
    }
}

fn client_config(c: ClientStatus) -> ClientConfig {
    let node = Node {
        id: c.node_id,
        cluster: c.cluster,
        locality: (!c.zone.is_empty()).then(|| Locality {
            zone: c.zone,
            ..Default::default()
        }),
        user_agent_name: c.user_agent_name,
        user_agent_version_type: (!c.user_agent_version.is_empty())
            .then_some(UserAgentVersionType::UserAgentVersion(c.user_agent_version)),
        ..Default::default()
    };
    let generic_xds_configs = c
        .types
        .into_iter()
        .flat_map(|t| {
            let (type_url, pending) = (t.type_url, t.pending);
            t.resources
                .into_iter()
                .map(move |r| generic_config(&type_url, pending, r))
        })
        .collect();
    ClientConfig {
        node: Some(node),
        generic_xds_configs,
        ..Default::default()
    }
}

fn generic_config(type_url: &str, pending: bool, r: ResourceStatus) -> GenericXdsConfig {
    let (client_status, config_status) = match r.state {
        ResourceState::Nacked => (ClientResourceStatus::Nacked, ConfigStatus::Error),
        _ if pending => (client_status(r.state), ConfigStatus::Stale),
        ResourceState::Requested => (ClientResourceStatus::Requested, ConfigStatus::NotSent),
        state => (client_status(state), ConfigStatus::Synced),
    };
    GenericXdsConfig {
        type_url: type_url.to_owned(),
        name: r.name.to_string(),
        version_info: r.version,
        last_updated: r.acked_at.map(timestamp),
        config_status: config_status.into(),
        client_status: client_status.into(),
        error_state: r.rejection.map(|x| UpdateFailureState {
            last_update_attempt: Some(timestamp(x.at)),
            details: x.message.to_string(),
            version_info: x.version,
            failed_configuration: None,
        }),
        ..Default::default()
    }
}

fn client_status(state: ResourceState) -> ClientResourceStatus {
    match state {
        ResourceState::Requested => ClientResourceStatus::Requested,
        ResourceState::Acked => ClientResourceStatus::Acked,
        ResourceState::Nacked => ClientResourceStatus::Nacked,
        ResourceState::DoesNotExist => ClientResourceStatus::DoesNotExist,
    }
}

fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

#[cfg(test)]
mod tests;
