//! Flags of the HTTP/JSON API listener (`crate::http`).

use std::{net::SocketAddr, time::Duration};

/// Default `--http-max-body-bytes`: a policy document or a registration
/// with its metadata fits many times over.
pub const DEFAULT_MAX_BODY_BYTES: usize = 256 << 10;

#[derive(Clone, Debug, clap::Args)]
pub struct HttpArgs {
    /// HTTP/JSON API and Consul-compatible reads, over TLS from the mesh
    /// root like the gRPC listener, with the same bearer tokens. Port 0
    /// picks a free port.
    #[arg(long, env = "ISDP_HTTP_LISTEN", default_value = "127.0.0.1:15080")]
    pub http_listen: SocketAddr,

    /// Most connections the HTTP listener holds at once, TLS handshakes
    /// included; one over it is closed as it is accepted. It shares
    /// `--first-request-timeout` with the gRPC listener.
    #[arg(long, env = "ISDP_HTTP_MAX_CONNECTIONS", default_value_t = 1024)]
    pub http_max_connections: usize,

    /// How long a client may take to send a request's headers; the
    /// connection is closed then.
    #[arg(long, env = "ISDP_HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub http_header_timeout: Duration,

    /// How long a connection may stay open with no request in flight (a
    /// blocking read waiting for a change is in flight).
    #[arg(long, env = "ISDP_HTTP_IDLE_TIMEOUT", default_value = "90s", value_parser = humantime::parse_duration)]
    pub http_idle_timeout: Duration,

    /// Largest request body; a bigger one is answered 413.
    #[arg(long, env = "ISDP_HTTP_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub http_max_body_bytes: usize,

    /// Longest `?wait=` a blocking read may ask for; longer waits are cut
    /// to it (Consul's own bound).
    #[arg(long, env = "ISDP_HTTP_MAX_WAIT", default_value = "10m", value_parser = humantime::parse_duration)]
    pub http_max_wait: Duration,

    /// The datacenter the Consul-compatible endpoints report, and the only
    /// `?dc=` they accept.
    #[arg(long, env = "ISDP_CONSUL_DATACENTER", default_value = "dc1")]
    pub consul_datacenter: String,
}

impl HttpArgs {
    pub fn validate(&self) -> Result<(), String> {
        for (flag, zero) in [
            ("--http-max-connections", self.http_max_connections == 0),
            ("--http-max-body-bytes", self.http_max_body_bytes == 0),
            ("--http-header-timeout", self.http_header_timeout.is_zero()),
            ("--http-idle-timeout", self.http_idle_timeout.is_zero()),
            ("--http-max-wait", self.http_max_wait.is_zero()),
        ] {
            if zero {
                return Err(format!("{flag} must be more than zero"));
            }
        }
        isdp_core::names::check_dns_label(&self.consul_datacenter)
            .map_err(|e| format!("--consul-datacenter: {e}"))
    }
}
