//! Everything the bench needs from outside the crate: the load generators,
//! the comparison servers and the ISDP release binaries. A missing piece is
//! an error that says how to get it; the bench never skips a shape.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// Paths of the external programs, and their versions for the report.
pub struct Tools {
    pub oha: PathBuf,
    pub wrk: PathBuf,
    pub haproxy: PathBuf,
    pub nginx: PathBuf,
    pub versions: Vec<String>,
}

/// The ISDP binaries, from the release profile the bench runs in.
pub struct IsdpBins {
    pub control_plane: PathBuf,
    pub sidecar: PathBuf,
}

const APT: &str = "apt-get update && apt-get install -y wrk haproxy nginx-light";

/// Finds every tool (all of them, so one run lists everything missing)
/// and checks there are two cores to pin load and servers apart.
pub fn preflight() -> anyhow::Result<Tools> {
    let wanted = [
        ("oha", "cargo install --locked oha"),
        ("wrk", APT),
        ("haproxy", APT),
        ("nginx", APT),
        ("taskset", "apt-get install -y util-linux"),
        ("getconf", "apt-get install -y libc-bin"),
    ];
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for (name, install) in wanted {
        match which(name) {
            Some(path) => found.push(path),
            None => missing.push(format!("  {name}: install with `{install}`")),
        }
    }
    if !missing.is_empty() {
        bail!(
            "the data-plane bench needs tools that are not installed:\n{}",
            missing.join("\n")
        );
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores < 2 {
        bail!(
            "the bench pins the load generator to core 1 and servers to core 0: needs 2 cores, found {cores}"
        );
    }
    let [oha, wrk, haproxy, nginx, ..] = <[PathBuf; 6]>::try_from(found).expect("six tools");
    let versions = vec![
        version(&oha, &["--version"])?,
        version(&wrk, &["-v"])?,
        version(&haproxy, &["-v"])?,
        version(&nginx, &["-v"])?,
    ];
    Ok(Tools {
        oha,
        wrk,
        haproxy,
        nginx,
        versions,
    })
}

/// The release binaries beside this bench executable
/// (`target/release/deps/dataplane-HASH` -> `target/release/`).
pub fn isdp_bins() -> anyhow::Result<IsdpBins> {
    let exe = std::env::current_exe().context("locating the bench executable")?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("bench executable has no target/<profile> dir")?;
    let bin = |name: &str| -> anyhow::Result<PathBuf> {
        let path = dir.join(name);
        if !path.is_file() {
            bail!(
                "`{name}` not found in {}: run `cargo build --release --workspace --bins` first",
                dir.display()
            );
        }
        Ok(path)
    };
    Ok(IsdpBins {
        control_plane: bin("isdp-control-plane")?,
        sidecar: bin("isdp-sidecar")?,
    })
}

/// The first `name` on `PATH` (plus `~/.cargo/bin`, where `cargo install`
/// puts oha even when it is not on `PATH`).
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let cargo_bin = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin"));
    std::env::split_paths(&path)
        .chain(cargo_bin)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The first line a tool prints about its version (some print it on stderr,
/// wrk exits non-zero doing so).
fn version(bin: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .with_context(|| format!("running {} {args:?}", bin.display()))?;
    let text = [out.stdout, out.stderr].concat();
    let text = String::from_utf8_lossy(&text);
    Ok(text.lines().next().unwrap_or("").trim().to_owned())
}
