//! The demo backends: `echo-http` instances tests register, kill and make
//! fail, and the `echo-grpc` / `echo-tcp` backends.

use std::time::Duration;

use crate::http;
use crate::process::{Process, tempdir};

/// A running `echo-http`.
pub struct EchoHttp {
    id: String,
    addr: String,
    /// `None` after [`EchoHttp::kill9`], until [`EchoHttp::restart`].
    proc: Option<Process>,
}

// === impl EchoHttp ===

impl EchoHttp {
    /// Starts `echo-http --id ID` on an ephemeral loopback port.
    pub async fn start(id: &str) -> Self {
        let proc = spawn(id, "127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        let addr = proc.addr("http").to_owned();
        Self {
            id: id.to_owned(),
            addr,
            proc: Some(proc),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .expect("echo address has a port")
    }

    /// `http://ADDR/healthz`, the check target to register.
    pub fn health_url(&self) -> String {
        format!("http://{}/healthz", self.addr)
    }

    /// Makes `/healthz` answer 503 from now on.
    pub async fn fail_health(&self) {
        let r = http::post(&self.addr, "/admin/health/fail")
            .await
            .expect("POST fail");
        assert_eq!(r.status, 200, "POST /admin/health/fail: {}", r.body);
    }

    /// Makes `/healthz` answer 200 again.
    pub async fn pass_health(&self) {
        let r = http::post(&self.addr, "/admin/health/pass")
            .await
            .expect("POST pass");
        assert_eq!(r.status, 200, "POST /admin/health/pass: {}", r.body);
    }

    /// SIGKILL: the instance vanishes and its port refuses connections.
    pub async fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9().await;
        }
    }

    /// Starts it again on the same address, retrying briefly in case the
    /// port is not released yet.
    pub async fn restart(&mut self) {
        self.kill9().await;
        let mut last = None;
        for _ in 0..25 {
            match spawn(&self.id, &self.addr).await {
                Ok(p) => {
                    self.proc = Some(p);
                    return;
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "restarting echo-http {} failed: {:#}",
            self.id,
            last.expect("tried")
        );
    }
}

async fn spawn(id: &str, listen: &str) -> anyhow::Result<Process> {
    let args = vec![
        "--listen".to_owned(),
        listen.to_owned(),
        "--id".to_owned(),
        id.to_owned(),
    ];
    Process::try_spawn(&format!("echo-{id}"), "echo-http", &args, tempdir("echo")).await
}

/// A backend with nothing to toggle: `echo-grpc` or `echo-tcp`.
pub struct Backend {
    id: String,
    addr: String,
    proc: Process,
}

/// A running `echo-grpc` (Echo service plus `grpc.health.v1`).
pub struct EchoGrpc(Backend);

/// A running `echo-tcp` (id line, then echo until EOF, then half-close).
pub struct EchoTcp(Backend);

// === impl Backend ===

impl Backend {
    async fn start(bin: &str, key: &str, id: &str) -> Self {
        let args = vec![
            "--listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--id".to_owned(),
            id.to_owned(),
        ];
        let proc = Process::spawn(&format!("{bin}-{id}"), bin, &args, tempdir(bin)).await;
        let addr = proc.addr(key).to_owned();
        Self {
            id: id.to_owned(),
            addr,
            proc,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .expect("backend address has a port")
    }

    /// SIGKILL: the backend vanishes and its port refuses connections.
    pub async fn kill9(&mut self) {
        self.proc.kill9().await;
    }
}

// === impl EchoGrpc ===

impl EchoGrpc {
    /// Starts `echo-grpc --id ID` on an ephemeral loopback port.
    pub async fn start(id: &str) -> Self {
        Self(Backend::start("echo-grpc", "grpc", id).await)
    }

    /// `grpc://ADDR`, the check target to register.
    pub fn health_target(&self) -> String {
        format!("grpc://{}", self.addr)
    }
}

impl std::ops::Deref for EchoGrpc {
    type Target = Backend;
    fn deref(&self) -> &Backend {
        &self.0
    }
}

impl std::ops::DerefMut for EchoGrpc {
    fn deref_mut(&mut self) -> &mut Backend {
        &mut self.0
    }
}

// === impl EchoTcp ===

impl EchoTcp {
    /// Starts `echo-tcp --id ID` on an ephemeral loopback port.
    pub async fn start(id: &str) -> Self {
        Self(Backend::start("echo-tcp", "tcp", id).await)
    }

    /// `tcp://ADDR`, the check target to register.
    pub fn health_target(&self) -> String {
        format!("tcp://{}", self.addr)
    }
}

impl std::ops::Deref for EchoTcp {
    type Target = Backend;
    fn deref(&self) -> &Backend {
        &self.0
    }
}

impl std::ops::DerefMut for EchoTcp {
    fn deref_mut(&mut self) -> &mut Backend {
        &mut self.0
    }
}
