//! ISDP's protobuf API, generated at build time from `proto/isdp/v1/*.proto`.
//!
//! # Layout
//! - `isdp::v1`: registry API (`Registry`), the sidecar session (`Sidecar`),
//!   what connected sidecars acknowledged (`ProxyStatus`), the CA
//!   (`Certificates`), tokens (`Tokens`), authorization rules
//!   (`Authorization`), traffic policies (`Policies`),
//!   and the xDS resources the control plane serves (`ServiceEndpoints`, `TrustBundle`, `AuthorizationPolicy`,
//!   `TrafficPolicy`; every message implements `prost::Name`, whose type
//!   URL is the one an xDS `Any` carries), and `FILE_DESCRIPTOR_SET`, the
//!   compiled descriptors of all of them.
//!
//! - `etcd` (feature `etcd`): etcd's v3 API clients (`KvClient`,
//!   `WatchClient`, `LeaseClient`, `AuthClient`, ...), for the control
//!   plane's etcd store; see `etcd/README.md` for where the files come from.
//!
//! The xDS envelope itself (`envoy.service.discovery.v3`) comes from the
//! `envoy-types` crate; this crate holds only the project's own messages
//! and the etcd API the control plane stores into.

pub mod isdp {
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("isdp.v1");

        /// Type URL of [`ServiceEndpoints`] inside an xDS `Any`.
        pub const SERVICE_ENDPOINTS_TYPE_URL: &str = "type.googleapis.com/isdp.v1.ServiceEndpoints";
        /// Type URL of [`TrustBundle`] inside an xDS `Any`; its one resource
        /// is named [`TRUST_BUNDLE_NAME`].
        pub const TRUST_BUNDLE_TYPE_URL: &str = "type.googleapis.com/isdp.v1.TrustBundle";
        pub const TRUST_BUNDLE_NAME: &str = "mesh";
        /// Type URL of [`TrafficPolicy`] inside an xDS `Any`, one per
        /// destination service.
        pub const TRAFFIC_POLICY_TYPE_URL: &str = "type.googleapis.com/isdp.v1.TrafficPolicy";
        /// Type URL of [`AuthorizationPolicy`] inside an xDS `Any`, one per
        /// destination service.
        pub const AUTHORIZATION_POLICY_TYPE_URL: &str =
            "type.googleapis.com/isdp.v1.AuthorizationPolicy";

        /// The encoded `google.protobuf.FileDescriptorSet` of every
        /// `isdp/v1` file: what lets a test walk every service and method
        /// (the control plane's method -> role table must cover them all).
        pub const FILE_DESCRIPTOR_SET: &[u8] =
            include_bytes!(concat!(env!("OUT_DIR"), "/isdp_v1.fds"));
    }
}

pub use isdp::v1;

/// etcd's v3 gRPC API, generated from `proto/etcd/api/` (clients only).
/// The packages are siblings, as prost's cross-package paths expect.
#[cfg(feature = "etcd")]
pub mod etcd {
    #![allow(clippy::all, missing_docs)]
    pub mod authpb {
        tonic::include_proto!("authpb");
    }
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
}

#[cfg(test)]
mod tests {
    use prost::Name;

    use super::v1::*;

    /// The xDS cache stores a typed resource under its `Name::type_url()`,
    /// and sidecars subscribe by these constants: they must agree.
    #[test]
    fn resource_type_urls_are_the_messages_names() {
        assert_eq!(ServiceEndpoints::type_url(), SERVICE_ENDPOINTS_TYPE_URL);
        assert_eq!(TrustBundle::type_url(), TRUST_BUNDLE_TYPE_URL);
        assert_eq!(
            AuthorizationPolicy::type_url(),
            AUTHORIZATION_POLICY_TYPE_URL
        );
        assert_eq!(TrafficPolicy::type_url(), TRAFFIC_POLICY_TYPE_URL);
    }
}
