//! The relay's socket: a loopback TCP port, or a unix socket whose mode
//! is 0660 from the moment it can be reached.
//!
//! A unix socket is bound in a private (0700) staging directory beside
//! its path, given its mode there, then renamed into place, so no umask
//! ever leaves it open to others, even briefly. Its group is the
//! sidecar's: the operator admits a local user by that group (`0600`
//! would leave clients running as another user only the loopback port,
//! which every local user can reach). A stale socket left by a sidecar
//! that died is replaced; a live one (something answers on it) or a file
//! that is not a socket is refused. The socket is removed when the
//! listener is dropped, if it is still the one this listener made.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::config::RelayListen;

/// The mode of the relay's unix socket: its user and group may connect.
pub const UNIX_SOCKET_MODE: u32 = 0o660;

/// Why the relay's listener could not be made; names the key.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("bind xds_relay_listen {listen}: {source}")]
    Io { listen: String, source: io::Error },
    #[error("xds_relay_listen {listen}: {reason}")]
    Refused { listen: String, reason: String },
}

/// The bound listener.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixSocket),
}

/// A unix listener and the file it owns.
pub struct UnixSocket {
    listener: UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket file made, so only it is removed.
    file: (u64, u64),
}

/// One accepted connection.
pub(super) enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

// === impl Listener ===

impl Listener {
    pub async fn bind(listen: &RelayListen) -> Result<Self, BindError> {
        let io = |source| BindError::Io {
            listen: listen.to_string(),
            source,
        };
        match listen {
            RelayListen::Tcp(addr) => TcpListener::bind(addr).await.map(Listener::Tcp).map_err(io),
            RelayListen::Unix(path) => bind_unix(path).map(Listener::Unix),
        }
    }

    /// Where it listens, as the `listening:` line and `/config` show it:
    /// `127.0.0.1:PORT` (the port bound) or `unix:/PATH`.
    pub fn local(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|e| format!("<{e}>"), |a: SocketAddr| a.to_string()),
            Listener::Unix(u) => format!("unix:{}", u.path.display()),
        }
    }

    /// The next connection and who made it: the peer's address, or on a
    /// unix socket its uid (from the kernel, `SO_PEERCRED`).
    pub(super) async fn accept(&self) -> io::Result<(Conn, String)> {
        match self {
            Listener::Tcp(l) => {
                let (stream, peer) = l.accept().await?;
                let _ = stream.set_nodelay(true);
                Ok((Conn::Tcp(stream), peer.to_string()))
            }
            Listener::Unix(u) => {
                let (stream, _) = u.listener.accept().await?;
                let peer = stream
                    .peer_cred()
                    .map_or_else(|_| "unix".to_owned(), |c| format!("unix uid {}", c.uid()));
                Ok((Conn::Unix(stream), peer))
            }
        }
    }
}

impl Drop for UnixSocket {
    fn drop(&mut self) {
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.file);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn bind_unix(path: &Path) -> Result<UnixSocket, BindError> {
    let listen = format!("unix:{}", path.display());
    let refused = |reason: String| BindError::Refused {
        listen: listen.clone(),
        reason,
    };
    let io = |source| BindError::Io {
        listen: listen.clone(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(refused(
                    "another process is serving on this socket".to_owned(),
                ));
            }
            // Stale, from a sidecar that did not stop cleanly: the rename
            // below replaces it.
        }
        Ok(_) => {
            return Err(refused(
                "exists and is not a socket; remove it or choose another path".to_owned(),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("/"));
    let staging = parent.join(format!(".isdp{}", std::process::id()));
    // A leftover of an earlier process with this pid: it is ours to clear.
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(io)?;
    let staged = staging.join("s");
    let bound = (|| {
        let listener = std::os::unix::net::UnixListener::bind(&staged)?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(UNIX_SOCKET_MODE))?;
        std::fs::rename(&staged, path)?;
        listener.set_nonblocking(true)?;
        let meta = std::fs::symlink_metadata(path)?;
        Ok::<_, io::Error>((listener, (meta.dev(), meta.ino())))
    })();
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&staging);
    let (listener, file) = bound.map_err(io)?;
    let listener = UnixListener::from_std(listener).map_err(io)?;
    Ok(UnixSocket {
        listener,
        path: path.to_owned(),
        file,
    })
}
