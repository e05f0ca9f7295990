//! A generic xDS server: ADS over `envoy.service.discovery.v3`, both
//! state-of-the-world and delta.
//!
//! The engine knows nothing of the application's resources or callers.
//! Producers put typed messages (prost's `Name` gives their type URL) into
//! the [`Cache`], one at a time or several together ([`Batch`]); streams
//! subscribe to names and are woken only by changes to the names they hold
//! (go-control-plane's "linear cache" design). Each resource is encoded
//! once, as an `Any` and as a delta `Resource`, and those bytes are shared
//! by every stream that sends it: a response is a small per-stream header
//! followed by the shared bytes. Who may read what is the application's
//! call, made once per stream through the [`Access`] trait.
//!
//! Nothing a client sends grows the server without bound: a stream
//! subscribes to at most [`Limits::names_per_stream`] names per type, the
//! bytes of names it holds are reported to the application
//! ([`StreamAccess::charge`]) so it can budget them across a caller's
//! streams, refused names are remembered only while subscribed, every
//! line a client can cause is logged at a bounded rate for the whole
//! server ([`LogRate`]), node ids, the node's other fields observers are
//! told, and NACK texts are bounded, and nonces
//! are counted per stream, so they tell a stream nothing of the others.
//!
//! Flow control follows xDS practice: one response per type is in flight on
//! a stream until the client ACKs or NACKs it; changes arriving meanwhile are
//! coalesced into the next response. A NACKed version is never resent; the
//! next change produces a new one. A delta response carries at most
//! [`DELTA_RESPONSE_BUDGET`] bytes of resources (always at least one); the
//! rest follow once it is acknowledged, so many large resources never add
//! up to a message the client cannot decode. Versions are content hashes,
//! so they agree across restarts and replicas.
//!
//! # Layout
//! - `cache`: resources by type and name, batches, and the watchers each
//!   change wakes (`cache/batch.rs`, `cache/subscriptions.rs`).
//! - `resource`: encoded resources and response assembly from shared bytes.
//! - `codec`: the gRPC codec that sends those pre-encoded bytes as is.
//! - `access`: the application's access rules ([`Access`],
//!   [`StreamAccess`]) and their per-stream application: names a stream
//!   may not read are absent (and logged at a bounded rate,
//!   `access/log.rs`), wildcards are filtered.
//! - `limits`: what one stream may make the server hold, log or show
//!   ([`Limits`]: names per stream and type; name, node id, node field
//!   and NACK text lengths; what a name costs, [`name_cost`]).
//! - `node`: what the first request's node says of the client beyond its
//!   id (user agent, cluster, zone), checked, for observers.
//! - `log_rate`: the bound on what all streams together write to the log
//!   ([`LogRate`]).
//! - `event`: stream events and the observer hooks (a leaf: the state
//!   machines produce events, the server reports them): responses, ACKs
//!   and NACKs, subscription changes and resumed versions, so an observer
//!   can tell per resource what a client holds without a copy of the
//!   stream's names.
//! - `sotw`, `delta`: the per-stream protocol state machines (pure, no I/O).
//! - `protocol`: the one interface over both, which the server drives.
//! - `server`: the tonic service that drives streams.

#![forbid(unsafe_code)]

mod access;
mod cache;
mod codec;
mod delta;
mod event;
mod limits;
mod log_rate;
mod node;
mod protocol;
mod resource;
mod server;
mod sotw;

pub use access::{Access, Caller, StreamAccess, Unrestricted};
pub use cache::{Batch, Cache, TypeCache};
pub use event::{StreamEvent, StreamInfo, StreamObserver};
pub use limits::{
    Limits, MAX_NACK_MESSAGE_BYTES, MAX_NAME_BYTES, MAX_NODE_FIELD_BYTES, MAX_NODE_ID_BYTES,
    NAME_OVERHEAD_BYTES, TRUNCATED, name_cost,
};
pub use log_rate::{LINES_PER_WINDOW, LogRate, WINDOW as LOG_WINDOW};
pub use resource::Encoded;
pub use server::AdsService;

/// The most resource bytes one delta response carries, unless a single
/// resource is larger (it then goes alone): a quarter of the 16 MiB a
/// client typically decodes in one message, so a client following many
/// large resources gets them over several responses, each of which it can
/// decode (an application checks its own resource cap against it). State-of-the-world
/// responses hold a stream's whole set by definition and cannot be split.
pub const DELTA_RESPONSE_BUDGET: usize = 4 << 20;

/// The name that subscribes to every resource of a type.
pub const WILDCARD: &str = "*";

#[cfg(test)]
mod tests;
