//! The demo's child processes: spawn with logs to files, wait until each
//! listens, and stop them all with SIGTERM first so sidecars can close their
//! sessions (deregistering their instances) before anything is killed.

use std::fs::File;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// How long a child may take to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long a child may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);

struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    /// Set once we noticed it exited, so the notice is printed only once.
    exited: Option<ExitStatus>,
}

/// Every process the demo started, in start order.
pub struct Children {
    bin_dir: PathBuf,
    logs: PathBuf,
    procs: Vec<Proc>,
}

// === impl Children ===

impl Children {
    pub fn new(bin_dir: PathBuf, logs: PathBuf) -> Self {
        Self {
            bin_dir,
            logs,
            procs: Vec::new(),
        }
    }

    /// Starts `bin` with stdout and stderr appended to `<logs>/<name>.log`.
    /// `kill_on_drop` is the backstop should the demo itself fail.
    pub fn spawn(&mut self, name: &str, bin: &str, args: &[&str]) -> anyhow::Result<()> {
        let log = self.logs.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new(self.bin_dir.join(bin))
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {bin} for {name}"))?;
        self.procs.push(Proc {
            name: name.to_owned(),
            child,
            log,
            exited: None,
        });
        Ok(())
    }

    /// Waits until `addr` accepts TCP connections, failing early (with the
    /// tail of its log) if the process exits first.
    pub async fn wait_listening(&mut self, name: &str, addr: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let p = self
                .procs
                .iter_mut()
                .find(|p| p.name == name)
                .with_context(|| format!("no process named {name}"))?;
            if let Some(status) = p.child.try_wait()? {
                bail!(
                    "{name} exited ({status}) before listening on {addr}; its log {}:\n{}",
                    p.log.display(),
                    log_tail(&p.log)
                );
            }
            if TcpStream::connect(addr).await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{name} did not listen on {addr} within {START_TIMEOUT:?}; see {}",
                    p.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs until Ctrl-C, SIGTERM or `exit_after`, reporting children that
    /// exit on their own meanwhile. Returns why it stopped.
    pub async fn run_until_stopped(&mut self, exit_after: Option<Duration>) -> &'static str {
        let deadline = exit_after.map(|d| tokio::time::Instant::now() + d);
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return "Ctrl-C",
                _ = async { term.as_mut()?.recv().await }, if term.is_some() => return "SIGTERM",
                _ = async { tokio::time::sleep_until(deadline?).await; Some(()) }, if deadline.is_some() => {
                    return "--exit-after elapsed";
                }
                _ = tick.tick() => self.report_exits(),
            }
        }
    }

    fn report_exits(&mut self) {
        for p in &mut self.procs {
            if p.exited.is_some() {
                continue;
            }
            if let Ok(Some(status)) = p.child.try_wait() {
                p.exited = Some(status);
                eprintln!("{} exited ({status}); log: {}", p.name, p.log.display());
            }
        }
    }

    /// SIGTERMs every child, newest first (sidecars before the control plane
    /// they deregister from), waits up to [`STOP_GRACE`], then kills the rest.
    pub async fn stop_all(&mut self) {
        for p in self.procs.iter_mut().rev() {
            if let (None, Some(pid)) = (p.exited, p.child.id()) {
                // `kill -TERM` avoids unsafe libc calls (the crate forbids them).
                let _ = Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .stderr(Stdio::null())
                    .status()
                    .await;
            }
        }
        let deadline = tokio::time::Instant::now() + STOP_GRACE;
        for p in self.procs.iter_mut().rev() {
            match tokio::time::timeout_at(deadline, p.child.wait()).await {
                Ok(_) => {}
                Err(_) => {
                    eprintln!("{} did not stop within {STOP_GRACE:?}; killing it", p.name);
                    let _ = p.child.kill().await;
                }
            }
        }
        self.procs.clear();
    }
}

/// Polls `GET path` on `addr` until it answers 2xx or `timeout` passes.
pub async fn wait_http_ok(addr: &str, path: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if http_status(addr, path)
            .await
            .is_some_and(|s| (200..300).contains(&s))
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// A minimal HTTP/1.0 GET returning the status code; enough for a readiness
/// probe without an HTTP client dependency.
async fn http_status(addr: &str, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let head = String::from_utf8_lossy(&buf);
    head.split_whitespace().nth(1)?.parse().ok()
}

/// The last lines of a log, minus backtrace frames (with RUST_BACKTRACE set
/// they would push the actual error out of view).
fn log_tail(path: &PathBuf) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let is_frame = |l: &str| {
        let t = l.trim_start();
        t.starts_with("at ")
            || t.split_once(": ")
                .is_some_and(|(n, _)| n.parse::<u32>().is_ok())
    };
    let lines: Vec<&str> = text.lines().filter(|l| !is_frame(l)).collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
