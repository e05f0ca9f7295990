//! Mutual TLS between sidecars, as data: the rustls configurations in
//! force (`context`), the SPIFFE checks on top of webpki's (`verify`), and
//! the trust bundle's revoked tokens (`revoked`).
//!
//! Both `identity` (which turns a signed certificate into a rustls key with
//! [`certified_key`]) and `proxy` (which accepts and connects with a
//! [`TlsContext`]) use this module, and it knows neither: it sits below
//! both, so neither has to import the other. Building a context when the
//! identities or the bundle change, and the handshakes themselves, are the
//! proxy's (`proxy::transport`).
//!
//! Every sidecar-to-sidecar connection is TLS 1.3 (rustls, ring). The
//! server picks the local service's certificate by SNI
//! (`<service>.svc.<trust-domain>`) and requires a client certificate
//! chaining to the trust bundle with one SPIFFE URI SAN in the trust
//! domain; the client checks the server's chain and that its SPIFFE ID is
//! `spiffe://<td>/svc/<service>` for the service it asked for. ALPN says
//! what a connection carries: [`ALPN_H2`] (requests between sidecars),
//! [`ALPN_HTTP1`] (upgrades such as WebSocket) or [`ALPN_TCP`] (a TCP
//! tunnel; the SNI names the service, so no preamble is needed).
//!
//! # Layout
//! - `context`: [`TlsContext`] (server and client configurations for one
//!   identities-and-bundle state), [`certified_key`], the ring provider.
//! - `verify`: the client and server certificate verifiers.
//! - `revoked`: [`Revocations`], read live by the verifiers, and the
//!   [`PeerGuard`] each open connection holds on its peer's token.
//! - `test_pki` (tests only): rcgen-made CAs for the tests of every module.

mod context;
pub mod revoked;
#[cfg(test)]
pub mod test_pki;
pub mod verify;

use std::sync::Arc;

pub use context::{ContextError, LocalCert, TlsContext, certified_key, provider, sni_service};
pub use revoked::{PeerGuard, Revocations, any_revoked};

/// ALPN for HTTP/2 between sidecars.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN for HTTP/1.1 (upgrades) between sidecars.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// ALPN for a TCP tunnel between sidecars.
pub const ALPN_TCP: &[u8] = b"isdp-tcp/1";

/// The verified SPIFFE ID of the sidecar at the other end of an inbound
/// connection. Carried by every request of the connection in the proxy's
/// `ClientAddr::peer` (one extension per request, not two) and handed to
/// TCP tunnels; authorization reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity(pub Arc<str>);
