//! The sidecar's configuration: a TOML file (`--config`) plus flags, each
//! flag also an `ISDP_*` environment variable. Flags override the file; a
//! repeated flag (`--control-plane`, `--service`, `--upstream`) replaces the
//! file's whole list.
//!
//! # Layout
//! - `file`: the TOML file as written, and validation into [`Config`].
//! - `limits`: the `[limits]` table (connection caps, timeouts, HTTP/2
//!   bounds of every listener).
//! - `relay`: the xDS relay's keys.
//! - `dns`: the DNS server's keys.

mod dns;
mod file;
mod limits;
mod locality;
mod relay;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use isdp_core::probe::{CheckSpec, Target, Thresholds};

pub use dns::{
    DEFAULT_DNS_DOMAIN, DEFAULT_DNS_MAX_ANSWERS, DEFAULT_DNS_TTL_SECS, Dns, MAX_DNS_MAX_ANSWERS,
    MAX_DNS_TTL_SECS,
};
pub use file::{FileConfig, ServiceSpec, UpstreamSpec};
pub use limits::{
    DEFAULT_ADMIN_MAX_CONNECTIONS, DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_HTTP_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_TLS_HANDSHAKES, DEFAULT_TCP_IDLE_TIMEOUT, Http2Limits,
    Limits, LimitsSpec,
};
pub use relay::{DEFAULT_RELAY_MAX_STREAMS, MAX_RELAY_MAX_STREAMS, RelayListen, XdsRelay};

/// Default admin listener.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:15000";
/// Default port of the inbound listener, on the advertised address.
pub const DEFAULT_INBOUND_PORT: u16 = 15006;
pub const DEFAULT_OUTBOUND_LISTEN: &str = "127.0.0.1:15001";
/// Default control plane.
pub const DEFAULT_CONTROL_PLANE: &str = "https://127.0.0.1:15010";
/// Default time between probes and per-probe timeout.
pub const DEFAULT_CHECK_PERIOD: Duration = Duration::from_secs(1);
/// Default time allowed for a clean shutdown.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Command-line flags.
#[derive(Debug, Default, clap::Parser)]
#[command(name = "isdp-sidecar", version, about = "ISDP sidecar")]
pub struct Cli {
    /// TOML config file; flags override its values.
    #[arg(long, env = "ISDP_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// This node's id, unique in the mesh [default: hostname].
    #[arg(long, env = "ISDP_NODE_ID")]
    pub node_id: Option<String>,
    /// Control-plane gRPC URL; repeatable or comma-separated, tried in turn
    /// [default: https://127.0.0.1:15010].
    #[arg(
        long,
        env = "ISDP_CONTROL_PLANE",
        value_name = "URL",
        value_delimiter = ','
    )]
    pub control_plane: Vec<String>,
    /// The mesh CA (PEM) the control plane's certificate is checked
    /// against; required for https:// control planes (the control plane
    /// writes it to <data-dir>/ca.pem).
    #[arg(long, env = "ISDP_CA_FILE", value_name = "PATH")]
    pub ca_file: Option<PathBuf>,
    /// Token this sidecar authenticates with (a join token for its
    /// services); required for https:// control planes. Prefer the
    /// variable: flags show in `ps`.
    #[arg(long, env = "ISDP_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// Admin HTTP listener (/live, /ready, /config) [default: 127.0.0.1:15000].
    #[arg(long, env = "ISDP_ADMIN_LISTEN", value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// Address advertised for local services [default: 127.0.0.1].
    #[arg(long, env = "ISDP_ADDRESS", value_name = "IP")]
    pub address: Option<String>,
    /// Inbound listener: mesh traffic for the local services
    /// [default: ADDRESS:15006].
    #[arg(long, env = "ISDP_INBOUND_LISTEN", value_name = "ADDR")]
    pub inbound_listen: Option<String>,
    /// Shared outbound listener, routing by Host / :authority to the
    /// upstream of that name [default: 127.0.0.1:15001].
    #[arg(long, env = "ISDP_OUTBOUND_LISTEN", value_name = "ADDR")]
    pub outbound_listen: Option<String>,
    /// A local service: comma-separated key=value with the keys of a
    /// `[[service]]` table, metadata as meta.KEY=VALUE; repeatable
    /// (';'-separated in the environment).
    #[arg(long, env = "ISDP_SERVICE", value_name = "SPEC", value_delimiter = ';')]
    pub service: Vec<String>,
    /// An upstream to follow: comma-separated key=value with the keys of an
    /// `[[upstream]]` table; repeatable (';'-separated in the environment).
    #[arg(
        long,
        env = "ISDP_UPSTREAM",
        value_name = "SPEC",
        value_delimiter = ';'
    )]
    pub upstream: Vec<String>,
    /// Log format [default: text].
    #[arg(long, env = "ISDP_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Worker threads for the data plane; 1 runs everything on one thread
    /// [default: 1].
    #[arg(long, env = "ISDP_WORKERS", value_name = "N")]
    pub workers: Option<usize>,
    /// Time allowed for a clean shutdown, e.g. 5s [default: 5s].
    #[arg(long, env = "ISDP_DRAIN_TIMEOUT", value_name = "DURATION")]
    pub drain_timeout: Option<String>,
    /// Log one line per proxied request (target `isdp::access`).
    #[arg(long, env = "ISDP_ACCESS_LOG")]
    pub access_log: bool,
    /// The service this sidecar calls others as (its client certificate's
    /// SPIFFE ID) [default: the first local service].
    #[arg(long, env = "ISDP_IDENTITY", value_name = "SERVICE")]
    pub identity: Option<String>,
    /// The zone this node runs in (a DNS label): stamped on the local
    /// instances, and the zone whose endpoints its calls prefer
    /// [default: none, no locality-aware balancing].
    #[arg(long, env = "ISDP_ZONE", value_name = "ZONE")]
    pub zone: Option<String>,
    /// Relay ADS for local xDS clients that cannot authenticate (plaintext
    /// h2c) to the control plane with this sidecar's credentials: a
    /// loopback ADDR:PORT or unix:/PATH [default: off].
    #[arg(long, env = "ISDP_XDS_RELAY_LISTEN", value_name = "ADDR")]
    pub xds_relay_listen: Option<String>,
    /// Streams the xDS relay carries at once [default: 64].
    #[arg(long, env = "ISDP_XDS_RELAY_MAX_STREAMS", value_name = "N")]
    pub xds_relay_max_streams: Option<u64>,
    /// Answer DNS queries for the upstreams' instances
    /// (`<service>.service.<domain>`), over UDP and TCP on this ADDR:PORT
    /// [default: off].
    #[arg(long, env = "ISDP_DNS_LISTEN", value_name = "ADDR")]
    pub dns_listen: Option<String>,
    /// The domain the DNS server answers for [default: isdp].
    #[arg(long, env = "ISDP_DNS_DOMAIN", value_name = "DOMAIN")]
    pub dns_domain: Option<String>,
    /// TTL of the DNS server's records, whole seconds, 0 allowed
    /// [default: 5s, at most 1h].
    #[arg(long, env = "ISDP_DNS_TTL", value_name = "DURATION")]
    pub dns_ttl: Option<String>,
    /// Records in one DNS answer; more instances are sampled at random
    /// [default: 8, at most 256].
    #[arg(long, env = "ISDP_DNS_MAX_ANSWERS", value_name = "N")]
    pub dns_max_answers: Option<i64>,
    /// TCP connections the DNS server serves at once; one over it is
    /// closed at accept [default: 256].
    #[arg(long, env = "ISDP_DNS_MAX_TCP_CONNECTIONS", value_name = "N")]
    pub dns_max_tcp_connections: Option<i64>,
    #[command(flatten)]
    pub trace: isdp_core::telemetry::TraceArgs,
    /// The `[limits]` table's keys.
    #[command(flatten)]
    pub limits: LimitsSpec,
}

/// How logs are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Application protocol of a service or upstream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Http,
    Grpc,
    Tcp,
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Identifies this sidecar's session and prefixes its instance ids.
    pub node_id: String,
    /// Control-plane URLs, tried in turn on reconnect.
    pub control_plane: Vec<String>,
    /// Trusted roots for https:// control planes.
    pub ca_file: Option<PathBuf>,
    /// Bearer token sent to the control plane.
    pub join_token: Option<String>,
    /// Where the admin server listens (port 0 picks one).
    pub admin_listen: SocketAddr,
    /// Where other sidecars send mesh traffic for the local services; its
    /// port is registered with every local instance.
    pub inbound_listen: SocketAddr,
    /// Where the local service sends requests for any upstream, by name.
    pub outbound_listen: SocketAddr,
    /// Address other sidecars use to reach the local services.
    pub address: IpAddr,
    /// Services running next to this sidecar, registered via the session.
    pub services: Vec<Service>,
    /// Services this node calls, followed over xDS.
    pub upstreams: Vec<Upstream>,
    /// Log output format.
    pub log_format: LogFormat,
    /// Time allowed for a clean shutdown before the process exits anyway.
    pub drain_timeout: Duration,
    /// Runtime worker threads (1: a single-threaded runtime).
    pub workers: usize,
    /// OTLP/gRPC collector for spans; `None`: no tracing.
    pub otlp_endpoint: Option<String>,
    /// Share of new traces sampled; incoming `traceparent` flags win.
    pub trace_sample_ratio: f64,
    /// One log line per request, on target `isdp::access`.
    pub access_log: bool,
    /// The service whose certificate this sidecar presents when calling
    /// other sidecars; None only for a sidecar with neither local services
    /// nor upstreams.
    pub identity: Option<String>,
    /// The zone this node runs in; None: no zone, so calls are balanced
    /// without regard to locality.
    pub zone: Option<String>,
    /// The ADS relay for local clients that cannot authenticate to the
    /// control plane themselves; None: off.
    pub xds_relay: Option<XdsRelay>,
    /// The DNS server answering for the upstreams' instances from the
    /// discovery snapshot; None: off.
    pub dns: Option<Dns>,
    /// What clients of the listeners may hold, and for how long.
    pub limits: Limits,
}

/// A local service.
#[derive(Clone, Debug, PartialEq)]
pub struct Service {
    /// DNS label; the instance id is `{node_id}.{name}`.
    pub name: String,
    /// Port the service listens on at `Config::address`.
    pub port: u16,
    /// Protocol, so clients and the data plane know how to talk to it.
    pub protocol: Protocol,
    /// Health check target; without one the instance stays `unknown` (routable).
    pub check: Option<Target>,
    /// Time between probes.
    pub interval: Duration,
    /// Time one probe may take.
    pub timeout: Duration,
    /// Consecutive passes to turn healthy again (>= 1).
    pub rise: u32,
    /// Consecutive failures to turn unhealthy (>= 1).
    pub fall: u32,
    /// Relative share of traffic (>= 1).
    pub weight: u32,
    /// Failover priority, 0 (the highest) to [`MAX_PRIORITY`]: standby
    /// instances (a DR site, a cold pool) take only what the instances of
    /// lower numbers cannot carry.
    pub priority: u32,
    /// Free-form labels such as version and zone.
    pub metadata: BTreeMap<String, String>,
}

/// The lowest failover priority the registry accepts (its
/// `MAX_PRIORITY`), checked at load so a bad value stops the sidecar with
/// the field named rather than failing every registration.
pub const MAX_PRIORITY: u32 = 7;

/// An upstream this node follows.
#[derive(Clone, Debug, PartialEq)]
pub struct Upstream {
    /// Service name, also the xDS resource name.
    pub name: String,
    /// Optional dedicated local listener for this upstream; without it the
    /// upstream is reached through the shared outbound listener by name.
    pub listen: Option<SocketAddr>,
    /// `http` (HTTP/1.1 and h2c, gRPC included) or `tcp` (opaque bytes,
    /// balanced per connection).
    pub protocol: Protocol,
    /// How requests are spread over the endpoints.
    pub lb: crate::balance::Algorithm,
    /// What consistent hashing (ring_hash, maglev) hashes on.
    pub hash_key: Option<crate::balance::HashKey>,
    /// Locality-aware balancing; a traffic policy's `locality` replaces it.
    pub locality: crate::balance::locality::LocalityConfig,
    /// The sidecar's `zone`, the caller's zone for this upstream (kept
    /// here so the balancing state needs nothing but its upstreams).
    pub caller_zone: Option<String>,
}

/// A configuration error; the message names the offending field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

impl ConfigError {
    fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

// === impl Service ===

impl Service {
    /// The check this service needs, if it has a target.
    pub fn check_spec(&self) -> Option<CheckSpec> {
        Some(CheckSpec {
            target: self.check.clone()?,
            interval: self.interval,
            timeout: self.timeout,
            thresholds: Thresholds {
                rise: self.rise,
                fall: self.fall,
            },
        })
    }
}

// === impl Config ===

impl Config {
    /// Reads `--config` (if any), applies the flags on top and validates.
    pub fn load(cli: Cli) -> Result<Config, ConfigError> {
        let file = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                FileConfig::parse(&text, &path.display().to_string())?
            }
            None => FileConfig::default(),
        };
        Self::from_parts(file, cli)
    }

    /// Parses and validates a TOML document with no flags on top.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Self::from_parts(FileConfig::parse(text, "config")?, Cli::default())
    }

    /// Merges flags over the file and validates the result.
    pub fn from_parts(mut file: FileConfig, cli: Cli) -> Result<Config, ConfigError> {
        if cli.node_id.is_some() {
            file.node_id = cli.node_id;
        }
        if !cli.control_plane.is_empty() {
            file.control_plane = Some(cli.control_plane);
        }
        if cli.ca_file.is_some() {
            file.ca_file = cli.ca_file;
        }
        if cli.join_token.is_some() {
            file.join_token = cli.join_token;
        }
        if cli.inbound_listen.is_some() {
            file.inbound_listen = cli.inbound_listen;
        }
        if cli.outbound_listen.is_some() {
            file.outbound_listen = cli.outbound_listen;
        }
        if cli.admin_listen.is_some() {
            file.admin_listen = cli.admin_listen;
        }
        if cli.address.is_some() {
            file.address = cli.address;
        }
        if !cli.service.is_empty() {
            file.service = cli
                .service
                .iter()
                .enumerate()
                .map(|(i, spec)| ServiceSpec::from_flag(spec, i))
                .collect::<Result<_, _>>()?;
        }
        if !cli.upstream.is_empty() {
            file.upstream = cli
                .upstream
                .iter()
                .enumerate()
                .map(|(i, spec)| UpstreamSpec::from_flag(spec, i))
                .collect::<Result<_, _>>()?;
        }
        if cli.log_format.is_some() {
            file.log_format = cli.log_format;
        }
        if cli.workers.is_some() {
            file.workers = cli.workers;
        }
        if cli.drain_timeout.is_some() {
            file.drain_timeout = cli.drain_timeout;
        }
        if cli.access_log {
            file.access_log = Some(true);
        }
        if cli.identity.is_some() {
            file.identity = cli.identity;
        }
        if cli.zone.is_some() {
            file.zone = cli.zone;
        }
        if cli.xds_relay_listen.is_some() {
            file.xds_relay_listen = cli.xds_relay_listen;
        }
        if cli.xds_relay_max_streams.is_some() {
            file.xds_relay_max_streams = cli.xds_relay_max_streams;
        }
        if cli.dns_listen.is_some() {
            file.dns_listen = cli.dns_listen;
        }
        if cli.dns_domain.is_some() {
            file.dns_domain = cli.dns_domain;
        }
        if cli.dns_ttl.is_some() {
            file.dns_ttl = cli.dns_ttl;
        }
        if cli.dns_max_answers.is_some() {
            file.dns_max_answers = cli.dns_max_answers;
        }
        if cli.dns_max_tcp_connections.is_some() {
            file.dns_max_tcp_connections = cli.dns_max_tcp_connections;
        }
        if cli.trace.otlp_endpoint.is_some() {
            file.otlp_endpoint = cli.trace.otlp_endpoint;
        }
        if cli.trace.trace_sample_ratio.is_some() {
            file.trace_sample_ratio = cli.trace.trace_sample_ratio;
        }
        file.limits.merge(cli.limits);
        file.validate()
    }
}

/// The machine's hostname, used when no node id is configured.
fn hostname() -> Option<String> {
    let from_env = std::env::var("HOSTNAME").ok();
    let from_file = || {
        ["/proc/sys/kernel/hostname", "/etc/hostname"]
            .iter()
            .find_map(|p| std::fs::read_to_string(p).ok())
    };
    from_env
        .or_else(from_file)
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

fn default_address() -> IpAddr {
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}

#[cfg(test)]
mod tests;
