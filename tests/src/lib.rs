//! The ISDP sandbox: starts the real binaries (control plane, sidecars,
//! demo backends, `isdpctl`) as child processes on loopback and gives tests a
//! small API over them.
//!
//! Everything binds port 0; the harness learns the bound addresses from the
//! one `... listening: key=addr ...` line each binary prints on stdout, so
//! tests run in parallel without port clashes. Each child's stderr goes to a
//! log file in a temp dir; when a test panics the dir is kept and its path
//! printed (set `ISDP_KEEP_LOGS=1` to keep it always). Children are killed
//! when their handle drops, so a failed test leaves nothing running.
//!
//! The harness panics instead of returning errors: tests read as straight
//! lines, and a panic is what keeps the logs of a failed test.
//!
//! Binaries come from the cargo target dir and must be built first with
//! `cargo build --workspace --bins`; a missing binary fails the test, never
//! skips it.
//!
//! # Layout
//! - `bins`: finding the built binaries (`ISDP_BIN_DIR`, `CARGO_TARGET_DIR`).
//! - `process`: one child process: spawn, await its listening line, logs,
//!   SIGKILL / SIGTERM, kill on drop.
//! - `http`: a tiny HTTP/1.0 client for admin endpoints.
//! - `load`: [`load::Load`], steady concurrent load through a sidecar,
//!   recorded per request (instance, status, latency) for shares and
//!   percentiles.
//! - `otlp`: [`OtlpReceiver`], a real OTLP/gRPC trace receiver.
//! - `control_plane`: [`ControlPlane`] and the [`isdpctl`] helpers.
//! - `sidecar`: [`Sidecar`] and [`SidecarToml`], a config builder.
//! - `promtool`: Prometheus' `promtool`, to check expositions and rules.
//! - `echo`: [`EchoHttp`], the demo backend the tests make misbehave, and
//!   [`EchoGrpc`] / [`EchoTcp`], the gRPC and TCP backends.
//! - `etcd`: [`EtcdCluster`], real etcd members on loopback (killable,
//!   restartable) for the etcd store tests.
//! - `gate`: [`TcpGate`], a TCP forwarder a test cuts and heals, to
//!   partition one process from another (a replica from etcd).
//! - `procstat`: [`procstat::ProcStat`], a process's memory, descriptors and
//!   threads from `/proc`, and the slope of a series (the soak bench).
//! - `netns`: [`NetNs`], a network namespace on a veth link that the test
//!   breaks with iptables ([`Fault`]: a blackhole to one port, packet
//!   loss), for partitions as a real network makes them (root only).
//! - `node`: [`NodeClient`], the Node proxyless gRPC client
//!   (`tests/node/client.js`, `@grpc/grpc-js-xds`), reading xDS through
//!   a sidecar's relay.
//! - this file: [`eventually`] and [`holds_for`], polling helpers.

mod bins;
mod control_plane;
pub mod dig;
mod echo;
mod etcd;
mod gate;
pub mod http;
pub mod load;
pub mod netns;
pub mod node;
pub mod otlp;
mod process;
pub mod procstat;
pub mod promtool;
mod sidecar;

use std::future::Future;
use std::time::{Duration, Instant};

pub use bins::{bin_dir, binary};
pub use control_plane::{
    ControlPlane, ControlPlaneOpts, CreatedToken, Credentials, bearer, isdpctl, isdpctl_raw,
    new_kek_file, tls_channel,
};
pub use echo::{Backend, EchoGrpc, EchoHttp, EchoTcp};
pub use etcd::{EtcdCluster, EtcdTls};
pub use gate::TcpGate;
pub use netns::{Fault, NetNs};
pub use node::{Counts, NodeClient, NodeRun};
pub use otlp::{OtlpReceiver, ReceivedSpan};
pub use process::Process;
pub use sidecar::{Sidecar, SidecarToml};

/// Time between polls in [`eventually`] and [`holds_for`]: short enough that
/// measured latencies are accurate to ~50 ms, long enough not to load the
/// 2-core CI machine.
const POLL: Duration = Duration::from_millis(50);

/// Polls `check` until it returns `Ok`, and returns how long that took, so
/// tests can assert latencies ("unhealthy within 2 s"). Panics with `what`
/// and the last error after `timeout`. Each attempt is also cut off at the
/// deadline, so a hung check cannot hang the test.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::from("never completed an attempt");
    loop {
        match tokio::time::timeout_at(deadline, check()).await {
            Ok(Ok(())) => return start.elapsed(),
            Ok(Err(e)) => last = format!("{e:#}"),
            Err(_) => {}
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last failure: {last}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Checks that `check` keeps returning `Ok` for all of `duration`; panics
/// with `what` at the first failure. The counterpart of [`eventually`] for
/// "still true while X is down".
pub async fn holds_for<F, Fut>(duration: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let start = Instant::now();
    while start.elapsed() < duration {
        if let Err(e) = check().await {
            panic!("{what} stopped holding after {:?}: {e:#}", start.elapsed());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Picks a free loopback port by binding port 0 and releasing it. Only for
/// listeners whose binary cannot report a port-0 bind (sidecar upstream
/// listeners); there is a small race with other processes.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0 to pick a free port")
}

/// Finds the instance with `id` in a JSON array of instances or endpoints
/// (`isdpctl -o json instances`, or a sidecar's `/config` endpoints).
pub fn find_by_id<'a>(list: &'a [serde_json::Value], id: &str) -> Option<&'a serde_json::Value> {
    list.iter().find(|v| v["id"] == id)
}

/// The `status` of instance `id` in `list`, or an error saying it is absent.
pub fn status_of(list: &[serde_json::Value], id: &str) -> anyhow::Result<String> {
    let v = find_by_id(list, id).ok_or_else(|| anyhow::anyhow!("{id} not in {list:?}"))?;
    v["status"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("{id} has no string status: {v}"))
}
