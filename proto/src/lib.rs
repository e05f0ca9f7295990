//! ISDP's protobuf API, generated at build time from `proto/isdp/v1/*.proto`.
//!
//! # Layout
//! - `isdp::v1`: registry API (`Registry`), the sidecar session (`Sidecar`),
//!   what connected sidecars acknowledged (`ProxyStatus`),
//!   and the xDS resources the control plane serves (`ServiceEndpoints`).
//!
//! The xDS envelope itself (`envoy.service.discovery.v3`) comes from the
//! `envoy-types` crate; this crate holds only the project's own messages.

pub mod isdp {
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("isdp.v1");

        /// Type URL of [`ServiceEndpoints`] inside an xDS `Any`.
        pub const SERVICE_ENDPOINTS_TYPE_URL: &str = "type.googleapis.com/isdp.v1.ServiceEndpoints";
    }
}

pub use isdp::v1;
