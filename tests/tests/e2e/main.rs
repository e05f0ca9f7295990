//! End-to-end tests: the control plane, sidecars and demo services as real
//! processes on loopback, driven through their command lines, gRPC APIs and
//! HTTP endpoints.
//!
//! One test binary holds every area (a module each beside this file), so the
//! workspace links the heavy dependency tree once rather than once per area;
//! filter by module to run one area: `cargo nextest run -p isdp-tests mtls::`.

mod auth;
mod authz;
mod authz_bypass;
mod balancing;
mod bootstrap;
mod csds;
mod dataplane;
mod demo;
mod dns;
mod durability;
mod etcd;
mod etcd_partition;
mod etcd_store;
mod grpc_js;
mod harness;
mod health;
mod killed_peers;
mod listener_limits;
mod load_weights;
mod mtls;
mod observability;
mod overload;
mod ownership;
mod partitions;
mod policy;
mod priorities;
mod quotas;
mod relay;
mod resilience;
mod revocation;
mod roles;
mod secrets;
mod sessions;
mod sidecar_limits;
mod store_faults;
mod stream_lifetime;
mod stream_limits;
mod tracing;
mod validation;
mod xds;
mod xds_limits;
mod zones;
