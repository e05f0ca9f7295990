//! The xDS relay's settings: where it listens, and how many streams it
//! relays at once. Off unless `xds_relay_listen` is set.
//!
//! Whoever reaches the relay reads the mesh with this sidecar's
//! credentials, so only listeners the host alone can reach are accepted:
//! a loopback address, or a unix socket (whose file mode says which local
//! users may connect, `relay::listen`).

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use super::ConfigError;

/// Streams relayed at once unless `xds_relay_max_streams` says otherwise:
/// a proxyless client holds one ADS stream per process, so this is one per
/// gRPC process on the host, with room to spare.
pub const DEFAULT_RELAY_MAX_STREAMS: usize = 64;
/// The most `xds_relay_max_streams` may be: every relayed stream counts
/// against this sidecar's principal on the control plane
/// (`--max-streams-per-principal`, 1000 by default), beside its own.
pub const MAX_RELAY_MAX_STREAMS: usize = 1024;
/// The longest unix socket path the kernel takes (`sun_path` is 108 bytes,
/// one for the terminating NUL).
const MAX_UNIX_PATH_BYTES: usize = 107;

/// The relay, when on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdsRelay {
    /// Where it listens: loopback or a unix socket only.
    pub listen: RelayListen,
    /// Relayed streams open at once; one more is refused with
    /// RESOURCE_EXHAUSTED naming `xds_relay_max_streams`.
    pub max_streams: usize,
}

/// A listener the host alone can reach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RelayListen {
    /// A loopback address (`127.0.0.0/8`, `::1`); port 0 picks one.
    Tcp(SocketAddr),
    /// `unix:/PATH`: an absolute path, created (or a stale socket replaced)
    /// at startup and removed at shutdown.
    Unix(PathBuf),
}

impl fmt::Display for RelayListen {
    /// As configured: `127.0.0.1:15002` or `unix:/run/isdp/xds.sock`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RelayListen::Tcp(addr) => write!(f, "{addr}"),
            RelayListen::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl RelayListen {
    /// Parses `ADDR:PORT` (loopback only) or `unix:/PATH`; the error says
    /// what is accepted and why.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Some(path) = text.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!(
                    "a unix socket needs an absolute path (unix:/PATH), got {text:?}"
                ));
            }
            if path.len() > MAX_UNIX_PATH_BYTES || path.ends_with('/') {
                return Err(format!(
                    "a unix socket path must name a file of at most {MAX_UNIX_PATH_BYTES} bytes, got {path:?}"
                ));
            }
            return Ok(RelayListen::Unix(PathBuf::from(path)));
        }
        let addr: SocketAddr = text.parse().map_err(|e| {
            format!(
                "invalid address {text:?}: {e} (expected 127.0.0.1:PORT, [::1]:PORT or unix:/PATH)"
            )
        })?;
        if !addr.ip().to_canonical().is_loopback() {
            return Err(format!(
                "must be a loopback address (127.0.0.1:PORT, [::1]:PORT) or unix:/PATH, got {addr}: \
                 whoever reaches the relay reads the mesh with this sidecar's credentials"
            ));
        }
        Ok(RelayListen::Tcp(addr))
    }
}

/// Validates the two keys together: `xds_relay_max_streams` only means
/// something with a listener, so it is refused without one rather than
/// silently ignored.
pub(super) fn validate(
    listen: Option<&str>,
    max_streams: Option<u64>,
) -> Result<Option<XdsRelay>, ConfigError> {
    let Some(listen) = listen else {
        if max_streams.is_some() {
            return Err(ConfigError::invalid(
                "xds_relay_max_streams",
                "set without xds_relay_listen: the relay is off",
            ));
        }
        return Ok(None);
    };
    let listen =
        RelayListen::parse(listen).map_err(|r| ConfigError::invalid("xds_relay_listen", r))?;
    let max_streams = match max_streams {
        None => DEFAULT_RELAY_MAX_STREAMS,
        Some(n) => usize::try_from(n)
            .ok()
            .filter(|n| (1..=MAX_RELAY_MAX_STREAMS).contains(n))
            .ok_or_else(|| {
                ConfigError::invalid(
                    "xds_relay_max_streams",
                    format!("must be 1..={MAX_RELAY_MAX_STREAMS}, got {n}"),
                )
            })?,
    };
    Ok(Some(XdsRelay {
        listen,
        max_streams,
    }))
}
