//! Demo services for ISDP and the quickstart launcher.
//!
//! # Layout
//! - `bin/echo-http.rs`: HTTP echo backend (JSON echo, health toggle, byte
//!   sink and source, slow responses, WebSocket echo).
//! - `bin/echo-grpc.rs`: gRPC echo backend with `grpc.health.v1`.
//! - `bin/echo-tcp.rs`: TCP echo backend that announces its id first.
//! - `bin/isdp-demo.rs`: the quickstart launcher.
//! - this file: [`proto`], the generated `isdp.examples.echo.v1` code, shared
//!   by `echo-grpc` and by clients such as the end-to-end tests.

/// `isdp.examples.echo.v1`: the `Echo` service, client and server.
pub mod proto {
    tonic::include_proto!("isdp.examples.echo.v1");
}

/// Resolves on Ctrl-C or SIGTERM, so a launcher's SIGTERM ends a demo
/// service cleanly.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}

/// Prints the `NAME listening: KEY=ADDR` line launchers and the test
/// harness wait for, flushed so they see it before the first request.
pub fn announce(name: &str, key: &str, addr: std::net::SocketAddr) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{name} listening: {key}={addr}")?;
    out.flush()
}

/// `<hostname>-<port>`, the default instance id.
pub fn default_id(port: u16) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}-{port}")
}
