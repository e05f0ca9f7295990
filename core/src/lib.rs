//! What the ISDP control plane, sidecar and CLI share, defined once below
//! all of them so the contracts between them cannot drift.
//!
//! # Layout
//! - `names`: the DNS-label rule for service names, the SPIFFE ID and TLS
//!   server name (SNI) of a service, and reading a SPIFFE ID back.
//! - `pem`: DER to PEM and a certificate chain with its key.
//! - `cert`: reading a certificate: its one URI SAN, its SPIFFE ID.
//! - `role`: the roles a credential holds (read < write < admin; join).
//! - `grant`: the grant extension (the token a workload certificate was
//!   issued under, and its read scope), written by the CA, read by both.
//! - `path`: request paths in canonical form and segment-wise prefixes, as
//!   authorization rules are validated (control plane) and matched
//!   (sidecar).
//! - `probe`: HTTP, TCP and gRPC-health probes with rise/fall thresholds,
//!   run by sidecars for their services and by the control plane for
//!   operator registrations, so both judge health alike.
//! - `backoff`: exponential backoff with full jitter.
//! - `dial`: connecting to the control plane (TLS, bearer token, client
//!   certificate, several addresses).
//! - `telemetry`: logging and OpenTelemetry tracing setup for every binary.
//! - `metrics`: histogram buckets and gRPC status names both sides label
//!   their metrics with.
//! - `load`: the bounds of a sidecar's load report, which the control
//!   plane enforces and the sidecar keeps to.

#![forbid(unsafe_code)]

pub mod backoff;
pub mod cert;
pub mod dial;
pub mod grant;
pub mod load;
pub mod metrics;
pub mod names;
pub mod path;
pub mod pem;
pub mod probe;
pub mod role;
pub mod telemetry;
