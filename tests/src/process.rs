//! One child process of the sandbox.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::bins::binary;

/// How long a binary may take to print its listening line. Generous: on a
/// loaded 2-core CI machine several binaries start at once.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a process may take to exit after SIGTERM.
const TERM_TIMEOUT: Duration = Duration::from_secs(10);

/// A running binary, killed (SIGKILL) when dropped.
pub struct Process {
    name: String,
    child: Child,
    pid: u32,
    /// Holds the logs (and whatever else the owner put there).
    dir: Option<TempDir>,
    log: PathBuf,
    addrs: HashMap<String, String>,
}

/// A temp dir named after the process, so kept dirs are easy to tell apart.
/// Private (0700), as the control plane wants its data dir.
pub fn tempdir(name: &str) -> TempDir {
    use std::os::unix::fs::PermissionsExt as _;
    tempfile::Builder::new()
        .prefix(&format!("isdp-{name}-"))
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()
        .expect("creating a temp dir")
}

// === impl Process ===

impl Process {
    /// Starts binary `bin` with `args`, its stderr logged to
    /// `<dir>/<name>.log`, and waits for its `listening:` line. Panics with
    /// the process's stderr if it exits first or never prints it.
    pub async fn spawn(name: &str, bin: &str, args: &[String], dir: TempDir) -> Self {
        match Self::try_spawn(name, bin, args, dir).await {
            Ok(p) => p,
            Err(e) => panic!("{e:#}"),
        }
    }

    /// Like [`Process::spawn`] but returns the failure, for callers that
    /// retry (a restart whose port is not free yet).
    pub async fn try_spawn(
        name: &str,
        bin: &str,
        args: &[String],
        dir: TempDir,
    ) -> anyhow::Result<Self> {
        Self::try_spawn_in(None, name, bin, args, dir).await
    }

    /// As [`Process::spawn`], inside network namespace `netns` (`ip netns
    /// exec`, which execs the binary: the pid is the binary's own).
    pub async fn spawn_in(
        netns: &str,
        name: &str,
        bin: &str,
        args: &[String],
        dir: TempDir,
    ) -> Self {
        match Self::try_spawn_in(Some(netns), name, bin, args, dir).await {
            Ok(p) => p,
            Err(e) => panic!("{e:#}"),
        }
    }

    async fn try_spawn_in(
        netns: Option<&str>,
        name: &str,
        bin: &str,
        args: &[String],
        dir: TempDir,
    ) -> anyhow::Result<Self> {
        let log = unique_log(dir.path(), name);
        let stderr = std::fs::File::create(&log)?;
        let mut cmd = match netns {
            None => Command::new(binary(bin)),
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(binary(bin));
                cmd
            }
        };
        let mut child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {bin} {args:?}"))?;
        let pid = child.id().context("child has no pid")?;
        let stdout = child.stdout.take().context("child stdout not piped")?;
        let mut lines = BufReader::new(stdout).lines();

        let found = tokio::time::timeout(START_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if let Some((_, rest)) = line.split_once("listening:") {
                    return Ok(Some(parse_addrs(rest)));
                }
            }
            Ok::<_, std::io::Error>(None)
        })
        .await;
        let addrs = match found {
            Ok(Ok(Some(addrs))) => addrs,
            Ok(Ok(None)) | Ok(Err(_)) => {
                let status = match tokio::time::timeout(Duration::from_secs(5), child.wait()).await
                {
                    Ok(Ok(s)) => s.to_string(),
                    _ => "stdout closed, still running".to_owned(),
                };
                // Keep the dir: the message points at the log inside it.
                let _ = dir.keep();
                bail!(
                    "{name} ({bin} {args:?}) exited ({status}) before printing its \
                     `listening:` line; stderr ({}):\n{}",
                    log.display(),
                    read_log(&log)
                );
            }
            Err(_) => {
                let _ = child.start_kill();
                let _ = dir.keep();
                bail!(
                    "{name} ({bin} {args:?}) printed no `listening:` line within \
                     {START_TIMEOUT:?}; stderr ({}):\n{}",
                    log.display(),
                    read_log(&log)
                );
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

        Ok(Self {
            name: name.to_owned(),
            child,
            pid,
            dir: Some(dir),
            log,
            addrs,
        })
    }

    /// The address printed as `key=ADDR` in the listening line.
    pub fn addr(&self, key: &str) -> &str {
        self.addrs.get(key).unwrap_or_else(|| {
            panic!(
                "{} printed no `{key}=` address (got {:?})",
                self.name, self.addrs
            )
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The temp dir this process's logs live in.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("dir present until drop").path()
    }

    /// SIGKILL, and wait until it is reaped so its ports are free.
    pub async fn kill9(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// Sends SIGTERM (via `kill -TERM`, as the crate forbids unsafe libc
    /// calls) without waiting, so a test can time what happens meanwhile.
    pub async fn send_term(&self) {
        let sent = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await
            .expect("running `kill -TERM`");
        assert!(sent.success(), "kill -TERM {} failed", self.pid);
    }

    /// Waits for the process to exit; panics if it has not within
    /// [`TERM_TIMEOUT`].
    pub async fn wait_exit(&mut self) -> ExitStatus {
        match tokio::time::timeout(TERM_TIMEOUT, self.child.wait()).await {
            Ok(status) => status.expect("waiting for child"),
            Err(_) => panic!(
                "{} did not exit within {TERM_TIMEOUT:?}; stderr: {}",
                self.name,
                self.log.display()
            ),
        }
    }

    /// SIGTERM and wait for the exit.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.send_term().await;
        self.wait_exit().await
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The stderr log so far, for assertion messages.
    pub fn stderr(&self) -> String {
        read_log(&self.log)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let keep = std::thread::panicking() || std::env::var_os("ISDP_KEEP_LOGS").is_some();
        if keep && let Some(dir) = self.dir.take() {
            let path = dir.keep();
            eprintln!(
                "[isdp-tests] {} log kept: {}",
                self.name,
                self.log.display()
            );
            let _ = path;
        }
    }
}

/// Parses `k=v k=v` from a listening line.
fn parse_addrs(rest: &str) -> HashMap<String, String> {
    rest.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_end_matches(',').to_owned()))
        .collect()
}

/// `<dir>/<name>.log`, or `<name>.N.log` if a restart already used that.
fn unique_log(dir: &Path, name: &str) -> PathBuf {
    let first = dir.join(format!("{name}.log"));
    if !first.exists() {
        return first;
    }
    (2..)
        .map(|n| dir.join(format!("{name}.{n}.log")))
        .find(|p| !p.exists())
        .expect("an unused log name")
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("<unreadable: {e}>"))
}
