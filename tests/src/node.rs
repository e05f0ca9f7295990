//! The Node proxyless gRPC client: `tests/node/client.js`, which dials
//! `xds:///<service>` with `@grpc/grpc-js-xds` and counts which instance
//! answered each call, run as a child process.
//!
//! grpc-js can authenticate to no xDS server (its channel credentials are
//! `insecure` and `google_default` only), so its bootstrap names a
//! sidecar's xDS relay ([`bootstrap`]). The client prints one JSON line
//! per report window and a summary at the end; [`NodeClient`] collects
//! them, stamped with when they arrived, so a test can time what the
//! client saw after an event.
//!
//! Node and `tests/node/node_modules` must be installed (`make
//! node-modules`; `.ci/test.sh` does it): without them a test fails with
//! the command that fixes it, never skips.
//!
//! # Layout
//! - this file: [`NodeClient`] (running it, waiting on its windows),
//!   [`NodeRun`] (its flags), [`bootstrap`].
//! - `output`: [`Counts`] and [`Window`], read from its JSON lines.

mod output;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::io::BufReader;
use tokio::process::{Child, Command};

pub use self::output::{Counts, Window};
use self::output::{Printed, read_lines};
use crate::process::tempdir;

/// How often the waiting helpers look at the windows.
const POLL: Duration = Duration::from_millis(50);

/// How to install what the client needs, for failure messages.
const FIX: &str = "run `make node-modules` (it installs Debian's nodejs and npm with \
                   `.ci/deps.sh node` when missing, then `npm ci` in tests/node)";

/// A gRPC xDS bootstrap (gRFC A27) for a client of the relay at
/// `relay_addr` (`127.0.0.1:PORT`, or `unix:/PATH`): plaintext, as grpc-js
/// can only connect, and the `node.id` and `node.locality` grpc-js
/// requires.
pub fn bootstrap(relay_addr: &str, node_id: &str) -> serde_json::Value {
    serde_json::json!({
        "xds_servers": [{
            "server_uri": relay_addr,
            "channel_creds": [{"type": "insecure"}],
            "server_features": ["xds_v3"],
        }],
        "node": {"id": node_id, "locality": {}},
    })
}

/// What to run: `client.js` flags.
#[derive(Clone, Debug)]
pub struct NodeRun {
    /// `xds:///<service>`.
    pub target: String,
    pub concurrency: u32,
    /// Each call's deadline.
    pub deadline: Duration,
    /// xDS channel credentials (mTLS to instances behind a sidecar, with
    /// the bootstrap's certificate provider); otherwise plaintext to
    /// every instance.
    pub mtls: bool,
    /// With `mtls`, the SNI sent to sidecars instead of the target's
    /// bare name.
    pub server_name: Option<String>,
}

impl NodeRun {
    pub fn new(service: &str) -> Self {
        Self {
            target: format!("xds:///{service}"),
            concurrency: 4,
            deadline: Duration::from_secs(5),
            mtls: false,
            server_name: None,
        }
    }

    /// Applies the security the control plane sends (gRFC A29); grpc-js
    /// then sends the target's bare name as SNI.
    pub fn mtls(mut self) -> Self {
        self.mtls = true;
        self
    }

    /// With [`NodeRun::mtls`], sends `name` as SNI instead
    /// (`grpc.ssl_target_name_override`).
    pub fn server_name(mut self, name: &str) -> Self {
        self.server_name = Some(name.to_owned());
        self
    }

    pub fn concurrency(mut self, n: u32) -> Self {
        self.concurrency = n;
        self
    }

    fn args(&self) -> Vec<String> {
        let mut args = vec![
            "--target".into(),
            self.target.clone(),
            "--concurrency".into(),
            self.concurrency.to_string(),
            "--deadline-ms".into(),
            self.deadline.as_millis().to_string(),
        ];
        if self.mtls {
            args.extend(["--credentials".into(), "xds".into()]);
            if let Some(name) = &self.server_name {
                args.extend(["--server-name".into(), name.clone()]);
            }
        }
        args
    }
}

/// A running `node client.js`, killed when dropped.
pub struct NodeClient {
    child: Child,
    printed: Arc<Mutex<Printed>>,
    reader: Option<tokio::task::JoinHandle<()>>,
    log: PathBuf,
    /// Holds the bootstrap and the log.
    dir: Option<TempDir>,
}

// === impl NodeClient ===

impl NodeClient {
    /// Makes `calls` calls and returns the summary. Panics (with the
    /// client's stderr) if the client fails or takes over `timeout`.
    pub async fn calls(
        bootstrap: &serde_json::Value,
        run: &NodeRun,
        calls: u64,
        timeout: Duration,
    ) -> Counts {
        let mut args = run.args();
        args.extend(["--calls".into(), calls.to_string()]);
        let mut client = Self::spawn(bootstrap, &args);
        let status = match tokio::time::timeout(timeout, client.child.wait()).await {
            Ok(status) => status.expect("waiting for node"),
            Err(_) => panic!(
                "node client.js made no {calls} calls within {timeout:?}; stderr:\n{}",
                client.stderr()
            ),
        };
        client.finish_reading().await;
        assert!(
            status.success(),
            "node client.js failed ({status}); stderr:\n{}",
            client.stderr()
        );
        client.summary().unwrap_or_else(|| {
            panic!(
                "node client.js printed no summary; stderr:\n{}",
                client.stderr()
            )
        })
    }

    /// Starts a client that calls for `duration`, reporting every
    /// `report`; read its windows with [`NodeClient::windows_since`].
    pub fn start(
        bootstrap: &serde_json::Value,
        run: &NodeRun,
        duration: Duration,
        report: Duration,
    ) -> Self {
        let mut args = run.args();
        args.extend([
            "--duration-ms".into(),
            duration.as_millis().to_string(),
            "--report-ms".into(),
            report.as_millis().to_string(),
        ]);
        Self::spawn(bootstrap, &args)
    }

    fn spawn(bootstrap: &serde_json::Value, args: &[String]) -> Self {
        let (node, script) = installed();
        let dir = tempdir("node");
        let path = dir.path().join("bootstrap.json");
        std::fs::write(&path, bootstrap.to_string()).expect("writing the xDS bootstrap");
        let log = dir.path().join("node-client.log");
        let stderr = std::fs::File::create(&log).expect("creating the node client's log");
        let mut child = Command::new(node)
            .arg(&script)
            .args(args)
            .env("GRPC_XDS_BOOTSTRAP", &path)
            .env_remove("GRPC_XDS_BOOTSTRAP_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning node {}: {e}; {FIX}", script.display()));
        let stdout = child.stdout.take().expect("node stdout piped");
        let printed = Arc::new(Mutex::new(Printed::default()));
        let reader = tokio::spawn(read_lines(BufReader::new(stdout), printed.clone()));
        Self {
            child,
            printed,
            reader: Some(reader),
            log,
            dir: Some(dir),
        }
    }

    /// How many windows have arrived: pass it to
    /// [`NodeClient::windows_since`] to see only what came after.
    pub fn mark(&self) -> usize {
        self.printed().windows.len()
    }

    /// The windows that arrived after `mark`.
    pub fn windows_since(&self, mark: usize) -> Vec<Window> {
        let printed = self.printed();
        printed
            .windows
            .get(mark..)
            .map(<[Window]>::to_vec)
            .unwrap_or_default()
    }

    /// Waits until a window that arrives from now on passes `check`, and
    /// returns how long that took. Panics with `what`, the last failure and
    /// the windows seen after `timeout`, or if the client exits.
    pub async fn until_window(
        &mut self,
        timeout: Duration,
        what: &str,
        check: impl Fn(&Counts) -> anyhow::Result<()>,
    ) -> Duration {
        let start = Instant::now();
        let mark = self.mark();
        let mut seen = mark;
        let mut last = String::from("no window arrived");
        loop {
            for w in self.windows_since(seen) {
                seen += 1;
                match check(&w.counts) {
                    Ok(()) => return w.at.saturating_duration_since(start),
                    Err(e) => last = format!("{e:#}"),
                }
            }
            if let Err(e) = self.ensure_running() {
                panic!("waiting for {what}: {e:#}");
            }
            if start.elapsed() >= timeout {
                let windows: Vec<Counts> = self
                    .windows_since(mark)
                    .into_iter()
                    .map(|w| w.counts)
                    .collect();
                panic!(
                    "timed out after {timeout:?} waiting for {what}; last failure: {last}; \
                     windows: {windows:#?}"
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Checks that every window arriving during the next `duration` passes
    /// `check`, and that windows keep arriving (a client that stalled
    /// proves nothing); panics with `what` at the first failure.
    pub async fn every_window_for(
        &mut self,
        duration: Duration,
        what: &str,
        check: impl Fn(&Counts) -> anyhow::Result<()>,
    ) {
        let start = Instant::now();
        let mut seen = self.mark();
        let mut windows = 0;
        while start.elapsed() < duration {
            for w in self.windows_since(seen) {
                seen += 1;
                windows += 1;
                if let Err(e) = check(&w.counts) {
                    panic!(
                        "{what} stopped holding after {:?}: {e:#}; window: {:?}",
                        start.elapsed(),
                        w.counts
                    );
                }
            }
            if let Err(e) = self.ensure_running() {
                panic!("{what}: {e:#}");
            }
            tokio::time::sleep(POLL).await;
        }
        assert!(
            windows >= 2,
            "{what}: the client reported {windows} windows in {duration:?}; stderr:\n{}",
            self.stderr()
        );
    }

    /// The summary, once the client printed it.
    pub fn summary(&self) -> Option<Counts> {
        self.printed().summary.clone()
    }

    /// What the client printed; panics on a line it should not print.
    fn printed(&self) -> std::sync::MutexGuard<'_, Printed> {
        let printed = self.printed.lock().expect("node client output lock");
        if let Some(bad) = &printed.bad {
            panic!("node client.js: {bad}; stderr:\n{}", self.stderr());
        }
        printed
    }

    /// The client's stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_else(|e| format!("<unreadable: {e}>"))
    }

    /// Fails (with stderr) if the client has exited early.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => anyhow::bail!(
                "node client.js exited ({status}); stderr:\n{}",
                self.stderr()
            ),
        }
    }

    async fn finish_reading(&mut self) {
        if let Some(reader) = self.reader.take() {
            let _ = reader.await;
        }
    }
}

impl Drop for NodeClient {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let keep = std::thread::panicking() || std::env::var_os("ISDP_KEEP_LOGS").is_some();
        if keep && let Some(dir) = self.dir.take() {
            let _ = dir.keep();
            eprintln!("[isdp-tests] node client log kept: {}", self.log.display());
        }
    }
}

/// Panics, with the command that installs them, unless `node` and the
/// client's packages are there: tests call it before starting anything.
pub fn require() {
    installed();
}

/// `node` and `tests/node/client.js` with its `node_modules`; panics with
/// the command that installs them when something is missing.
fn installed() -> (PathBuf, PathBuf) {
    let node = PathBuf::from("node");
    let version = std::process::Command::new(&node)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("`{} --version` failed: {e}: {FIX}", node.display()));
    assert!(
        version.status.success(),
        "`{} --version` failed ({}): {FIX}",
        node.display(),
        version.status
    );
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("node");
    for package in ["@grpc/grpc-js", "@grpc/grpc-js-xds", "@grpc/proto-loader"] {
        let manifest = dir.join("node_modules").join(package).join("package.json");
        assert!(
            manifest.is_file(),
            "{} is missing: {FIX}",
            manifest.display()
        );
    }
    (node, dir.join("client.js"))
}
