//! [`TcpGate`]: a TCP forwarder on loopback that a test cuts and heals,
//! to partition one process from another without root (no network
//! namespace, no firewall rule): point the process at the gate instead
//! of its peer.
//!
//! Cut, the gate closes every connection it carries and closes new ones
//! as they arrive, so the process sees its peer unreachable (its
//! reconnect attempts fail at once) while every other client of the peer
//! still reaches it. Healed, new connections are carried again.

use std::net::SocketAddr;

use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub struct TcpGate {
    addr: SocketAddr,
    open: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl TcpGate {
    /// A gate to `target`, open, on a port of its own.
    pub async fn start(target: SocketAddr) -> Self {
        Self::start_on(std::net::Ipv4Addr::LOCALHOST.into(), target).await
    }

    /// A gate to `target` listening on `ip` (a [`NetNs`](crate::NetNs)
    /// link's host end, for a process inside the namespace).
    pub async fn start_on(ip: std::net::IpAddr, target: SocketAddr) -> Self {
        let listener = TcpListener::bind((ip, 0)).await.expect("bind the gate");
        let addr = listener.local_addr().expect("gate address");
        let (open, watch_open) = watch::channel(true);
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let mut open = watch_open.clone();
                if !*open.borrow_and_update() {
                    drop(client);
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut upstream) = TcpStream::connect(target).await else {
                        return;
                    };
                    let mut client = client;
                    tokio::select! {
                        _ = copy_bidirectional(&mut client, &mut upstream) => {}
                        _ = open.wait_for(|o| !*o) => {}
                    }
                });
            }
        });
        TcpGate { addr, open, task }
    }

    /// Where the partitioned process connects instead of its peer.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Partitions: every carried connection is closed, and new ones too.
    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    /// Heals the partition: new connections are carried again.
    pub fn heal(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for TcpGate {
    fn drop(&mut self) {
        self.task.abort();
    }
}
