//! The fuzz targets, one module each, and [`ALL`], the list the harness,
//! the `isdp-fuzz` binary and the libFuzzer targets share.
//!
//! A target takes any bytes and panics only on a bug: a parser may refuse
//! its input (that is its job), never crash, hang or answer without bound.

pub mod inbound_bytes;
pub mod policy_document;
pub mod register_request;
pub mod sidecar_config;
pub mod xds_resources;

/// One target: its name (also its corpus folder), the function, and
/// tokens of its input's language for the stable harness's mutations.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
    pub dictionary: &'static [&'static [u8]],
    /// Seeds made in code (protobuf, TLS records), written to the corpus
    /// folder by `isdp-fuzz seeds`; text formats keep hand-written files.
    pub seeds: fn() -> Vec<(&'static str, Vec<u8>)>,
}

pub const ALL: &[Target] = &[
    sidecar_config::TARGET,
    policy_document::TARGET,
    xds_resources::TARGET,
    inbound_bytes::TARGET,
    register_request::TARGET,
];

/// The target called `name`.
pub fn by_name(name: &str) -> Option<&'static Target> {
    ALL.iter().find(|t| t.name == name)
}

/// For targets whose seeds are all files.
pub fn no_seeds() -> Vec<(&'static str, Vec<u8>)> {
    Vec::new()
}
