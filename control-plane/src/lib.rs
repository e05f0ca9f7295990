//! ISDP control plane.
pub mod registry;
pub mod store;
pub mod xds;
