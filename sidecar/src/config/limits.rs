//! The `[limits]` table: what a client of the sidecar's listeners may hold
//! and for how long, after Envoy's settings for untrusted downstreams.
//!
//! The sidecar sits on every host of the mesh, so its listeners meet
//! whatever can reach them: the local service, other sidecars, and on the
//! inbound port anything on the network. Each bound here keeps one client
//! from exhausting file descriptors, memory or tasks: how many connections
//! a listener holds, how many TLS handshakes the inbound port runs at
//! once, how long a request head may take, how long a connection may sit
//! with nothing in flight, how much an HTTP/2 connection may ask of the
//! server, and how long a TCP tunnel or upgraded connection may stay
//! silent. The defaults are ones a busy service does not meet.
//!
//! Every key is also a flag and an `ISDP_*` variable (`--max-connections`,
//! `ISDP_MAX_CONNECTIONS`, ...); flags win over the file, as for every key.

use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, file::duration};

/// Connections each data-plane listener holds at once: far above what one
/// host's services open, yet a bound on file descriptors (raise the
/// process's file limit above the total over listeners).
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Connections the admin listener holds at once: scrapers, probes and an
/// operator's curl.
pub const DEFAULT_ADMIN_MAX_CONNECTIONS: usize = 64;
/// TLS handshakes the inbound listener runs at once: hundreds of callers
/// reconnecting together after a restart fit, while a client that opens
/// connections and never finishes a handshake holds at most this many.
pub const DEFAULT_MAX_TLS_HANDSHAKES: usize = 1024;
/// Time a request head may take (Envoy's `request_headers_timeout`).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a connection may stay open with no request in flight.
pub const DEFAULT_HTTP_IDLE_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Time a TCP tunnel or upgraded connection may stay silent both ways
/// (Envoy's `tcp_proxy` default).
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(60 * 60);
/// HTTP/2 streams a client may open at once on one connection (hyper's
/// default, announced in SETTINGS).
pub const DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS: u32 = 200;
/// Largest HTTP/2 header block (hyper's default, announced in SETTINGS).
pub const DEFAULT_HTTP2_MAX_HEADER_LIST_SIZE: u32 = 16 << 10;
/// Streams a client may open and reset before the server handles them
/// (the rapid-reset bound; the h2 crate's default).
pub const DEFAULT_HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// Streams a client may make the server reset for its errors (hyper's
/// default).
pub const DEFAULT_HTTP2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;
/// Time between the server's HTTP/2 PINGs, and how long one may go
/// unanswered before the connection is dropped: a caller that vanished
/// without closing (a host gone) frees its connection.
pub const DEFAULT_HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The most any connection cap may be: past it the bound bounds nothing
/// a file limit would not.
const MAX_CAP: usize = 1 << 20;
/// Bounds of the HTTP/2 header block: below 1 KiB no browser request
/// fits, above 8 MiB (Envoy's ceiling) one request holds that much.
const HEADER_LIST_SIZE_RANGE: std::ops::RangeInclusive<i64> = 1024..=8 << 20;

/// The `[limits]` table as written, and its flags (the same names as
/// `--kebab-case`, the variables as `ISDP_SNAKE_CASE`). Counts are signed
/// so that a negative one gets a message naming its key.
#[derive(Debug, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct LimitsSpec {
    /// Connections each data-plane listener (inbound, outbound, each
    /// upstream's) holds at once; one more is closed as it is accepted
    /// [default: 10000].
    #[arg(long, env = "ISDP_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<i64>,
    /// Connections the admin listener holds at once [default: 64].
    #[arg(long, env = "ISDP_ADMIN_MAX_CONNECTIONS", value_name = "N")]
    pub admin_max_connections: Option<i64>,
    /// TLS handshakes the inbound listener runs at once; a connection over
    /// it is closed [default: 1024, at most max_connections].
    #[arg(long, env = "ISDP_MAX_TLS_HANDSHAKES", value_name = "N")]
    pub max_tls_handshakes: Option<i64>,
    /// Time a request head may take: a new connection's first (or its
    /// HTTP/2 preface) from accept, later ones from their first byte
    /// [default: 10s].
    #[arg(long, env = "ISDP_HEADER_READ_TIMEOUT", value_name = "DURATION")]
    pub header_read_timeout: Option<String>,
    /// Time an HTTP connection may stay open with no request in flight
    /// [default: 5m].
    #[arg(long, env = "ISDP_HTTP_IDLE_TIMEOUT", value_name = "DURATION")]
    pub http_idle_timeout: Option<String>,
    /// Time a TCP connection, tunnel or upgraded HTTP connection
    /// (WebSocket) may carry no byte either way before both sides are
    /// closed [default: 1h].
    #[arg(long, env = "ISDP_TCP_IDLE_TIMEOUT", value_name = "DURATION")]
    pub tcp_idle_timeout: Option<String>,
    /// HTTP/2 streams one client connection may have open at once
    /// [default: 200].
    #[arg(long, env = "ISDP_HTTP2_MAX_CONCURRENT_STREAMS", value_name = "N")]
    pub http2_max_concurrent_streams: Option<i64>,
    /// Largest HTTP/2 header block a request may carry, in bytes
    /// [default: 16384].
    #[arg(long, env = "ISDP_HTTP2_MAX_HEADER_LIST_SIZE", value_name = "BYTES")]
    pub http2_max_header_list_size: Option<i64>,
    /// HTTP/2 streams a client may open and reset before they are served,
    /// past which its connection is closed [default: 20].
    #[arg(
        long,
        env = "ISDP_HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS",
        value_name = "N"
    )]
    pub http2_max_pending_accept_reset_streams: Option<i64>,
    /// HTTP/2 streams a client may make the server reset for protocol
    /// errors, past which its connection is closed [default: 1024].
    #[arg(
        long,
        env = "ISDP_HTTP2_MAX_LOCAL_ERROR_RESET_STREAMS",
        value_name = "N"
    )]
    pub http2_max_local_error_reset_streams: Option<i64>,
    /// Time between the server's HTTP/2 PINGs [default: 30s].
    #[arg(long, env = "ISDP_HTTP2_KEEPALIVE_INTERVAL", value_name = "DURATION")]
    pub http2_keepalive_interval: Option<String>,
    /// Time a PING may go unanswered before the connection is dropped
    /// [default: 10s].
    #[arg(long, env = "ISDP_HTTP2_KEEPALIVE_TIMEOUT", value_name = "DURATION")]
    pub http2_keepalive_timeout: Option<String>,
}

/// The validated limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections per data-plane listener, TLS handshakes included.
    pub max_connections: usize,
    /// Connections on the admin listener.
    pub admin_max_connections: usize,
    /// TLS handshakes in progress on the inbound listener.
    pub max_tls_handshakes: usize,
    /// How long a request head may take (see [`LimitsSpec`]).
    pub header_read_timeout: Duration,
    /// How long an HTTP connection may hold no request.
    pub http_idle_timeout: Duration,
    /// How long a byte stream may stay silent both ways.
    pub tcp_idle_timeout: Duration,
    /// What one HTTP/2 connection may ask of the server.
    pub http2: Http2Limits,
}

/// The HTTP/2 side of every HTTP listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Http2Limits {
    pub max_concurrent_streams: u32,
    pub max_header_list_size: u32,
    pub max_pending_accept_reset_streams: usize,
    pub max_local_error_reset_streams: usize,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            admin_max_connections: DEFAULT_ADMIN_MAX_CONNECTIONS,
            max_tls_handshakes: DEFAULT_MAX_TLS_HANDSHAKES,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            http_idle_timeout: DEFAULT_HTTP_IDLE_TIMEOUT,
            tcp_idle_timeout: DEFAULT_TCP_IDLE_TIMEOUT,
            http2: Http2Limits {
                max_concurrent_streams: DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS,
                max_header_list_size: DEFAULT_HTTP2_MAX_HEADER_LIST_SIZE,
                max_pending_accept_reset_streams: DEFAULT_HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS,
                max_local_error_reset_streams: DEFAULT_HTTP2_MAX_LOCAL_ERROR_RESET_STREAMS,
                keepalive_interval: DEFAULT_HTTP2_KEEPALIVE_INTERVAL,
                keepalive_timeout: DEFAULT_HTTP2_KEEPALIVE_TIMEOUT,
            },
        }
    }
}

// === impl LimitsSpec ===

impl LimitsSpec {
    /// Puts every flag that was given over the file's value.
    pub fn merge(&mut self, flags: LimitsSpec) {
        macro_rules! over {
            ($($field:ident),* $(,)?) => {
                $(if flags.$field.is_some() { self.$field = flags.$field; })*
            };
        }
        over!(
            max_connections,
            admin_max_connections,
            max_tls_handshakes,
            header_read_timeout,
            http_idle_timeout,
            tcp_idle_timeout,
            http2_max_concurrent_streams,
            http2_max_header_list_size,
            http2_max_pending_accept_reset_streams,
            http2_max_local_error_reset_streams,
            http2_keepalive_interval,
            http2_keepalive_timeout,
        );
    }

    /// Applies defaults and checks every key; errors name it as
    /// `limits.KEY`.
    pub fn validate(&self) -> Result<Limits, ConfigError> {
        let d = Limits::default();
        let max_connections = count("max_connections", self.max_connections, d.max_connections)?;
        let admin_max_connections = count(
            "admin_max_connections",
            self.admin_max_connections,
            d.admin_max_connections,
        )?;
        // A handshake is a connection, so a cap above max_connections
        // would never apply: refused rather than silently meaningless.
        let max_tls_handshakes = match self.max_tls_handshakes {
            None => d.max_tls_handshakes.min(max_connections),
            Some(n) if (1..=max_connections as i64).contains(&n) => n as usize,
            Some(n) => {
                return Err(ConfigError::invalid(
                    "limits.max_tls_handshakes",
                    format!(
                        "must be 1..={max_connections} (limits.max_connections: a handshake \
                         holds one of its places), got {n}"
                    ),
                ));
            }
        };
        let time = |key: &str, value: &Option<String>, default: Duration| match value {
            Some(text) => duration(&format!("limits.{key}"), text),
            None => Ok(default),
        };
        let h2 = &d.http2;
        Ok(Limits {
            max_connections,
            admin_max_connections,
            max_tls_handshakes,
            header_read_timeout: time(
                "header_read_timeout",
                &self.header_read_timeout,
                d.header_read_timeout,
            )?,
            http_idle_timeout: time(
                "http_idle_timeout",
                &self.http_idle_timeout,
                d.http_idle_timeout,
            )?,
            tcp_idle_timeout: time(
                "tcp_idle_timeout",
                &self.tcp_idle_timeout,
                d.tcp_idle_timeout,
            )?,
            http2: Http2Limits {
                max_concurrent_streams: match self.http2_max_concurrent_streams {
                    None => h2.max_concurrent_streams,
                    Some(n) => {
                        in_range("http2_max_concurrent_streams", n, 1..=u32::MAX as i64)? as u32
                    }
                },
                max_header_list_size: match self.http2_max_header_list_size {
                    None => h2.max_header_list_size,
                    Some(n) => {
                        in_range("http2_max_header_list_size", n, HEADER_LIST_SIZE_RANGE)? as u32
                    }
                },
                max_pending_accept_reset_streams: count(
                    "http2_max_pending_accept_reset_streams",
                    self.http2_max_pending_accept_reset_streams,
                    h2.max_pending_accept_reset_streams,
                )?,
                max_local_error_reset_streams: count(
                    "http2_max_local_error_reset_streams",
                    self.http2_max_local_error_reset_streams,
                    h2.max_local_error_reset_streams,
                )?,
                keepalive_interval: time(
                    "http2_keepalive_interval",
                    &self.http2_keepalive_interval,
                    h2.keepalive_interval,
                )?,
                keepalive_timeout: time(
                    "http2_keepalive_timeout",
                    &self.http2_keepalive_timeout,
                    h2.keepalive_timeout,
                )?,
            },
        })
    }
}

/// A cap: 1 up to [`MAX_CAP`].
fn count(key: &str, value: Option<i64>, default: usize) -> Result<usize, ConfigError> {
    match value {
        None => Ok(default),
        Some(n) => Ok(in_range(key, n, 1..=MAX_CAP as i64)? as usize),
    }
}

fn in_range(key: &str, n: i64, range: std::ops::RangeInclusive<i64>) -> Result<i64, ConfigError> {
    if range.contains(&n) {
        return Ok(n);
    }
    Err(ConfigError::invalid(
        format!("limits.{key}"),
        format!("must be {}..={}, got {n}", range.start(), range.end()),
    ))
}
