//! A real etcd cluster on loopback, for the etcd store tests.
//!
//! Members run the system's `etcd` binary (Debian's `etcd-server`; `make
//! test` installs it). A missing binary fails the test loudly: a test that
//! needs etcd never skips. Each member gets free loopback ports and its own
//! data dir in one temp dir, and can be killed (-9), stopped and started
//! again on the same ports and data. Timings are shortened (50 ms
//! heartbeats, 500 ms elections, 2 s login tokens) so a killed member is
//! replaced quickly, leases can be as short as 1 s and tokens expire.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tempfile::TempDir;
use tokio::process::{Child, Command};

use crate::control_plane::new_kek_file;
use crate::eventually;
use crate::process::tempdir;

/// How long a member (or the whole cluster) may take to become healthy.
const START_TIMEOUT: Duration = Duration::from_secs(20);

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    /// Plain-HTTP `/health` (etcd's metrics listener), also with TLS.
    metrics_port: u16,
    child: Option<Child>,
}

/// Server-side TLS for the members' client URLs (peers stay plain): their
/// certificate and key, and the CA that client certificates must chain to
/// (client certificates are then required).
#[derive(Clone, Debug)]
pub struct EtcdTls {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// An etcd cluster whose members are child processes, killed on drop.
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
    tls: Option<EtcdTls>,
    dir: Option<TempDir>,
    /// The key-encryption key the control planes on this cluster share.
    kek_file: PathBuf,
}

// === impl EtcdCluster ===

impl EtcdCluster {
    /// Starts `n` members and waits until every one is healthy (the cluster
    /// has a leader). Panics if `etcd` is not installed.
    pub async fn start(n: usize) -> Self {
        Self::start_with(n, None).await
    }

    /// Like [`EtcdCluster::start`], serving clients over TLS only.
    pub async fn start_tls(n: usize, tls: EtcdTls) -> Self {
        Self::start_with(n, Some(tls)).await
    }

    async fn start_with(n: usize, tls: Option<EtcdTls>) -> Self {
        etcd_binary(); // fail before anything starts
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: port_outside_ephemeral_range(),
                peer_port: port_outside_ephemeral_range(),
                metrics_port: port_outside_ephemeral_range(),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let dir = tempdir("etcd");
        let kek_file = new_kek_file(&dir.path().join("kek"));
        let mut cluster = EtcdCluster {
            members,
            initial_cluster,
            token: format!("isdp-test-{}", std::process::id()),
            tls,
            dir: Some(dir),
            kek_file,
        };
        for i in 0..n {
            cluster.spawn(i);
        }
        cluster.wait_healthy().await;
        cluster
    }

    /// Client URLs of every member (running or not), in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| self.client_url(m)).collect()
    }

    fn client_url(&self, m: &Member) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", m.client_port)
    }

    /// The endpoints as one comma-separated `--etcd-endpoints` value.
    pub fn endpoints_arg(&self) -> String {
        self.endpoints().join(",")
    }

    /// Control-plane flags selecting this cluster, under a key prefix of
    /// its own so tests never see each other's keys, with the cluster's
    /// key-encryption key (replicas must share one).
    pub fn control_plane_args(&self, prefix: &str) -> Vec<String> {
        let mut args = self.control_plane_args_without_kek(prefix);
        args.extend(["--kek-file".into(), self.kek_file.display().to_string()]);
        args
    }

    /// The first member's client address, for a forwarder in front of it
    /// (a [`TcpGate`](crate::TcpGate)).
    pub fn first_member(&self) -> std::net::SocketAddr {
        let url = self.client_url(&self.members[0]);
        url.rsplit("//")
            .next()
            .and_then(|a| a.parse().ok())
            .expect("an etcd client address")
    }

    /// [`EtcdCluster::control_plane_args`] for a replica that reaches etcd
    /// at `addr` only (a forwarder to [`EtcdCluster::first_member`]).
    pub fn control_plane_args_through(
        &self,
        prefix: &str,
        addr: std::net::SocketAddr,
    ) -> Vec<String> {
        let mut args = self.control_plane_args(prefix);
        let at = args
            .iter()
            .position(|a| a == "--etcd-endpoints")
            .expect("--etcd-endpoints")
            + 1;
        args[at] = format!("http://{addr}");
        args
    }

    /// [`EtcdCluster::control_plane_args`] without `--kek-file`, for tests
    /// that give another KEK (or none).
    pub fn control_plane_args_without_kek(&self, prefix: &str) -> Vec<String> {
        vec![
            "--store".into(),
            "etcd".into(),
            "--etcd-endpoints".into(),
            self.endpoints_arg(),
            "--etcd-prefix".into(),
            prefix.into(),
        ]
    }

    /// The key-encryption key file of [`EtcdCluster::control_plane_args`].
    pub fn kek_file(&self) -> &Path {
        &self.kek_file
    }

    fn dir(&self) -> PathBuf {
        self.dir.as_ref().expect("etcd dir").path().to_path_buf()
    }

    fn spawn(&mut self, i: usize) {
        let dir = self.dir();
        let m = &self.members[i];
        let client = self.client_url(m);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let metrics = format!("http://127.0.0.1:{}", m.metrics_port);
        let mut tls_args: Vec<std::ffi::OsString> = Vec::new();
        if let Some(tls) = &self.tls {
            for (flag, path) in [
                ("--cert-file", &tls.cert_file),
                ("--key-file", &tls.key_file),
                ("--trusted-ca-file", &tls.ca_file),
            ] {
                tls_args.push(flag.into());
                tls_args.push(path.into());
            }
            tls_args.push("--client-cert-auth".into());
        }
        let log = std::fs::File::create(dir.join(format!("{}.log", m.name))).expect("etcd log");
        // A restarted member rejoins from its data dir; the flags for a new
        // cluster are ignored then.
        let child = Command::new(etcd_binary())
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(dir.join(&m.name))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--listen-metrics-urls", &metrics])
            .args(&tls_args)
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            // Login tokens expire after 2 s idle (300 s by default), so a
            // test sees a client log in again.
            .args(["--auth-token-ttl", "2"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("starting etcd member {}: {e}", m.name));
        self.members[i].child = Some(child);
    }

    /// SIGKILL member `i`, as in a crash.
    pub async fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }

    /// Kills every member: etcd is gone.
    pub async fn stop_all(&mut self) {
        for i in 0..self.members.len() {
            self.kill9(i).await;
        }
    }

    /// Starts member `i` again on its ports and data dir.
    pub async fn restart(&mut self, i: usize) {
        self.kill9(i).await;
        self.spawn(i);
    }

    /// Starts every stopped member and waits until the cluster is healthy.
    pub async fn start_all(&mut self) {
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                self.spawn(i);
            }
        }
        self.wait_healthy().await;
    }

    /// The index of the member that is the raft leader now (from its
    /// `etcd_server_is_leader` metric), so tests can kill it on purpose.
    pub async fn leader(&self) -> usize {
        for (i, m) in self.members.iter().enumerate() {
            if m.child.is_none() {
                continue;
            }
            let addr = format!("127.0.0.1:{}", m.metrics_port);
            if let Ok(r) = crate::http::get(&addr, "/metrics").await
                && r.body
                    .lines()
                    .any(|l| l.trim() == "etcd_server_is_leader 1")
            {
                return i;
            }
        }
        panic!("no etcd member reports itself leader");
    }

    /// Waits until every running member answers `/health` with a leader.
    pub async fn wait_healthy(&self) {
        let running: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| format!("127.0.0.1:{}", m.metrics_port))
            .collect();
        eventually(START_TIMEOUT, "etcd members healthy", || {
            let running = running.clone();
            async move {
                for addr in &running {
                    let r = crate::http::get(addr, "/health").await?;
                    anyhow::ensure!(
                        r.status == 200 && r.body.contains("true"),
                        "{addr}: {} {}",
                        r.status,
                        r.body
                    );
                }
                Ok(())
            }
        })
        .await;
    }
}

impl Drop for EtcdCluster {
    /// Members die with their `Child` handles; the logs are kept (and their
    /// place printed) when the test failed.
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            eprintln!("etcd logs kept in {}", dir.keep().display());
        }
    }
}

/// A free loopback port below Linux's ephemeral range (32768+). etcd cannot
/// bind port 0 and report it, so the port is picked here; one from the
/// ephemeral range could meanwhile become some connection's source port
/// (the kernel hands those out), and a restarted member must get its port
/// back, so the ports come from a range the kernel does not use by itself.
fn port_outside_ephemeral_range() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    // Spread over the range by pid, so runs one after another differ.
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 6_000) as u16 * 2;
    loop {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % 12_000;
        let port = 20_000 + (base - 20_000 + offset) % 12_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The `etcd` binary on PATH; panics (never skips) when it is missing.
fn etcd_binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "etcd not found on PATH: the etcd store tests need a real etcd. \
                 Install it with `.ci/deps.sh etcd` (Debian: apt-get install etcd-server); \
                 `make test` does this by itself"
            )
        })
}
