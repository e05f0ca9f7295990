//! The control plane under test, and `isdpctl` helpers.

use std::process::Output;
use std::time::Duration;

use tempfile::TempDir;

use crate::bins::binary;
use crate::process::{Process, tempdir};

/// How long one `isdpctl` call may take before the test fails.
const CTL_TIMEOUT: Duration = Duration::from_secs(20);

/// Options for [`ControlPlane::start`]; `None` keeps the binary's default.
#[derive(Debug, Clone, Default)]
pub struct ControlPlaneOpts {
    /// `--session-grace`: how long a sidecar stream may be gone before its
    /// instances turn unhealthy.
    pub session_grace: Option<Duration>,
    /// `--session-timeout`: how long before they are removed.
    pub session_timeout: Option<Duration>,
    /// Any further flags.
    pub extra_args: Vec<String>,
}

/// A running `isdp-control-plane` with its own data dir.
pub struct ControlPlane {
    /// `None` between [`ControlPlane::kill9`] and [`ControlPlane::restart`].
    proc: Option<Process>,
    opts: ControlPlaneOpts,
    data: TempDir,
    grpc: String,
    admin: String,
}

// === impl ControlPlane ===

impl ControlPlane {
    /// Starts a control plane on ephemeral loopback ports with a fresh data dir.
    pub async fn start(opts: ControlPlaneOpts) -> Self {
        let data = tempdir("cp-data");
        let args = args(&opts, &data, "127.0.0.1:0", "127.0.0.1:0");
        let proc =
            Process::spawn("control-plane", "isdp-control-plane", &args, tempdir("cp")).await;
        let grpc = proc.addr("grpc").to_owned();
        let admin = proc.addr("admin").to_owned();
        Self {
            proc: Some(proc),
            opts,
            data,
            grpc,
            admin,
        }
    }

    /// `http://ADDR` of the gRPC (registry, session, xDS) listener.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub fn grpc_addr(&self) -> &str {
        &self.grpc
    }

    /// `http://ADDR` of the admin HTTP listener.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    pub fn admin_addr(&self) -> &str {
        &self.admin
    }

    /// SIGKILL: no chance to flush or say goodbye, as in a crash.
    pub async fn kill9(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            p.kill9().await;
        }
    }

    /// Starts the control plane again on the same data dir and the same
    /// ports (sidecars reconnect to the address they know). Kills the running
    /// one first if there is one. Retries for a while in case the old
    /// process's ports are not released yet.
    pub async fn restart(&mut self) {
        self.kill9().await;
        self.proc = None;
        let args = args(&self.opts, &self.data, &self.grpc, &self.admin);
        let mut last = None;
        for _ in 0..25 {
            match Process::try_spawn("control-plane", "isdp-control-plane", &args, tempdir("cp"))
                .await
            {
                Ok(p) => {
                    assert_eq!(
                        p.addr("grpc"),
                        self.grpc,
                        "restart bound another gRPC address"
                    );
                    self.proc = Some(p);
                    return;
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "restarting the control plane failed: {:#}",
            last.expect("tried")
        );
    }

    /// The running process; panics between `kill9` and `restart`.
    pub fn process(&mut self) -> &mut Process {
        self.proc.as_mut().expect("control plane is not running")
    }

    /// Runs `isdpctl --control-plane <this> ARGS`.
    pub async fn ctl(&self, args: &[&str]) -> Output {
        isdpctl(&self.grpc_url(), args).await
    }

    /// Runs `isdpctl` and returns its stdout; panics with stderr on failure.
    pub async fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args).await;
        assert!(
            out.status.success(),
            "isdpctl {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("isdpctl stdout is UTF-8")
    }

    /// `isdpctl -o json instances SERVICE` as a list; an error if the call
    /// fails (so it can be polled while the control plane restarts).
    pub async fn instances(&self, service: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let out = self.ctl(&["-o", "json", "instances", service]).await;
        anyhow::ensure!(
            out.status.success(),
            "isdpctl instances {service} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// `isdpctl -o json services` as raw JSON.
    pub async fn services(&self) -> serde_json::Value {
        let out = self.ctl_ok(&["-o", "json", "services"]).await;
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("services JSON: {e}: {out}"))
    }

    /// Registers an instance with `isdpctl register` and returns its id.
    pub async fn register(&self, service: &str, addr: &str, port: u16, extra: &[&str]) -> String {
        let port = port.to_string();
        let mut args = vec![
            "register",
            "--service",
            service,
            "--address",
            addr,
            "--port",
            &port,
        ];
        args.extend_from_slice(extra);
        let out = self.ctl_ok(&args).await;
        let id = out.trim();
        assert!(!id.is_empty(), "isdpctl register printed no id");
        id.to_owned()
    }
}

fn args(opts: &ControlPlaneOpts, data: &TempDir, grpc: &str, admin: &str) -> Vec<String> {
    let mut args = vec![
        "--listen".to_owned(),
        grpc.to_owned(),
        "--admin-listen".to_owned(),
        admin.to_owned(),
        "--data-dir".to_owned(),
        data.path().display().to_string(),
    ];
    if let Some(d) = opts.session_grace {
        args.extend(["--session-grace".to_owned(), format!("{}ms", d.as_millis())]);
    }
    if let Some(d) = opts.session_timeout {
        args.extend([
            "--session-timeout".to_owned(),
            format!("{}ms", d.as_millis()),
        ]);
    }
    args.extend(opts.extra_args.iter().cloned());
    args
}

/// Runs `isdpctl --control-plane URL ARGS` and returns its output. Panics
/// only if it cannot be run or hangs; the exit status is the caller's to check.
pub async fn isdpctl(control_plane_url: &str, args: &[&str]) -> Output {
    let run = tokio::process::Command::new(binary("isdpctl"))
        .arg("--control-plane")
        .arg(control_plane_url)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(CTL_TIMEOUT, run).await {
        Ok(out) => out.expect("running isdpctl"),
        Err(_) => panic!("isdpctl {args:?} did not finish within {CTL_TIMEOUT:?}"),
    }
}
