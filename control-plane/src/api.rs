//! The control plane's gRPC services for operators and sidecars.
//!
//! # Layout
//! - `registry`: `isdp.v1.Registry` (register, deregister, list, watch).
//! - `session`: `isdp.v1.Sidecar/Session`, a sidecar's own registrations.
//! - `status`: `isdp.v1.ProxyStatus`, what connected xDS clients
//!   acknowledged.
//! - `csds`: `envoy.service.status.v3.ClientStatusDiscoveryService`, the
//!   same per resource, in the standard form.
//! - `policies`: `isdp.v1.Policies`, traffic policies (put with
//!   compare-and-set, get, list, delete, watch).
//! - `authorization`: `isdp.v1.Authorization`, which services may call which.
//! - `certificates`: `isdp.v1.Certificates` (sign CSRs, trust bundle,
//!   root rotation).
//! - `tokens`: `isdp.v1.Tokens` (create, list, revoke).
//! - `limits`: oversized requests answered with RESOURCE_EXHAUSTED.
//!
//! Every call passed [`crate::auth::AuthLayer`] first.
//!
//! The xDS service is the `isdp_xds` engine's, under [`crate::auth::AdsAccess`];
//! all share one listener.
//!
//! Operations that change state (register, deregister, session open,
//! health report, close) run in an [`op_span`], exported as OTLP server
//! spans when tracing is on (`isdp_core::telemetry`).

pub mod authorization;
pub mod certificates;
pub mod csds;
mod limits;
pub mod policies;
pub mod registry;
pub mod session;
pub mod status;
pub mod tokens;

pub use limits::SizeLimitStatusLayer;

use tonic::Status;

use crate::registry::RegistryError;

/// Largest request the registry and session APIs accept. Registrations are
/// small; anything bigger is a mistake or an attack.
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;

/// The span of one state-changing operation, e.g. `isdp.v1.Registry/Register`.
/// Fields left empty are filled in as they become known.
pub fn op_span(name: &'static str) -> tracing::Span {
    tracing::info_span!(
        "rpc",
        otel.name = name,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.method = name,
        rpc.grpc.status_code = tracing::field::Empty,
        isdp.node = tracing::field::Empty,
        isdp.service = tracing::field::Empty,
        isdp.instance.id = tracing::field::Empty,
    )
}

/// Records how an operation ended on its span.
pub fn record_outcome<T>(span: &tracing::Span, result: &Result<T, Status>) {
    match result {
        Ok(_) => {
            span.record("rpc.grpc.status_code", 0);
        }
        Err(s) => {
            span.record("rpc.grpc.status_code", s.code() as i32);
            span.record("otel.status_code", "ERROR");
        }
    }
}

/// Maps registry errors to the gRPC codes clients act on.
pub fn status(e: RegistryError) -> Status {
    match e {
        RegistryError::Invalid(_) => Status::invalid_argument(e.to_string()),
        RegistryError::NotFound(_) => Status::not_found(e.to_string()),
        RegistryError::PermissionDenied(_) => Status::permission_denied(e.to_string()),
        RegistryError::OwnedBySession(_) => Status::failed_precondition(e.to_string()),
        RegistryError::Quota(_) => Status::resource_exhausted(e.to_string()),
        RegistryError::Contended(_) => Status::aborted(e.to_string()),
        RegistryError::Store(s) => Status::unavailable(s.to_string()),
    }
}
