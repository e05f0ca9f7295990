//! The control plane's gRPC services for operators and sidecars.
//!
//! # Layout
//! - `registry`: `isdp.v1.Registry` (register, deregister, list, watch).
//! - `session`: `isdp.v1.Sidecar/Session`, a sidecar's own registrations.
//! - `status`: `isdp.v1.ProxyStatus`, what connected sidecars acknowledged.
//! - `limits`: oversized requests answered with RESOURCE_EXHAUSTED.
//!
//! The xDS service lives in [`crate::xds`]; all three share one listener.

mod limits;
pub mod registry;
pub mod session;
pub mod status;

pub use limits::SizeLimitStatusLayer;

use tonic::Status;

use crate::registry::RegistryError;

/// Largest request the registry and session APIs accept. Registrations are
/// small; anything bigger is a mistake or an attack.
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;

/// Maps registry errors to the gRPC codes clients act on.
pub fn status(e: RegistryError) -> Status {
    match e {
        RegistryError::Invalid(_) => Status::invalid_argument(e.to_string()),
        RegistryError::NotFound(_) => Status::not_found(e.to_string()),
        RegistryError::PermissionDenied(_) => Status::permission_denied(e.to_string()),
        RegistryError::Contended(_) => Status::aborted(e.to_string()),
        RegistryError::Store(s) => Status::unavailable(s.to_string()),
    }
}
