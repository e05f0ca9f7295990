//! The data directory and the secrets kept in files: the directory is
//! created 0700 and secret files 0600, whatever the umask, and the control
//! plane refuses to start on a directory or secret file that group or
//! others may use, or on a directory that belongs to another user, naming
//! the path and the fix. A secret is only as private as its file: a 0644
//! `store.redb` or `admin.token` hands the mesh to every local account.
//!
//! Unix permissions: the control plane runs on Linux (the owner check reads
//! the process's uid from `/proc/self`, and is skipped where that is absent).

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::{
        DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
    },
    path::Path,
};

/// Mode of the data directory.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every secret file the control plane writes.
pub const SECRET_MODE: u32 = 0o600;
/// Mode of `ca.pem`: the trust bundle is public (and the directory around
/// it is private anyway).
pub const PUBLIC_MODE: u32 = 0o644;

/// The embedded store's file.
pub const STORE_FILE: &str = "store.redb";
/// The first admin token's secret.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// The key-encryption key the embedded store generates when none is given.
pub const KEK_FILE: &str = "kek";
/// The trust bundle (PEM), for isdpctl and sidecars on this host.
pub const CA_FILE: &str = "ca.pem";

/// The secret files the control plane keeps in its data directory.
pub const SECRET_FILES: [&str; 3] = [STORE_FILE, ADMIN_TOKEN_FILE, KEK_FILE];

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error(
        "{what} {path} is mode {mode:04o}: group or others may use it, so the control plane \
         will not start; fix: chmod {fix:o} {path}"
    )]
    Mode {
        what: &'static str,
        path: String,
        mode: u32,
        fix: u32,
    },
    #[error(
        "data directory {path} belongs to uid {owner}, not to this process (uid {me}), so the \
         control plane will not start; fix: chown -R {me} {path}, or run as uid {owner}"
    )]
    Owner { path: String, owner: u32, me: u32 },
    #[error("data directory {path} is not a directory")]
    NotDir { path: String },
    #[error("{doing} {path}: {source}")]
    Io {
        doing: &'static str,
        path: String,
        source: io::Error,
    },
}

fn io_err<'a>(doing: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> DataDirError + 'a {
    move |source| DataDirError::Io {
        doing,
        path: path.display().to_string(),
        source,
    }
}

/// Creates the data directory (0700) or checks the one that is there, and
/// checks every secret file already in it.
pub fn prepare(dir: &Path) -> Result<(), DataDirError> {
    match fs::metadata(dir) {
        Ok(meta) => check_dir(dir, &meta)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            create_dir(dir).map_err(io_err("creating the data directory", dir))?
        }
        Err(e) => return Err(io_err("reading the data directory", dir)(e)),
    }
    for name in SECRET_FILES {
        check_secret_file(&dir.join(name), "secret file")?;
    }
    Ok(())
}

/// Creates `dir` (and missing parents) 0700; one that exists is left as it is.
pub fn create_dir(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    // The umask may have taken bits away (never added): set it exactly.
    fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))
}

fn check_dir(dir: &Path, meta: &fs::Metadata) -> Result<(), DataDirError> {
    let path = dir.display().to_string();
    if !meta.is_dir() {
        return Err(DataDirError::NotDir { path });
    }
    if let Some(me) = process_uid()
        && meta.uid() != me
    {
        return Err(DataDirError::Owner {
            path,
            owner: meta.uid(),
            me,
        });
    }
    check_mode("data directory", dir, meta.mode(), DIR_MODE)
}

/// Refuses `path` (when it exists) if group or others may use it. `what`
/// names it in the error ("secret file", "--ca-key file").
pub fn check_secret_file(path: &Path, what: &'static str) -> Result<(), DataDirError> {
    match fs::metadata(path) {
        Ok(meta) => check_mode(what, path, meta.mode(), SECRET_MODE),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("reading", path)(e)),
    }
}

/// Reads a secret file an operator points at, after checking its mode.
pub fn read_secret_file(path: &Path, what: &'static str) -> Result<String, DataDirError> {
    check_secret_file(path, what)?;
    fs::read_to_string(path).map_err(io_err("reading", path))
}

fn check_mode(what: &'static str, path: &Path, mode: u32, fix: u32) -> Result<(), DataDirError> {
    if mode & 0o077 == 0 {
        return Ok(());
    }
    Err(DataDirError::Mode {
        what,
        path: path.display().to_string(),
        mode: mode & 0o7777,
        fix,
    })
}

/// The process's effective uid: the owner of `/proc/self`.
fn process_uid() -> Option<u32> {
    fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// Creates `path` empty and 0600 if it does not exist (so a library that
/// creates its file with the umask's mode, as redb does, finds it made).
pub fn create_secret_file(path: &Path) -> io::Result<()> {
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(SECRET_MODE)
        .open(path)
    {
        Ok(_) => fs::set_permissions(path, fs::Permissions::from_mode(SECRET_MODE)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Writes a secret file (0600).
pub fn write_secret(path: &Path, contents: &[u8]) -> io::Result<()> {
    write_file(path, contents, SECRET_MODE)
}

/// Writes `path` with exactly `mode`: into a temp file beside it, synced,
/// renamed over it and the directory synced, so a reader never sees half a
/// file and a crash never loses one that was reported written.
pub fn write_file(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    create_dir(dir)?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other("no file name"))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    f.write_all(contents)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn a_new_data_dir_and_its_files_are_private() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b");
        prepare(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        let secret = dir.join("admin.token");
        write_secret(&secret, b"s3cret\n").unwrap();
        assert_eq!(mode(&secret), 0o600);
        assert_eq!(fs::read(&secret).unwrap(), b"s3cret\n");
        // Rewriting replaces contents and keeps the mode; no temp file left.
        write_secret(&secret, b"other\n").unwrap();
        assert_eq!(fs::read(&secret).unwrap(), b"other\n");
        let public = dir.join("ca.pem");
        write_file(&public, b"cert", PUBLIC_MODE).unwrap();
        assert_eq!(mode(&public), 0o644);
        let store = dir.join("store.redb");
        create_secret_file(&store).unwrap();
        assert_eq!(mode(&store), 0o600);
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
        // Everything is as the checks want it.
        prepare(&dir).unwrap();
    }

    #[test]
    fn open_dirs_and_files_are_refused_naming_path_mode_and_fix() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("data");
        prepare(&dir).unwrap();
        for bad in [0o755, 0o750, 0o701, 0o770] {
            fs::set_permissions(&dir, fs::Permissions::from_mode(bad)).unwrap();
            let err = prepare(&dir).unwrap_err().to_string();
            let path = dir.display().to_string();
            assert!(err.contains(&format!("{path} is mode {bad:04o}")), "{err}");
            assert!(err.contains(&format!("chmod 700 {path}")), "{err}");
        }
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        for name in SECRET_FILES {
            let file = dir.join(name);
            write_secret(&file, b"x").unwrap();
            for bad in [0o644, 0o640, 0o604, 0o660] {
                fs::set_permissions(&file, fs::Permissions::from_mode(bad)).unwrap();
                let err = prepare(&dir).unwrap_err().to_string();
                let path = file.display().to_string();
                assert!(err.contains(&format!("{path} is mode {bad:04o}")), "{err}");
                assert!(err.contains(&format!("chmod 600 {path}")), "{err}");
            }
            fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
        }
        // An operator's key file is checked (and read) the same way.
        let key = root.path().join("ca-key.pem");
        fs::write(&key, "key").unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_secret_file(&key, "--ca-key file")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("--ca-key file "), "{err}");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(read_secret_file(&key, "--ca-key file").unwrap(), "key");
        // A file where the directory should be.
        let err = prepare(&key).unwrap_err();
        assert!(matches!(err, DataDirError::NotDir { .. }), "{err}");
    }
}
