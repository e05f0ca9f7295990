//! Finding the built binaries.
//!
//! Cargo builds an integration test to `target/<profile>/deps/` and binaries
//! to `target/<profile>/`, but does not build other packages' binaries for
//! this package's tests: they come from `cargo build --workspace --bins`.

use std::path::PathBuf;

/// The directory holding the ISDP binaries: `ISDP_BIN_DIR` if set, else the
/// profile dir this test executable was built into, else
/// `$CARGO_TARGET_DIR/debug` (or `target/debug` beside the workspace).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ISDP_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let from_exe = std::env::current_exe().ok().and_then(|exe| {
        let dir = exe.parent()?;
        // target/<profile>/deps/<test> -> target/<profile>
        let dir = if dir.file_name()? == "deps" {
            dir.parent()?
        } else {
            dir
        };
        Some(dir.to_path_buf())
    });
    if let Some(dir) = from_exe.filter(|d| d.join("isdp-control-plane").is_file()) {
        return dir;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("debug")
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
