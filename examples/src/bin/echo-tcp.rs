//! `echo-tcp`: the TCP demo backend. Every connection first receives the
//! line `<id>\n`, then gets back every byte it sends; when the client shuts
//! down its write side, the server finishes echoing and shuts down its own,
//! so a half-close is visible end to end.
//!
//! Prints `echo-tcp listening: tcp=ADDR` once bound (port 0 picks one),
//! then serves until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// Flags. Every flag also reads an env var so containers can configure it.
#[derive(Debug, Parser)]
#[command(version, about = "TCP echo service for ISDP demos and tests")]
struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, env = "ECHO_LISTEN", default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    /// Instance id sent as the first line [default: <hostname>-<port>].
    #[arg(long, env = "ECHO_ID")]
    id: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    let id: Arc<str> = args
        .id
        .unwrap_or_else(|| isdp_examples::default_id(addr.port()))
        .into();
    isdp_examples::announce("echo-tcp", "tcp", addr)?;

    let shutdown = isdp_examples::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(echo(stream, id.clone()));
                }
                Err(e) => {
                    eprintln!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Greets with the id line, echoes until EOF, then closes the write side.
async fn echo(mut stream: TcpStream, id: Arc<str>) {
    let _ = stream.set_nodelay(true);
    let greeting = format!("{id}\n");
    if stream.write_all(greeting.as_bytes()).await.is_err() {
        return;
    }
    let (mut rd, mut wr) = stream.split();
    if tokio::io::copy(&mut rd, &mut wr).await.is_ok() {
        let _ = wr.shutdown().await;
    }
}
