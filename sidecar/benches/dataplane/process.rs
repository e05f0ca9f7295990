//! The servers under test as child processes: started pinned to a core,
//! killed when dropped, and read from `/proc` for CPU time and peak memory.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How long a server may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running server, SIGKILLed when dropped so a failed bench leaves
/// nothing behind.
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

// === impl Proc ===

impl Proc {
    /// Starts `bin args` under `taskset -c core`, with stderr (and stdout,
    /// unless `listening_line`) going to `<dir>/<name>.log`. The pin is set
    /// before `bin` runs, because a runtime (tokio, haproxy's threads) sizes
    /// its thread pool from the affinity it starts with: pinning afterwards
    /// would leave several workers fighting over one core.
    pub fn spawn(
        name: &str,
        core: usize,
        bin: &Path,
        args: &[String],
        envs: &[(&str, &str)],
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let stderr =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new("taskset")
            .arg("-c")
            .arg(core.to_string())
            .arg(bin)
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("spawning taskset -c {core} {} {args:?}", bin.display()))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log,
        })
    }

    /// Waits for the `... listening: key=ADDR ...` line the ISDP binaries
    /// print once bound (port 0), and returns its `key -> ADDR` pairs.
    pub fn listening_line(&mut self) -> anyhow::Result<HashMap<String, String>> {
        let stdout = self.child.stdout.take().context("stdout not piped")?;
        let (tx, rx) = mpsc::channel();
        // The reader keeps draining stdout after the line, so the child
        // never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if !sent && let Some((_, rest)) = line.split_once("listening:") {
                    let _ = tx.send(parse_addrs(rest));
                    sent = true;
                }
            }
        });
        rx.recv_timeout(START_TIMEOUT).map_err(|_| {
            anyhow::anyhow!(
                "{} printed no `listening:` line within {START_TIMEOUT:?}; log {}:\n{}",
                self.name,
                self.log.display(),
                self.log_text()
            )
        })
    }

    /// Waits until `addr` accepts connections, for servers that print
    /// nothing (nginx, haproxy); fails at once if the process exits.
    pub fn wait_port(&mut self, addr: SocketAddr) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before listening on {addr}; log {}:\n{}",
                    self.name,
                    self.log.display(),
                    self.log_text()
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} is not listening on {addr} after {START_TIMEOUT:?}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// User plus system CPU time so far, from `/proc/PID/stat`.
    pub fn cpu_seconds(&self, clock_ticks: f64) -> anyhow::Result<f64> {
        let path = format!("/proc/{}/stat", self.child.id());
        let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        Ok(cpu_ticks(&stat).with_context(|| format!("parsing {path}"))? as f64 / clock_ticks)
    }

    /// Peak resident set size so far (`VmHWM`), in KiB.
    pub fn peak_rss_kib(&self) -> anyhow::Result<u64> {
        let path = format!("/proc/{}/status", self.child.id());
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no VmHWM in {path}"))
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_else(|e| format!("<unreadable: {e}>"))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `utime + stime` in clock ticks from a `/proc/PID/stat` line. Fields are
/// counted after the last `)`, since the command name may hold spaces.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    // `rest` starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Parses `k=v k=v` from a listening line.
fn parse_addrs(rest: &str) -> HashMap<String, String> {
    rest.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_end_matches(',').to_owned()))
        .collect()
}

/// The kernel's clock ticks per second, the unit of `/proc/PID/stat` times.
pub fn clock_ticks() -> anyhow::Result<f64> {
    let out = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .context("running `getconf CLK_TCK`")?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("`getconf CLK_TCK` printed no number")
}

/// A loopback port that was free a moment ago, for servers that cannot
/// report a port-0 bind (nginx, haproxy). Racy, which is fine on a bench box.
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Runs a bench in a fresh temp dir named `isdp-<name>-...`, kept (and
/// named on stderr) if the bench fails: the servers' logs and configs are
/// what explains a failure.
pub fn in_temp_dir(
    name: &str,
    run: impl FnOnce(&std::path::Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("isdp-{name}-"))
        .tempdir()
        .context("creating the bench's temp dir")?;
    let result = run(dir.path());
    if result.is_err() {
        eprintln!("logs and configs kept in {}", dir.keep().display());
    }
    result
}
