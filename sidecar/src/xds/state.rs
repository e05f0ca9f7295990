//! The resources the xDS client holds, and the pure function that applies a
//! `DeltaDiscoveryResponse` to them (or rejects it for a NACK).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
use isdp_proto::v1::{SERVICE_ENDPOINTS_TYPE_URL, ServiceEndpoints};
use prost::Message;

use isdp_core::probe::Health;

/// One endpoint of an upstream, as the control plane sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Instance id, unique in the mesh.
    pub id: String,
    /// IP address to connect to.
    pub address: String,
    pub port: u16,
    /// Port of the endpoint's sidecar inbound listener on `address`; 0 when
    /// the instance has no sidecar and is reached at `port` directly.
    pub inbound_port: u16,
    /// Relative share of traffic (>= 1): the operator's weight times the
    /// load factor the control plane computed.
    pub weight: u32,
    /// The weight the instance was registered with, before load.
    pub operator_weight: u32,
    /// Why `weight` is what it is (`operator`, `load: ...`, `blackout`).
    pub weight_reason: String,
    /// Labels such as version and zone, for routing by subset.
    pub metadata: BTreeMap<String, String>,
    /// Health as the control plane concluded it.
    pub health: Health,
    /// The zone the instance runs in; empty when it named none.
    pub zone: String,
    /// Failover order across zones (0 first); see `balance::locality`.
    pub priority: u32,
}

/// What is known about one subscribed upstream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpstreamState {
    /// False once the control plane said it does not exist or was removed.
    pub exists: bool,
    /// The control plane's version of the resource; empty when it does not exist.
    pub version: String,
    /// Sorted by id as the control plane sends them.
    pub endpoints: Vec<Endpoint>,
}

/// Every upstream the client has an answer for, by name.
pub type Resources = BTreeMap<String, UpstreamState>;

/// The versions of the resources held, for `initial_resource_versions`.
pub fn held_versions(resources: &Resources) -> HashMap<String, String> {
    resources
        .iter()
        .filter(|(_, u)| u.exists)
        .map(|(name, u)| (name.clone(), u.version.clone()))
        .collect()
}

/// Applies one response. `Ok(Some(new))` when something changed, `Ok(None)`
/// when nothing did, `Err(reason)` when the response must be NACKed; then
/// nothing of it is applied.
pub fn apply(
    current: &Resources,
    subscribed: &BTreeSet<String>,
    response: &DeltaDiscoveryResponse,
) -> Result<Option<Resources>, String> {
    if response.type_url != SERVICE_ENDPOINTS_TYPE_URL {
        return Err(format!(
            "unexpected type_url {:?}, subscribed to {SERVICE_ENDPOINTS_TYPE_URL}",
            response.type_url
        ));
    }
    // Decode everything before touching the state, so a NACK applies nothing.
    let mut updates = Vec::with_capacity(response.resources.len());
    for resource in &response.resources {
        if !subscribed.contains(&resource.name) {
            tracing::debug!(name = %resource.name, "ignoring unsubscribed resource");
            continue;
        }
        updates.push((resource.name.clone(), decode(resource)?));
    }
    let removed = response
        .removed_resources
        .iter()
        .chain(response.removed_resource_names.iter().map(|r| &r.name))
        .filter(|name| subscribed.contains(*name));

    let mut next = current.clone();
    for name in removed {
        next.insert(name.clone(), UpstreamState::default());
    }
    for (name, state) in updates {
        next.insert(name, state);
    }
    Ok((next != *current).then_some(next))
}

/// Decodes one resource into an upstream's state.
pub fn decode(resource: &Resource) -> Result<UpstreamState, String> {
    let name = &resource.name;
    let any = resource
        .resource
        .as_ref()
        .ok_or_else(|| format!("resource {name:?}: no body"))?;
    if any.type_url != SERVICE_ENDPOINTS_TYPE_URL {
        return Err(format!(
            "resource {name:?}: unexpected type_url {:?}",
            any.type_url
        ));
    }
    let decoded = ServiceEndpoints::decode(any.value.as_slice())
        .map_err(|e| format!("resource {name:?}: {e}"))?;
    if decoded.service != *name {
        return Err(format!(
            "resource {name:?}: holds service {:?}",
            decoded.service
        ));
    }
    let endpoints = decoded
        .endpoints
        .into_iter()
        .map(|e| {
            let port = u16::try_from(e.port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    format!(
                        "resource {name:?}: endpoint {:?} has invalid port {}",
                        e.instance_id, e.port
                    )
                })?;
            let inbound_port = u16::try_from(e.inbound_port).map_err(|_| {
                format!(
                    "resource {name:?}: endpoint {:?} has invalid inbound port {}",
                    e.instance_id, e.inbound_port
                )
            })?;
            Ok(Endpoint {
                id: e.instance_id,
                address: e.address,
                port,
                inbound_port,
                weight: e.weight.max(1),
                operator_weight: e.operator_weight,
                weight_reason: e.weight_reason,
                metadata: e.metadata.into_iter().collect(),
                health: Health::from_i32(e.status),
                zone: e.zone,
                priority: e.priority,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(UpstreamState {
        exists: true,
        version: resource.version.clone(),
        endpoints,
    })
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::google::protobuf::Any;
    use isdp_proto::v1::{Endpoint as PbEndpoint, HealthStatus};

    use super::*;

    fn endpoints(service: &str, ports: &[u32]) -> ServiceEndpoints {
        ServiceEndpoints {
            service: service.into(),
            endpoints: ports
                .iter()
                .map(|p| PbEndpoint {
                    instance_id: format!("n{p}.{service}"),
                    address: "127.0.0.1".into(),
                    port: *p,
                    weight: 0,
                    metadata: [("version".to_string(), "v1".to_string())].into(),
                    status: HealthStatus::Healthy as i32,
                    inbound_port: 0,
                    zone: "zone-a".into(),
                    priority: 1,
                    ..Default::default()
                })
                .collect(),
        }
    }

    fn resource(name: &str, version: &str, body: &ServiceEndpoints) -> Resource {
        Resource {
            name: name.into(),
            version: version.into(),
            resource: Some(Any {
                type_url: SERVICE_ENDPOINTS_TYPE_URL.into(),
                value: body.encode_to_vec(),
            }),
            ..Default::default()
        }
    }

    fn response(resources: Vec<Resource>, removed: &[&str]) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: SERVICE_ENDPOINTS_TYPE_URL.into(),
            resources,
            removed_resources: removed.iter().map(|s| s.to_string()).collect(),
            nonce: "1".into(),
            ..Default::default()
        }
    }

    fn subscribed() -> BTreeSet<String> {
        ["payments".to_string(), "orders".to_string()].into()
    }

    #[test]
    fn add_update_remove() {
        let subs = subscribed();
        let add = response(
            vec![resource("payments", "v1", &endpoints("payments", &[8081]))],
            &["orders"],
        );
        let state = apply(&Resources::new(), &subs, &add).unwrap().unwrap();
        let payments = &state["payments"];
        assert!(payments.exists);
        assert_eq!(payments.version, "v1");
        assert_eq!(payments.endpoints.len(), 1);
        let ep = &payments.endpoints[0];
        assert_eq!(
            (ep.id.as_str(), ep.port, ep.weight),
            ("n8081.payments", 8081, 1)
        );
        assert_eq!(ep.health, Health::Healthy);
        assert_eq!((ep.zone.as_str(), ep.priority), ("zone-a", 1));
        assert_eq!(ep.metadata["version"], "v1");
        assert_eq!(state["orders"], UpstreamState::default());
        assert_eq!(
            held_versions(&state),
            [("payments".to_string(), "v1".to_string())].into()
        );

        // Same content again: no change.
        assert_eq!(apply(&state, &subs, &add).unwrap(), None);

        let update = response(
            vec![resource(
                "payments",
                "v2",
                &endpoints("payments", &[8081, 8082]),
            )],
            &[],
        );
        let state = apply(&state, &subs, &update).unwrap().unwrap();
        assert_eq!(state["payments"].version, "v2");
        assert_eq!(state["payments"].endpoints.len(), 2);

        let remove = response(vec![], &["payments"]);
        let state = apply(&state, &subs, &remove).unwrap().unwrap();
        assert!(!state["payments"].exists);
        assert!(state["payments"].endpoints.is_empty());
        assert!(held_versions(&state).is_empty());

        // Unsubscribed names are ignored.
        let other = response(
            vec![resource("zzz", "v1", &endpoints("zzz", &[1]))],
            &["yyy"],
        );
        assert_eq!(apply(&state, &subs, &other).unwrap(), None);
    }

    #[test]
    fn bad_resources_are_nacked_and_nothing_applied() {
        let subs = subscribed();
        let good = resource("orders", "v1", &endpoints("orders", &[9000]));
        let cases = [
            {
                let mut r = resource("payments", "v1", &endpoints("payments", &[1]));
                r.resource.as_mut().unwrap().type_url = "type.googleapis.com/wrong".into();
                r
            },
            {
                let mut r = resource("payments", "v1", &endpoints("payments", &[1]));
                r.resource.as_mut().unwrap().value = vec![0xff, 0xff, 0xff];
                r
            },
            resource("payments", "v1", &endpoints("orders", &[1])),
            resource("payments", "v1", &endpoints("payments", &[70000])),
            Resource {
                name: "payments".into(),
                ..Default::default()
            },
        ];
        for bad in cases {
            let resp = response(vec![good.clone(), bad], &[]);
            let err = apply(&Resources::new(), &subs, &resp).unwrap_err();
            assert!(err.contains("payments"), "{err}");
        }
        let mut wrong_type = response(vec![good], &[]);
        wrong_type.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
        assert!(apply(&Resources::new(), &subs, &wrong_type).is_err());
    }
}
