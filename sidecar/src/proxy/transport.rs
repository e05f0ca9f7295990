//! How sidecars reach each other and accept each other's connections.
//!
//! Today this is plain TCP. It is the one place mTLS plugs in: the
//! connector gets wrapped by a TLS connector (the way hyper-rustls wraps
//! `HttpConnector`) and `accept` performs the server handshake; nothing on
//! the request path changes.

use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use tokio::net::TcpStream;

/// The connector every forwarding pool uses.
pub fn connector(connect_timeout: Duration) -> HttpConnector {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    c.set_connect_timeout(Some(connect_timeout));
    c.set_keepalive(Some(Duration::from_secs(60)));
    c
}

/// Opens a raw connection to a peer (TCP proxying).
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
