//! Store faults on a real control plane: a full disk (a small tmpfs as the
//! data directory) and a damaged store file.
//!
//! The full-disk test mounts a tmpfs, which needs root (CI runs as root);
//! without it the test fails loudly, naming what it needs, never skips.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use isdp_proto::v1::{
    Instance, ListInstancesRequest, RegisterRequest, registry_client::RegistryClient,
};
use isdp_tests::{ControlPlane, ControlPlaneOpts, binary, eventually, http};
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::{Code, service::interceptor::InterceptedService, transport::Channel};

/// A tmpfs mounted on a private temp dir, unmounted when dropped.
struct Tmpfs {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::Builder::new()
            .prefix("isdp-cp-data-tmpfs-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir()
            .expect("creating a temp dir");
        let path = dir.path().to_owned();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("tmpfs")
            .arg(&path)
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "store_faults needs to mount a tmpfs as the data directory (run the tests as root, \
             as CI does): mount -t tmpfs -o size={size} tmpfs {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            dir: Some(dir),
            path,
        }
    }

    /// A second handle on the same directory, for the control plane.
    fn take_dir(&mut self) -> tempfile::TempDir {
        self.dir.take().expect("taken once")
    }

    /// Writes a file until the disk is full.
    fn fill(&self) -> PathBuf {
        let filler = self.path.join("filler");
        let mut f = std::fs::File::create(&filler).expect("creating the filler");
        let chunk = vec![0xa5u8; 64 << 10];
        loop {
            if let Err(e) = f.write_all(&chunk) {
                assert_eq!(e.raw_os_error(), Some(28), "filling the disk: {e}");
                break;
            }
        }
        // The last chunk may have been written in part: top up byte by byte.
        while f.write_all(&[0]).is_ok() {}
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The admin token on every call.
#[derive(Clone)]
struct Admin(tonic::metadata::AsciiMetadataValue);

impl tonic::service::Interceptor for Admin {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

type Registry = RegistryClient<InterceptedService<Channel, Admin>>;

async fn registry(cp: &ControlPlane) -> Registry {
    let token = format!("Bearer {}", cp.admin_token()).parse().unwrap();
    RegistryClient::new(InterceptedService::new(cp.channel().await, Admin(token)))
}

/// An instance carrying about 8 KiB of metadata, so the store file grows.
fn big_instance(n: usize) -> Instance {
    let metadata: BTreeMap<String, String> = (0..16)
        .map(|k| (format!("k{k}"), "x".repeat(500)))
        .collect();
    Instance {
        id: format!("fill-{n:05}"),
        service: format!("fill-{}", n / 40),
        address: "127.0.0.1".into(),
        port: 20_000 + (n % 40) as u32,
        metadata: metadata.into_iter().collect(),
        ..Default::default()
    }
}

async fn register(reg: &mut Registry, n: usize) -> Result<(), tonic::Status> {
    reg.register(RegisterRequest {
        instance: Some(big_instance(n)),
    })
    .await
    .map(drop)
}

fn names_full_disk(s: &tonic::Status) -> bool {
    s.code() == Code::Unavailable && s.message().contains("No space left on device")
}

/// Every instance id the registry lists, over all services used.
async fn listed(reg: &mut Registry, services: usize) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for s in 0..services {
        let got = reg
            .list_instances(ListInstancesRequest {
                service: format!("fill-{s}"),
            })
            .await
            .expect("listing instances");
        ids.extend(got.into_inner().instances.into_iter().map(|i| i.id));
    }
    ids
}

/// A full disk: writes fail UNAVAILABLE naming it, every queued caller is
/// answered, `/ready` says 503 and why; once space is freed, writes work
/// again without a restart and nothing acknowledged was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_and_recovers_without_a_restart() {
    let mut disk = Tmpfs::mount("16m");
    let mut cp = ControlPlane::start_in(disk.take_dir(), ControlPlaneOpts::default()).await;
    let pid = cp.process().pid();
    let mut reg = registry(&cp).await;
    let filler = disk.fill();

    // Register until the store file needs space it cannot get.
    let mut acked = BTreeSet::new();
    let mut n = 0;
    let first = loop {
        assert!(n < 4_000, "4000 registrations fitted on a full disk");
        match register(&mut reg, n).await {
            Ok(()) => {
                acked.insert(big_instance(n).id);
                n += 1;
            }
            Err(s) => break s,
        }
    };
    assert!(names_full_disk(&first), "{first:?}");

    // Many callers at once: each one is answered, with the cause.
    let calls: Vec<_> = (0..64)
        .map(|i| {
            let mut reg = reg.clone();
            tokio::spawn(async move { register(&mut reg, 10_000 + i).await })
        })
        .collect();
    for call in calls {
        let r = tokio::time::timeout(Duration::from_secs(15), call)
            .await
            .expect("a caller was left without an answer")
            .unwrap();
        let status = r.expect_err("a write succeeded on a full disk");
        assert!(names_full_disk(&status), "{status:?}");
    }
    let ready = http::get(cp.admin_addr(), "/ready").await.unwrap();
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert!(
        ready.body.contains("No space left on device"),
        "{}",
        ready.body
    );
    let metrics = http::get(cp.admin_addr(), "/metrics").await.unwrap().body;
    assert!(metrics.contains("isdp_store_up 0"), "{metrics}");
    // Reads are still served from the views.
    assert_eq!(listed(&mut reg, n / 40 + 1).await, acked);

    // Space comes back: the store reopens by itself.
    std::fs::remove_file(&filler).unwrap();
    let mut late = 20_000;
    eventually(
        Duration::from_secs(20),
        "a write succeeds once space is back",
        || {
            let mut reg = reg.clone();
            late += 1;
            let n = late;
            async move { Ok(register(&mut reg, n).await?) }
        },
    )
    .await;
    assert_eq!(cp.process().pid(), pid);
    assert!(cp.process().is_running(), "the control plane restarted");
    let ready = http::get(cp.admin_addr(), "/ready").await.unwrap();
    assert_eq!(ready.status, 200, "{}", ready.body);
    let metrics = http::get(cp.admin_addr(), "/metrics").await.unwrap().body;
    assert!(metrics.contains("isdp_store_up 1"), "{metrics}");
    assert!(metrics.contains("isdp_store_failures_total 1"), "{metrics}");
    let now = listed(&mut reg, n / 40 + 1).await;
    assert!(now.is_superset(&acked), "acknowledged instances lost");

    // And after a restart, from the file: nothing acknowledged was lost.
    cp.restart().await;
    let mut reg = registry(&cp).await;
    let after = listed(&mut reg, n / 40 + 1).await;
    assert!(after.is_superset(&acked), "acknowledged instances lost");
    cp.kill9().await;
}

/// Starts the control plane on `data`, expecting it to refuse; its exit
/// status and stderr.
async fn refused_start(data: &Path) -> (std::process::ExitStatus, String) {
    let log = tempfile::NamedTempFile::new().expect("a log file");
    let mut child = tokio::process::Command::new(binary("isdp-control-plane"))
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--http-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(data)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log.reopen().expect("the log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("running isdp-control-plane");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        assert!(
            !line.contains("listening:"),
            "the control plane started on a damaged store"
        );
    }
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the control plane neither started nor exited within 30s")
        .unwrap();
    (status, std::fs::read_to_string(log.path()).unwrap())
}

/// A truncated or altered store file stops startup with an error naming
/// the file and what to do, a non-zero exit and no panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_store_file_stops_startup_with_a_clear_error() {
    let mut cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    for n in 0..50 {
        cp.register("ledger", "127.0.0.1", 20_000 + n, &[]).await;
    }
    cp.process().terminate().await;
    let store = cp.data_dir().join("store.redb");
    let bytes = std::fs::read(&store).unwrap();

    let mut altered = bytes.clone();
    for b in &mut altered[4096..] {
        *b ^= 0x5a;
    }
    for (what, damaged) in [
        ("truncated", bytes[..bytes.len() / 2].to_vec()),
        ("altered", altered),
    ] {
        std::fs::write(&store, &damaged).unwrap();
        let (status, stderr) = refused_start(cp.data_dir()).await;
        assert!(!status.success(), "{what}: exited {status}");
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
        assert!(
            stderr.contains(&store.display().to_string())
                && stderr.contains("restore it from a backup"),
            "{what}: {stderr}"
        );
    }
    std::fs::write(&store, &bytes).unwrap();
    cp.restart().await;
    assert_eq!(cp.instances("ledger").await.unwrap().len(), 50);
}
