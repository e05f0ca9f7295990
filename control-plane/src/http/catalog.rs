//! The registry as a discovery client may read it, shared by the Consul
//! endpoints (`consul`) and the Prometheus targets (`prometheus`): a join
//! principal reads only the services its token may read over xDS (its own
//! and its upstreams, [`ReadScope`], as ADS and `Policies/Get` do); any
//! other principal reads every service. Lists come from the registry's own
//! gRPC methods, so the service-name checks are theirs.

use isdp_proto::v1::{
    HealthStatus, Instance, ListInstancesRequest, ListServicesRequest, SERVICE_ENDPOINTS_TYPE_URL,
    registry_server::Registry as _,
};

use super::{Api, HttpError, grpc_request};
use crate::auth::{Principal, ReadScope};

/// The node name of instances no sidecar owns.
pub const CONTROL_PLANE_NODE: &str = "isdp";

/// The services `p` may read, by name.
pub async fn services(api: &Api, p: &Principal) -> Result<Vec<String>, HttpError> {
    let scope = ReadScope::of(Some(p));
    let req = grpc_request(p.clone(), ListServicesRequest {});
    let res = api.inner.registry_api.list_services(req).await?;
    Ok(res
        .into_inner()
        .services
        .into_iter()
        .map(|s| s.name)
        .filter(|name| scope.allows(SERVICE_ENDPOINTS_TYPE_URL, name))
        .collect())
}

/// The instances of `service`; 403 naming `method` when `p` may not read
/// it.
pub async fn instances(
    api: &Api,
    p: &Principal,
    method: &str,
    service: &str,
) -> Result<Vec<Instance>, HttpError> {
    ReadScope::of(Some(p)).check(method, SERVICE_ENDPOINTS_TYPE_URL, service)?;
    let req = grpc_request(
        p.clone(),
        ListInstancesRequest {
            service: service.to_owned(),
        },
    );
    let res = api.inner.registry_api.list_instances(req).await?;
    Ok(res.into_inner().instances)
}

/// The instance's node: its sidecar's node id, or [`CONTROL_PLANE_NODE`]
/// for one an operator registered.
pub fn node(i: &Instance) -> &str {
    if i.node_id.is_empty() {
        CONTROL_PLANE_NODE
    } else {
        &i.node_id
    }
}

/// Healthy, or not checked yet: routable, as sidecars treat it.
pub fn passing(i: &Instance) -> bool {
    i.status() != HealthStatus::Unhealthy
}

/// Consul's and the Prometheus labels' name for [`passing`].
pub fn health_name(i: &Instance) -> &'static str {
    if passing(i) { "passing" } else { "critical" }
}
