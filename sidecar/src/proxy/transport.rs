//! How sidecars reach each other and accept each other's connections.
//!
//! Today this is plain TCP. It is the one place mTLS plugs in: `connect`
//! gains a client handshake and the inbound accept a server one; the pools
//! in `forward` and the request path above them do not change.

use std::time::Duration;

use tokio::net::TcpStream;

/// Opens a connection to a peer or a local service, with Nagle off (the
/// proxy writes whole messages) and a bounded connect time.
pub async fn connect(addr: std::net::SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connecting to {addr} timed out"),
            )
        })??;
    stream.set_nodelay(true)?;
    Ok(stream)
}
