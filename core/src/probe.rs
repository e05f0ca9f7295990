//! Active health probes: HTTP, TCP and gRPC, plus the rise/fall state
//! machine and a checker task. Independent of the rest of the sidecar so the
//! control plane can reuse it for operator-registered instances.

mod checker;
mod health;

use std::io;
use std::str::FromStr;
use std::time::Duration;

use http::uri::Authority;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

pub use checker::{CheckSpec, spawn_checker};
pub use health::{Health, HealthState, Thresholds};

/// Below this share of routable (not unhealthy) endpoints, traffic spreads
/// over all of them rather than overloading the few survivors: health
/// checks can be wrong, and survivors overloaded. ISDP's sidecars apply it
/// when balancing; the control plane applies it to what it sends clients
/// without a panic mode of their own (proxyless gRPC).
pub const PANIC_THRESHOLD: f64 = 0.5;

/// Envoy's default overprovisioning factor, in percent: a priority (or
/// zone) level keeps `healthy share × 1.4` of the traffic and spills the
/// rest to the next. The sidecars balance by it, and the control plane
/// judges by it whether a standby priority keeps a cluster out of panic in
/// what it sends proxyless clients, so both agree.
pub const DEFAULT_OVERPROVISIONING: u32 = 140;

/// What a check probes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// GET this URI; 2xx passes.
    Http(http::Uri),
    /// Connect to `host:port`; an established connection passes.
    Tcp(String),
    /// `grpc.health.v1.Health/Check` on `endpoint` (`http://host:port`)
    /// for `service` (empty: the whole server); SERVING passes.
    Grpc { endpoint: String, service: String },
}

/// Why a probe failed, or a target could not be parsed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "invalid check target {0:?}: expected http://HOST:PORT/PATH, tcp://HOST:PORT or grpc://HOST:PORT[/SERVICE]"
    )]
    InvalidTarget(String),
    #[error("connect {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("http: {0}")]
    Http(String),
    #[error("http status {0}")]
    Status(u16),
    #[error("timed out after {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("grpc status {0}")]
    GrpcStatus(&'static str),
    #[error("grpc: {0}")]
    Grpc(String),
}

// === impl ProbeError ===

impl ProbeError {
    /// A stable, low-cardinality name for the failure, for metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            ProbeError::InvalidTarget(_) => "invalid_target",
            ProbeError::Connect { .. } => "connect",
            ProbeError::Http(_) => "http",
            ProbeError::Status(_) => "status",
            ProbeError::Timeout(_) => "timeout",
            ProbeError::GrpcStatus(_) => "grpc_status",
            ProbeError::Grpc(_) => "grpc",
        }
    }

    fn connect(addr: &str, error: &io::Error) -> Self {
        ProbeError::Connect {
            addr: addr.to_owned(),
            reason: io_reason(error),
        }
    }
}

/// A short lowercase reason for common socket errors, else the OS text.
fn io_reason(error: &io::Error) -> String {
    let reason = match error.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused",
        io::ErrorKind::ConnectionReset => "connection reset",
        io::ErrorKind::TimedOut => "timed out",
        io::ErrorKind::HostUnreachable => "host unreachable",
        io::ErrorKind::NetworkUnreachable => "network unreachable",
        io::ErrorKind::AddrNotAvailable => "address not available",
        _ => return error.to_string(),
    };
    reason.to_owned()
}

// === impl Target ===

/// Parses `HOST:PORT` where the port is required.
fn host_port(s: &str) -> Option<Authority> {
    let authority: Authority = s.parse().ok()?;
    let ok = !authority.host().is_empty()
        && authority.port_u16().is_some_and(|p| p != 0)
        && !s.contains('@');
    ok.then_some(authority)
}

impl FromStr for Target {
    type Err = ProbeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || ProbeError::InvalidTarget(s.to_owned());
        if s.starts_with("http://") {
            let uri: http::Uri = s.parse().map_err(|_| invalid())?;
            match uri.authority() {
                Some(a) if !a.host().is_empty() && uri.port_u16() != Some(0) => {
                    Ok(Target::Http(uri))
                }
                _ => Err(invalid()),
            }
        } else if let Some(rest) = s.strip_prefix("tcp://") {
            let authority = host_port(rest).ok_or_else(invalid)?;
            Ok(Target::Tcp(authority.to_string()))
        } else if let Some(rest) = s.strip_prefix("grpc://") {
            let (authority, service) = rest.split_once('/').unwrap_or((rest, ""));
            let authority = host_port(authority).ok_or_else(invalid)?;
            Ok(Target::Grpc {
                endpoint: format!("http://{authority}"),
                service: service.to_owned(),
            })
        } else {
            Err(invalid())
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Http(uri) => write!(f, "{uri}"),
            Target::Tcp(addr) => write!(f, "tcp://{addr}"),
            Target::Grpc { endpoint, service } => {
                let authority = endpoint.strip_prefix("http://").unwrap_or(endpoint);
                if service.is_empty() {
                    write!(f, "grpc://{authority}")
                } else {
                    write!(f, "grpc://{authority}/{service}")
                }
            }
        }
    }
}

// === probes ===

/// Probes `target` once; `Ok(())` means it passed.
pub async fn probe(target: &Target, timeout: Duration) -> Result<(), ProbeError> {
    let attempt = async {
        match target {
            Target::Http(uri) => probe_http(uri).await,
            Target::Tcp(addr) => probe_tcp(addr).await,
            Target::Grpc { endpoint, service } => probe_grpc(endpoint, service, timeout).await,
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| ProbeError::Timeout(timeout))?
}

async fn probe_tcp(addr: &str) -> Result<(), ProbeError> {
    TcpStream::connect(addr)
        .await
        .map(drop)
        .map_err(|e| ProbeError::connect(addr, &e))
}

async fn probe_http(uri: &http::Uri) -> Result<(), ProbeError> {
    let authority = uri
        .authority()
        .ok_or_else(|| ProbeError::InvalidTarget(uri.to_string()))?;
    let addr = format!("{}:{}", authority.host(), uri.port_u16().unwrap_or(80));
    let stream = TcpStream::connect(&addr)
        .await
        .map_err(|e| ProbeError::connect(&addr, &e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ProbeError::Http(e.to_string()))?;
    // The connection task ends when the response is done (Connection: close)
    // or when the probe is dropped on timeout, which drops the sender.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let request = http::Request::get(path)
        .header(http::header::HOST, authority.as_str())
        .header(http::header::CONNECTION, "close")
        .header(http::header::USER_AGENT, "isdp-probe")
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| ProbeError::Http(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| ProbeError::Http(e.to_string()))?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(ProbeError::Status(status.as_u16()))
    }
}

async fn probe_grpc(endpoint: &str, service: &str, timeout: Duration) -> Result<(), ProbeError> {
    let authority = endpoint.strip_prefix("http://").unwrap_or(endpoint);
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())
        .map_err(|_| ProbeError::InvalidTarget(endpoint.to_owned()))?
        .connect_timeout(timeout)
        .connect()
        .await
        .map_err(|e| match find_io_error(&e) {
            Some(io) => ProbeError::connect(authority, io),
            None => ProbeError::Grpc(e.to_string()),
        })?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map_err(|status| ProbeError::Grpc(format!("{:?}: {}", status.code(), status.message())))?;
    let status =
        ServingStatus::try_from(response.into_inner().status).unwrap_or(ServingStatus::Unknown);
    if status == ServingStatus::Serving {
        Ok(())
    } else {
        Err(ProbeError::GrpcStatus(status.as_str_name()))
    }
}

/// The first `io::Error` in an error's source chain.
fn find_io_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a io::Error> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return Some(io);
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests;
