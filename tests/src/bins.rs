//! Finding the built binaries, building them first when needed.
//!
//! Cargo builds an integration test to `target/<profile>/deps/` and binaries
//! to `target/<profile>/`, but does not build other packages' binaries for
//! this package's tests. So the first test in a process that needs a binary
//! runs `cargo build --workspace --bins` (same profile, same target dir):
//! a plain `cargo test` works on a fresh checkout, and never runs binaries
//! older than the source. When they are up to date that build takes a
//! fraction of a second.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

/// The directory holding the ISDP binaries: `ISDP_BIN_DIR` if set (used as
/// it is, nothing is built), else the profile dir this test executable was
/// built into, after building the workspace's binaries there.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ISDP_BIN_DIR") {
        return PathBuf::from(dir);
    }
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BUILT.get_or_init(build) {
        Ok(dir) => dir.clone(),
        Err(e) => panic!("{e}"),
    }
}

/// The path of binary `name`. Panics, saying how to build it, if absent: a
/// test that cannot run its binaries must fail, never pass by skipping.
pub fn binary(name: &str) -> PathBuf {
    let dir = bin_dir();
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "binary `{name}` not found in {}: run `cargo build --workspace --bins` first \
         (or point ISDP_BIN_DIR at the directory holding it)",
        dir.display()
    );
    path
}

/// Builds every binary of the workspace into the profile directory of the
/// running test executable, and returns that directory.
fn build() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("locating the test executable: {e}"))?;
    let dir = profile_dir(&exe)
        .ok_or_else(|| format!("{} is not inside a cargo target dir", exe.display()))?;
    let profile = dir
        .file_name()
        .and_then(|p| p.to_str())
        .ok_or_else(|| format!("no profile in {}", dir.display()))?;
    let target_dir = dir
        .parent()
        .ok_or_else(|| format!("no target dir above {}", dir.display()))?;
    // `debug` is the dev profile's directory; any other is the profile's name.
    let profile = if profile == "debug" { "dev" } else { profile };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut command = Command::new(&cargo);
    // Cargo and nextest describe the running test in these variables; a
    // build that saw them would count build scripts that read them (ring's
    // does) as changed and rebuild half the tree on every run.
    for (name, _) in std::env::vars_os() {
        let name_str = name.to_string_lossy();
        if name_str.starts_with("CARGO_PKG_")
            || name_str.starts_with("CARGO_BIN_")
            || name_str.starts_with("CARGO_MANIFEST_")
            || name_str.starts_with("NEXTEST")
            || matches!(
                &*name_str,
                "CARGO_CRATE_NAME" | "CARGO_PRIMARY_PACKAGE" | "CARGO_TARGET_TMPDIR" | "OUT_DIR"
            )
        {
            command.env_remove(&name);
        }
    }
    let status = command
        .args([
            "build",
            "--quiet",
            "--workspace",
            "--bins",
            "--profile",
            profile,
        ])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(&workspace)
        .status()
        .map_err(|e| {
            format!(
                "running `{} build` for the binaries the tests start: {e}",
                Path::new(&cargo).display()
            )
        })?;
    if !status.success() {
        return Err(format!(
            "`cargo build --workspace --bins --profile {profile}` failed ({status}); \
             the end-to-end tests need the binaries"
        ));
    }
    Ok(dir)
}

/// `target/<profile>/deps/<test>` -> `target/<profile>`.
fn profile_dir(exe: &Path) -> Option<PathBuf> {
    let dir = exe.parent()?;
    let dir = if dir.file_name()? == "deps" {
        dir.parent()?
    } else {
        dir
    };
    Some(dir.to_path_buf())
}
