//! The control plane under test, and `isdpctl` helpers.
//!
//! The control plane serves gRPC over TLS and wants a bearer token: after
//! start the harness reads `<data-dir>/ca.pem` and `<data-dir>/admin.token`
//! and remembers them by gRPC URL, so [`isdpctl`] and
//! [`crate::sidecar::SidecarToml`] given only a URL still authenticate.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Mutex;
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

/// What a client of one control plane needs.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub ca_file: PathBuf,
    pub admin_token: String,
}

/// Credentials by gRPC URL, for helpers that get only a URL.
static BY_URL: Mutex<Option<HashMap<String, Credentials>>> = Mutex::new(None);
/// Admin tokens by etcd flags: replicas sharing a store share the first
/// one's bootstrap token (only that replica writes `admin.token`).
static BY_STORE: Mutex<Option<HashMap<String, String>>> = Mutex::new(None);

/// The credentials recorded for a control-plane URL, if it is one the
/// harness started.
pub fn credentials_for(url: &str) -> Option<Credentials> {
    BY_URL.lock().ok()?.as_ref()?.get(url).cloned()
}

fn remember(url: &str, data: &Path, opts: &ControlPlaneOpts) -> Credentials {
    // Replicas of one mesh share the etcd prefix and the cluster's KEK
    // file (tests of one binary may reuse a prefix on another cluster,
    // whose KEK file is another), though not always the endpoints (one
    // may reach etcd through a `TcpGate`) nor other flags.
    let store = opts
        .extra_args
        .iter()
        .any(|a| a.starts_with("--etcd"))
        .then(|| {
            // The mesh is its prefix and KEK; other flags (listen
            // addresses, timeouts) may differ between its replicas.
            let mut key = Vec::new();
            let mut args = opts.extra_args.iter();
            while let Some(a) = args.next() {
                if a == "--etcd-prefix" || a == "--kek-file" {
                    key.push(a.as_str());
                    key.extend(args.next().map(String::as_str));
                }
            }
            key.join(" ")
        });
    let token = std::fs::read_to_string(data.join("admin.token"))
        .ok()
        .map(|t| t.trim().to_owned());
    let mut by_store = BY_STORE.lock().expect("credentials lock");
    let by_store = by_store.get_or_insert_with(HashMap::new);
    let admin_token = match (token, &store) {
        (Some(t), Some(key)) => {
            by_store.entry(key.clone()).or_insert(t.clone());
            t
        }
        (Some(t), None) => t,
        (None, Some(key)) => by_store
            .get(key)
            .cloned()
            .expect("a replica without admin.token and no earlier replica's token"),
        (None, None) => panic!("the control plane wrote no {}/admin.token", data.display()),
    };
    let creds = Credentials {
        ca_file: data.join("ca.pem"),
        admin_token,
    };
    BY_URL
        .lock()
        .expect("credentials lock")
        .get_or_insert_with(HashMap::new)
        .insert(url.to_owned(), creds.clone());
    creds
}

/// A running `isdp-control-plane` with its own data dir.
pub struct ControlPlane {
    /// `None` between [`ControlPlane::kill9`] and [`ControlPlane::restart`].
    proc: Option<Process>,
    opts: ControlPlaneOpts,
    data: TempDir,
    grpc: String,
    admin: String,
    /// The HTTP/JSON API's address (`--http-listen`).
    http: String,
    creds: Credentials,
}

/// What `isdpctl token create` answered.
#[derive(Clone, Debug)]
pub struct CreatedToken {
    /// The token's id (what `token revoke` and proxy status name).
    pub id: String,
    /// The bearer secret, `isdp_<id>_<random>`.
    pub secret: String,
    /// When it expires (Unix ms); 0 for never.
    pub expires_at_unix_ms: i64,
}

// === impl ControlPlane ===

impl ControlPlane {
    /// Starts a control plane on ephemeral loopback ports with a fresh data dir.
    pub async fn start(opts: ControlPlaneOpts) -> Self {
        Self::start_in(tempdir("cp-data"), opts).await
    }

    /// Starts a control plane on ephemeral loopback ports with `data` as its
    /// data dir (a test may have put a store there).
    pub async fn start_in(data: TempDir, opts: ControlPlaneOpts) -> Self {
        Self::launch(None, data, opts).await
    }

    /// Starts a control plane inside network namespace `netns` (see
    /// [`NetNs`](crate::NetNs)); give it `--listen`, `--admin-listen` and
    /// `--http-listen` on the namespace's address in `extra_args` to be
    /// reachable from outside. Not for [`ControlPlane::restart`].
    pub async fn start_netns(netns: &str, opts: ControlPlaneOpts) -> Self {
        Self::launch(Some(netns), tempdir("cp-data"), opts).await
    }

    async fn launch(netns: Option<&str>, data: TempDir, opts: ControlPlaneOpts) -> Self {
        let args = args(&opts, &data, "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0");
        let (name, bin) = ("control-plane", "isdp-control-plane");
        let proc = match netns {
            None => Process::spawn(name, bin, &args, tempdir("cp")).await,
            Some(ns) => Process::spawn_in(ns, name, bin, &args, tempdir("cp")).await,
        };
        let grpc = proc.addr("grpc").to_owned();
        let admin = proc.addr("admin").to_owned();
        let http = proc.addr("http").to_owned();
        let creds = remember(&format!("https://{grpc}"), data.path(), &opts);
        Self {
            proc: Some(proc),
            opts,
            data,
            grpc,
            admin,
            http,
            creds,
        }
    }

    /// `https://ADDR` of the gRPC (registry, session, xDS) listener.
    pub fn grpc_url(&self) -> String {
        format!("https://{}", self.grpc)
    }

    /// The trust bundle the control plane wrote (`<data-dir>/ca.pem`).
    pub fn ca_file(&self) -> &Path {
        &self.creds.ca_file
    }

    /// The bootstrap admin token (`<data-dir>/admin.token`).
    pub fn admin_token(&self) -> &str {
        &self.creds.admin_token
    }

    /// The CA file and admin token together.
    pub fn credentials(&self) -> &Credentials {
        &self.creds
    }

    /// The data dir (holds `ca.pem` and `admin.token`).
    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// A tonic channel to the gRPC listener over TLS, trusting `ca.pem`
    /// (callers add the token themselves, e.g. with [`bearer`]).
    pub async fn channel(&self) -> tonic::transport::Channel {
        tls_channel(&self.grpc_url(), &self.creds.ca_file).await
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

    /// `https://ADDR` of the HTTP/JSON API listener (TLS trusting
    /// [`ControlPlane::ca_file`], the admin token as a bearer).
    pub fn http_url(&self) -> String {
        format!("https://{}", self.http)
    }

    pub fn http_addr(&self) -> &str {
        &self.http
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
        let args = args(&self.opts, &self.data, &self.grpc, &self.admin, &self.http);
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

    /// The options [`ControlPlane::restart`] starts with; a test changes
    /// them between restarts (e.g. the key-encryption key flags).
    pub fn opts_mut(&mut self) -> &mut ControlPlaneOpts {
        &mut self.opts
    }

    /// The running process; panics between `kill9` and `restart`.
    pub fn process(&mut self) -> &mut Process {
        self.proc.as_mut().expect("control plane is not running")
    }

    /// Runs `isdpctl --control-plane <this> --ca-file .. --token <admin> ARGS`.
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

    /// A token made with `isdpctl -o json token create ARGS`.
    pub async fn create_token(&self, args: &[&str]) -> CreatedToken {
        let mut all = vec!["-o", "json", "token", "create"];
        all.extend_from_slice(args);
        let out = self.ctl_ok(&all).await;
        let v: serde_json::Value = serde_json::from_str(&out).expect("token JSON");
        let field = |name: &str| v[name].as_str().expect(name).to_owned();
        CreatedToken {
            id: field("id"),
            secret: field("secret"),
            expires_at_unix_ms: v["expires_at_unix_ms"].as_i64().unwrap_or(0),
        }
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

/// Writes a new key-encryption key (base64 of 32 random bytes) to `path`,
/// mode 0600, for `--kek-file`.
pub fn new_kek_file(path: &Path) -> PathBuf {
    use base64::Engine as _;
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .expect("reading /dev/urandom");
    let text = base64::engine::general_purpose::STANDARD.encode(key);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{text}\n").as_bytes()))
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path.to_owned()
}

fn args(
    opts: &ControlPlaneOpts,
    data: &TempDir,
    grpc: &str,
    admin: &str,
    http: &str,
) -> Vec<String> {
    // A test's own listen address (one peers in a network namespace
    // reach) replaces the loopback default.
    let mut args = vec![];
    for (flag, default) in [
        ("--listen", grpc),
        ("--admin-listen", admin),
        ("--http-listen", http),
    ] {
        if !opts.extra_args.iter().any(|a| a == flag) {
            args.extend([flag.to_owned(), default.to_owned()]);
        }
    }
    args.extend(["--data-dir".to_owned(), data.path().display().to_string()]);
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

/// A TLS channel to `url` trusting only `ca_file`.
pub async fn tls_channel(url: &str, ca_file: &Path) -> tonic::transport::Channel {
    let ca = std::fs::read_to_string(ca_file).expect("reading ca.pem");
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .expect("valid URL")
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca)),
        )
        .expect("TLS config")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e:?}"))
}

/// Adds `authorization: Bearer <token>` to a request (an interceptor for
/// generated clients: `FooClient::with_interceptor(channel, bearer(token))`).
pub fn bearer(
    token: &str,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone + use<> {
    let value: tonic::metadata::AsciiMetadataValue =
        format!("Bearer {token}").parse().expect("token is ASCII");
    move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", value.clone());
        Ok(req)
    }
}

/// Runs `isdpctl --control-plane URL ARGS` and returns its output, with the
/// CA file and admin token of that control plane when the harness started
/// it. Panics only if it cannot be run or hangs; the exit status is the
/// caller's to check.
pub async fn isdpctl(control_plane_url: &str, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(binary("isdpctl"));
    cmd.arg("--control-plane").arg(control_plane_url);
    if let Some(c) = credentials_for(control_plane_url) {
        cmd.arg("--ca-file").arg(&c.ca_file);
        // A caller's own --token wins: ours is added only without one.
        if !args.contains(&"--token") {
            cmd.arg("--token").arg(&c.admin_token);
        }
    }
    isdpctl_raw(cmd, args).await
}

/// Runs a prepared `isdpctl` command with `args`.
pub async fn isdpctl_raw(mut cmd: tokio::process::Command, args: &[&str]) -> Output {
    let run = cmd
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(CTL_TIMEOUT, run).await {
        Ok(out) => out.expect("running isdpctl"),
        Err(_) => panic!("isdpctl {args:?} did not finish within {CTL_TIMEOUT:?}"),
    }
}
