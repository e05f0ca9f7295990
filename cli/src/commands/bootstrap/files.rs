//! The output directory and how files land in it.
//!
//! A gRPC client's file watcher re-reads these files while the client
//! runs, so each is written to a temporary file beside it, synced, and
//! renamed over it: a reader sees the old file or the new one, never part
//! of either. Every file is staged before the first rename, so a failure
//! while writing (a full disk) leaves the directory as it was. The key is
//! 0600 and the directory 0700 whatever the umask; a directory others may
//! write is refused, since whoever can replace `ca.pem` chooses whom the
//! client trusts.

use std::{
    fs::{self, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use super::BootstrapError;

/// The client's private key (0600); never leaves the machine.
pub const KEY: &str = "key.pem";
/// Its certificate chain, leaf first.
pub const CERT: &str = "cert.pem";
/// Every root of the mesh's trust bundle.
pub const CA: &str = "ca.pem";
/// The gRPC xDS bootstrap.
pub const BOOTSTRAP: &str = "bootstrap.json";

/// Every file a bootstrap writes.
pub const ALL: [&str; 4] = [KEY, CERT, CA, BOOTSTRAP];

fn io_error(path: &Path, what: &str, e: io::Error) -> BootstrapError {
    BootstrapError::Files {
        path: path.to_owned(),
        reason: format!("{what}: {e}"),
    }
}

/// The directory a bootstrap writes, as an absolute path.
pub struct OutDir {
    path: PathBuf,
    /// Whether this run created it (and removes it again on failure).
    created: bool,
}

// === impl OutDir ===

impl OutDir {
    /// Opens `path`, creating it (0700, not its parents) when `create`
    /// allows and it is missing, and checks this process can write it and
    /// nobody else can.
    pub fn open(path: &Path, create: bool) -> Result<OutDir, BootstrapError> {
        let created = match fs::symlink_metadata(path) {
            Ok(_) => false,
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(path)
                    .map_err(|e| match e.kind() {
                        io::ErrorKind::NotFound => BootstrapError::Files {
                            path: path.to_owned(),
                            reason: "creating the directory: its parent does not exist".into(),
                        },
                        _ => io_error(path, "creating the directory", e),
                    })?;
                fs::set_permissions(path, fs::Permissions::from_mode(0o700))
                    .map_err(|e| io_error(path, "setting mode 0700", e))?;
                true
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(BootstrapError::Renew(format!(
                    "{} does not exist; bootstrap it first (without --renew)",
                    path.display()
                )));
            }
            Err(e) => return Err(io_error(path, "reading", e)),
        };
        match usable(path) {
            Ok(path) => Ok(OutDir { path, created }),
            Err(e) => {
                if created {
                    let _ = fs::remove_dir(path);
                }
                Err(e)
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Reads one of the bootstrap's files.
    pub fn read(&self, name: &str) -> Result<String, BootstrapError> {
        let path = self.file(name);
        fs::read_to_string(&path).map_err(|e| io_error(&path, "reading", e))
    }

    /// Refuses a directory that already holds a bootstrap: writing over it
    /// would replace a running client's identity; `--renew` is the way to
    /// refresh it.
    pub fn refuse_existing(&self) -> Result<(), BootstrapError> {
        let present: Vec<&str> = ALL
            .into_iter()
            .filter(|name| fs::symlink_metadata(self.file(name)).is_ok())
            .collect();
        if present.is_empty() {
            return Ok(());
        }
        Err(BootstrapError::Files {
            path: self.path.clone(),
            reason: format!(
                "already holds {}: pass --renew to renew it in place, or choose an empty directory",
                present.join(", ")
            ),
        })
    }

    pub fn stage(&self) -> Staged<'_> {
        Staged {
            dir: self,
            pending: Vec::new(),
        }
    }

    /// After a failure: removes the directory if this run created it (it
    /// is empty then, every staged file having been cleaned up).
    pub fn abandon(&self) {
        if self.created {
            let _ = fs::remove_dir(&self.path);
        }
    }
}

/// The absolute path of `path`, checked to be a directory others cannot
/// write and this process can.
fn usable(path: &Path) -> Result<PathBuf, BootstrapError> {
    let meta = fs::metadata(path).map_err(|e| io_error(path, "reading", e))?;
    if !meta.is_dir() {
        return Err(BootstrapError::Files {
            path: path.to_owned(),
            reason: "not a directory".into(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(BootstrapError::Files {
            path: path.to_owned(),
            reason: format!(
                "group or others may write it (mode {mode:04o}), and so replace the trust bundle \
                 or the bootstrap; `chmod go-w {}` or choose another directory",
                path.display()
            ),
        });
    }
    let absolute = fs::canonicalize(path).map_err(|e| io_error(path, "resolving", e))?;
    // Write access, tried rather than inferred from the mode bits
    // (root, ACLs, read-only mounts).
    let probe = absolute.join(format!(".isdpctl-probe-{}", std::process::id()));
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(|e| io_error(path, "not writable", e))?;
    let _ = fs::remove_file(&probe);
    Ok(absolute)
}

/// Files written beside their final names, renamed into place together by
/// [`Staged::commit`]; dropped uncommitted, they are removed.
pub struct Staged<'a> {
    dir: &'a OutDir,
    /// (temporary path, final name), in the order they are renamed.
    pending: Vec<(PathBuf, &'static str)>,
}

// === impl Staged ===

impl Staged<'_> {
    /// Writes `contents` to a new temporary file of mode `mode` and syncs it.
    pub fn add(
        &mut self,
        name: &'static str,
        contents: &[u8],
        mode: u32,
    ) -> Result<(), BootstrapError> {
        let tmp = self.dir.file(&format!(
            ".{name}.tmp-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let write = || -> io::Result<()> {
            // create_new: never follows a planted symlink.
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)?;
            // Exactly `mode`, whatever the umask took away.
            f.set_permissions(fs::Permissions::from_mode(mode))?;
            f.write_all(contents)?;
            f.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(io_error(&self.dir.file(name), "writing", e));
        }
        self.pending.push((tmp, name));
        Ok(())
    }

    /// Renames every staged file over its final name, in the order added,
    /// then syncs the directory so the renames survive a crash.
    pub fn commit(mut self) -> Result<(), BootstrapError> {
        for (tmp, name) in std::mem::take(&mut self.pending) {
            let dest = self.dir.file(name);
            if let Err(e) = fs::rename(&tmp, &dest) {
                let _ = fs::remove_file(&tmp);
                return Err(io_error(&dest, "replacing", e));
            }
        }
        fs::File::open(self.dir.path())
            .and_then(|d| d.sync_all())
            .map_err(|e| io_error(self.dir.path(), "syncing", e))
    }
}

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        for (tmp, _) in &self.pending {
            let _ = fs::remove_file(tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "isdpctl-files-{name}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut all: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        all.sort();
        all
    }

    #[test]
    fn staged_files_land_together_with_their_modes() {
        let path = scratch("modes");
        let dir = OutDir::open(&path, true).unwrap();
        assert!(dir.path().is_absolute());
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o700);
        let mut staged = dir.stage();
        staged.add(KEY, b"k", 0o600).unwrap();
        staged.add(CA, b"c", 0o644).unwrap();
        assert!(!dir.file(KEY).exists(), "nothing lands before commit");
        staged.commit().unwrap();
        assert_eq!(names(&path), [CA, KEY]);
        assert_eq!(mode(&dir.file(KEY)), 0o600);
        assert_eq!(mode(&dir.file(CA)), 0o644);
        let err = dir.refuse_existing().unwrap_err().to_string();
        assert!(
            err.contains("key.pem, ca.pem") && err.contains("--renew"),
            "{err}"
        );

        // Dropped uncommitted: no trace, the old files untouched.
        let mut staged = dir.stage();
        staged.add(CA, b"new", 0o644).unwrap();
        drop(staged);
        assert_eq!(names(&path), [CA, KEY]);
        assert_eq!(fs::read(dir.file(CA)).unwrap(), b"c");
        fs::remove_dir_all(&path).unwrap();
    }

    #[test]
    fn unusable_directories_are_refused() {
        // A file where the directory, or its parent, should be.
        let file = scratch("file");
        fs::write(&file, b"x").unwrap();
        let err = OutDir::open(&file, true).err().unwrap().to_string();
        assert!(err.contains("not a directory"), "{err}");
        let under = file.join("sub");
        let err = OutDir::open(&under, true).err().unwrap().to_string();
        assert!(err.starts_with(&under.display().to_string()), "{err}");
        fs::remove_file(&file).unwrap();

        // A missing parent: not created.
        let orphan = scratch("orphan").join("sub");
        let err = OutDir::open(&orphan, true).err().unwrap().to_string();
        assert!(err.contains("its parent does not exist"), "{err}");
        assert!(!orphan.parent().unwrap().exists());

        // Others may write it.
        let open = scratch("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        let err = OutDir::open(&open, true).err().unwrap().to_string();
        assert!(
            err.contains("mode 0777") && err.contains("chmod go-w"),
            "{err}"
        );
        fs::remove_dir(&open).unwrap();

        // --renew does not create it.
        let missing = scratch("missing");
        let err = OutDir::open(&missing, false).err().unwrap().to_string();
        assert!(err.contains("does not exist"), "{err}");
        assert!(!missing.exists());
    }
}
