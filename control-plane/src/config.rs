//! Command-line flags of `isdp-control-plane`; each is also an `ISDP_*`
//! environment variable.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "isdp-control-plane",
    version,
    about = "ISDP control plane: registry, health checks and xDS server"
)]
pub struct Config {
    /// gRPC listener for operators, sidecars and xDS. Port 0 picks a free port.
    #[arg(long, env = "ISDP_LISTEN", default_value = "127.0.0.1:15010")]
    pub listen: SocketAddr,

    /// Admin HTTP listener: /healthz, /ready, /metrics.
    #[arg(long, env = "ISDP_ADMIN_LISTEN", default_value = "127.0.0.1:15014")]
    pub admin_listen: SocketAddr,

    /// Where the embedded store keeps its file.
    #[arg(long, env = "ISDP_DATA_DIR", default_value = "./isdp-data")]
    pub data_dir: PathBuf,

    /// How long a sidecar's session stream may be gone before its instances
    /// are marked unhealthy. Covers a sidecar restart or a short partition.
    #[arg(long, env = "ISDP_SESSION_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub session_grace: Duration,

    /// How long a sidecar's session may be gone before its instances are
    /// removed. Must be longer than the grace period.
    #[arg(long, env = "ISDP_SESSION_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub session_timeout: Duration,

    /// Log format: text (for people) or json (for log pipelines). Levels
    /// come from RUST_LOG (default: info).
    #[arg(long, env = "ISDP_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    #[command(flatten)]
    pub trace: isdp_sidecar::telemetry::TraceArgs,
}

impl Config {
    pub fn validate(&self) -> Result<(), String> {
        if self.session_timeout <= self.session_grace {
            return Err(format!(
                "--session-timeout ({}) must be longer than --session-grace ({})",
                humantime::format_duration(self.session_timeout),
                humantime::format_duration(self.session_grace)
            ));
        }
        if self.session_grace.is_zero() {
            return Err("--session-grace must be more than zero".into());
        }
        Ok(())
    }
}
