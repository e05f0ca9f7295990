//! From the control plane's state to xDS resources: one translator per
//! resource family, each a task that follows its source (a view of the
//! store, the CA, the tokens) and puts typed resources into the xDS
//! engine's [`Cache`], several at once as one batch where one change
//! touches several. The engine then wakes exactly the streams subscribed to
//! what changed. Every resource's version is a hash of its content, so an
//! unchanged rebuild wakes nobody.
//!
//! # Layout
//! - `endpoints`: registry -> `ServiceEndpoints`, one per service,
//!   debounced, capped at [`endpoints::MAX_RESOURCE_BYTES`].
//! - `authorization`: authorization rules + registry ->
//!   `AuthorizationPolicy`, one per destination.
//! - `traffic`: stored traffic policies -> `TrafficPolicy`, one per
//!   service.
//! - `bundle`: CA roots + revoked tokens -> the `TrustBundle` "mesh",
//!   `ca.pem`, and the roots the TLS listener presents.
//! - `standard`: registry + traffic policies -> the standard Envoy v3
//!   resources (listeners, routes, clusters, endpoint assignments) for
//!   proxyless gRPC clients and Envoy.

pub mod authorization;
pub mod bundle;
pub mod endpoints;
pub mod standard;
pub mod traffic;

use isdp_proto::v1::{AuthorizationPolicy, ServiceEndpoints, TrafficPolicy, TrustBundle};
use isdp_xds::Cache;
use prost::Name;

/// A cache serving exactly the resource types the translators publish;
/// clients asking for any other type are told which are served.
pub fn cache() -> Cache {
    Cache::new(
        [
            ServiceEndpoints::type_url(),
            TrustBundle::type_url(),
            AuthorizationPolicy::type_url(),
            TrafficPolicy::type_url(),
        ]
        .into_iter()
        .chain(standard::type_urls().map(String::from)),
    )
}
