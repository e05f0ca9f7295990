//! The sidecar's listeners bound what a client can hold (the `[limits]`
//! table), set short here so each bound shows within a test: a request
//! head that never ends (slowloris) is cut off at `header_read_timeout` on
//! the outbound, inbound and admin listeners; a keep-alive connection
//! idles for `http_idle_timeout`, not the header timeout; a connection
//! past `max_connections` is closed as it is accepted, counted, and logged
//! once; TLS handshakes past `max_tls_handshakes` are refused on the
//! inbound listener; and a silent TCP tunnel or WebSocket is closed after
//! `tcp_idle_timeout`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use isdp_tests::{
    ControlPlane, ControlPlaneOpts, EchoHttp, EchoTcp, Sidecar, SidecarToml, eventually,
};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::mtls::{SERVICE, SETUP, counter, mesh_identity_under, tls::roots};

/// The header timeout every test here configures.
const HEADER: Duration = Duration::from_secs(1);

async fn control_plane() -> ControlPlane {
    ControlPlane::start(ControlPlaneOpts::default()).await
}

/// `payments` (echo-http `pay-0`) behind its sidecar with these `[limits]`
/// keys; waits until the sidecar answers a mesh caller (`web`'s
/// certificate) on its inbound port, so its policy and certificate are in.
async fn payments_with(cp: &ControlPlane, limits: &str) -> (EchoHttp, Sidecar) {
    let echo = EchoHttp::start("pay-0").await;
    let pay = SidecarToml::new("pay-0", &cp.grpc_url())
        .raw(&format!(
            "[[service]]\nname = \"{SERVICE}\"\nport = {port}\nprotocol = \"http\"\n\
             check = \"{check}\"\ninterval = \"200ms\"\n",
            port = echo.port(),
            check = echo.health_url(),
        ))
        .limits(limits)
        .start()
        .await;
    (echo, pay)
}

/// A TLS connection to `pay`'s inbound port as the mesh service `web`,
/// offering HTTP/1.1.
async fn mesh_tls(
    cp: &ControlPlane,
    pay: &Sidecar,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let (chain, key) = mesh_identity_under(cp, "web", 300, cp.admin_token()).await;
    let ca = std::fs::read_to_string(cp.ca_file())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(&ca))
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(pay.inbound_addr()).await?;
    let name = ServerName::try_from(format!("{SERVICE}.svc.isdp.local"))?;
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?)
}

/// Sends a request head one byte per 200 ms, never finishing it (after
/// its first line, one header value grows forever), until the server
/// closes the connection; how long after `since` it did. Panics if the
/// server answers anything, or keeps the connection past `limit`.
async fn trickle_until_closed<S>(mut conn: S, since: Instant, limit: Duration) -> Duration
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let head = b"GET / HTTP/1.1\r\nHost: payments\r\nx-slow: ";
    let mut bytes = head.iter().copied().chain(std::iter::repeat(b'a'));
    let mut buf = [0u8; 512];
    loop {
        assert!(
            since.elapsed() < limit,
            "a trickled head was still open after {limit:?}"
        );
        let byte = bytes.next().expect("endless");
        if conn.write_all(&[byte]).await.is_err() || conn.flush().await.is_err() {
            return since.elapsed();
        }
        match timeout(Duration::from_millis(200), conn.read(&mut buf)).await {
            Err(_) => {}
            Ok(Ok(0)) | Ok(Err(_)) => return since.elapsed(),
            Ok(Ok(n)) => panic!(
                "the server answered a head that never ended: {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
        }
    }
}

/// Asserts a trickled head on `conn`, accepted at `since`, is closed at
/// the header timeout: not before it, and well before it again.
async fn cut_off_at_the_header_timeout<S>(conn: S, since: Instant, listener: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let after = trickle_until_closed(conn, since, HEADER * 5).await;
    assert!(
        after >= HEADER - Duration::from_millis(100) && after < HEADER * 4,
        "{listener}: a trickled head was closed after {after:?}, for a {HEADER:?} header timeout"
    );
}

/// A request head that never ends (one byte every 200 ms, as slowloris
/// sends) is cut off at the header timeout on the outbound, inbound
/// (after an mTLS handshake as a mesh peer) and admin listeners, and
/// counted per listener; a keep-alive connection between requests is held
/// to the idle timeout instead, and closed at it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_off_at_the_header_timeout_on_every_listener() {
    let cp = control_plane().await;
    let (_echo, pay) = payments_with(
        &cp,
        "header_read_timeout = \"1s\"\nhttp_idle_timeout = \"3s\"",
    )
    .await;
    eventually(SETUP, "pay answers a mesh peer", || async {
        let mut conn = mesh_tls(&cp, &pay).await?;
        conn.write_all(b"GET / HTTP/1.1\r\nHost: payments\r\nConnection: close\r\n\r\n")
            .await?;
        let mut answer = Vec::new();
        timeout(Duration::from_secs(5), conn.read_to_end(&mut answer)).await??;
        anyhow::ensure!(
            answer.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
        Ok(())
    })
    .await;

    for (listener, addr) in [
        ("outbound", pay.outbound_addr()),
        ("admin", pay.admin_addr()),
    ] {
        let conn = TcpStream::connect(addr).await.unwrap();
        cut_off_at_the_header_timeout(conn, Instant::now(), listener).await;
    }
    // Inbound, the head's clock starts once the handshake is done.
    let conn = mesh_tls(&cp, &pay).await.unwrap();
    cut_off_at_the_header_timeout(conn, Instant::now(), "inbound").await;
    for listener in ["outbound", "admin", "inbound"] {
        let labels = format!("listener=\"{listener}\",reason=\"header-timeout\"");
        let n = counter(&pay, "isdp_listener_connections_timed_out_total", &labels).await;
        assert!(n >= 1.0, "{labels}: {n}");
    }

    // Keep-alive: waiting past the header timeout between requests is
    // allowed; past the idle timeout the connection is closed.
    let mut conn = TcpStream::connect(pay.admin_addr()).await.unwrap();
    let live = b"GET /live HTTP/1.1\r\nHost: admin\r\n\r\n";
    let mut buf = [0u8; 1024];
    for _ in 0..2 {
        conn.write_all(live).await.unwrap();
        let n = timeout(Duration::from_secs(5), conn.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
        tokio::time::sleep(HEADER + Duration::from_millis(500)).await;
    }
    let idle_since = Instant::now() - (HEADER + Duration::from_millis(500));
    let n = timeout(Duration::from_secs(10), conn.read(&mut buf))
        .await
        .expect("the idle connection was closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "{}", String::from_utf8_lossy(&buf[..n]));
    let idle = idle_since.elapsed();
    assert!(
        idle >= Duration::from_millis(2800) && idle < Duration::from_secs(8),
        "closed after {idle:?} idle, for a 3 s idle timeout"
    );
    let n = counter(
        &pay,
        "isdp_listener_connections_timed_out_total",
        "listener=\"admin\",reason=\"idle-timeout\"",
    )
    .await;
    assert!(n >= 1.0, "admin idle timeouts: {n}");
}

/// Whether the server closes `conn` at once (within a second), reading
/// nothing from it.
async fn closed_at_once(conn: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        timeout(Duration::from_secs(1), conn.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// The value of a gauge or counter line `name{labels}` on `/metrics`.
async fn metric(sidecar: &Sidecar, name: &str, labels: &str) -> f64 {
    counter(sidecar, &format!("{name}{{"), labels).await
}

/// With `max_connections` connections open on a listener, the next ones
/// are closed as they are accepted, counted in `/metrics`, and logged in
/// one line however many come; once one ends, the next is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_closed_counted_and_logged_once() {
    let cp = control_plane().await;
    let mut web = SidecarToml::new("web", &cp.grpc_url())
        .limits("max_connections = 3\nheader_read_timeout = \"60s\"")
        .start()
        .await;
    let outbound = web.outbound_addr().to_owned();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(&outbound).await.unwrap());
    }
    eventually(SETUP, "3 connections open on outbound", || async {
        let open = metric(&web, "isdp_listener_connections", "listener=\"outbound\"").await;
        anyhow::ensure!(open == 3.0, "open: {open}");
        Ok(())
    })
    .await;
    for i in 0..5 {
        let mut conn = TcpStream::connect(&outbound).await.unwrap();
        assert!(
            closed_at_once(&mut conn).await,
            "connection {} over the cap was served",
            i + 4
        );
    }
    let refused = metric(
        &web,
        "isdp_listener_connections_refused_total",
        "listener=\"outbound\",reason=\"max-connections\"",
    )
    .await;
    assert_eq!(refused, 5.0);
    let log = web.process().stderr();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("connection refused: limits.max_connections (3) reached"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].contains("listener=outbound"), "{}", lines[0]);

    drop(held.pop());
    eventually(SETUP, "a place is free again", || async {
        let mut conn = TcpStream::connect(&outbound).await?;
        conn.write_all(b"GET / HTTP/1.1\r\nHost: nowhere\r\nConnection: close\r\n\r\n")
            .await?;
        let mut answer = Vec::new();
        timeout(Duration::from_secs(2), conn.read_to_end(&mut answer)).await??;
        anyhow::ensure!(
            answer.starts_with(b"HTTP/1.1 404"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
        Ok(())
    })
    .await;
}

/// The inbound listener runs at most `max_tls_handshakes` handshakes at
/// once: clients that connect and never finish one hold those places, the
/// next connection is closed at once and counted; when a place frees, a
/// mesh peer gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_handshakes_over_the_cap_are_closed_on_the_inbound_listener() {
    let cp = control_plane().await;
    let (_echo, pay) = payments_with(&cp, "max_tls_handshakes = 2").await;
    eventually(SETUP, "pay's inbound completes a handshake", || async {
        mesh_tls(&cp, &pay).await.map(drop)
    })
    .await;
    let inbound = pay.inbound_addr().to_owned();
    let mut stalled = Vec::new();
    for _ in 0..2 {
        stalled.push(TcpStream::connect(&inbound).await.unwrap());
    }
    eventually(SETUP, "2 handshakes in progress", || async {
        let n = metric(&pay, "isdp_listener_tls_handshakes", "listener=\"inbound\"").await;
        anyhow::ensure!(n == 2.0, "handshakes: {n}");
        Ok(())
    })
    .await;
    let mut third = TcpStream::connect(&inbound).await.unwrap();
    assert!(
        closed_at_once(&mut third).await,
        "a third handshake was started"
    );
    assert!(
        mesh_tls(&cp, &pay).await.is_err(),
        "a mesh peer got a place"
    );
    let refused = metric(
        &pay,
        "isdp_listener_connections_refused_total",
        "listener=\"inbound\",reason=\"max-tls-handshakes\"",
    )
    .await;
    assert_eq!(refused, 2.0);

    drop(stalled.pop());
    eventually(SETUP, "a mesh peer gets through again", || async {
        mesh_tls(&cp, &pay).await.map(drop)
    })
    .await;
}

/// A TCP connection through `web` to the `ledger` echo behind its sidecar
/// is closed once nothing moved either way for `tcp_idle_timeout` (on
/// `web`, outbound), and stays open while bytes move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_tcp_tunnel_is_closed_after_its_idle_timeout() {
    const IDLE: Duration = Duration::from_secs(1);
    let cp = control_plane().await;
    let echo = EchoTcp::start("tcp-0").await;
    let _backend = SidecarToml::new("tcp-0", &cp.grpc_url())
        .raw(&format!(
            "[[service]]\nname = \"ledger\"\nport = {}\nprotocol = \"tcp\"\n\
             check = \"{}\"\ninterval = \"200ms\"\n",
            echo.port(),
            echo.health_target()
        ))
        .start()
        .await;
    let web = SidecarToml::new("web", &cp.grpc_url())
        .upstream_on_port0("ledger", "tcp", "round_robin")
        .limits("tcp_idle_timeout = \"1s\"")
        .start()
        .await;
    let addr = web.upstream_addr("ledger").to_owned();
    /// A connection through web, once the echo's id line came back.
    async fn open(addr: &str) -> anyhow::Result<BufReader<TcpStream>> {
        let mut conn = BufReader::new(TcpStream::connect(addr).await?);
        let mut line = String::new();
        timeout(Duration::from_secs(2), conn.read_line(&mut line)).await??;
        anyhow::ensure!(line == "tcp-0\n", "first line {line:?}");
        Ok(conn)
    }
    eventually(SETUP, "web reaches ledger", || async {
        open(&addr).await.map(drop)
    })
    .await;
    let mut chatty = open(&addr).await.unwrap();
    let mut silent = open(&addr).await.unwrap();
    let silent_since = Instant::now();

    // Bytes every 300 ms for three idle timeouts keep a tunnel open.
    let mut buf = [0u8; 1];
    for i in 0..10u8 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        chatty.write_all(&[b'0' + i]).await.unwrap();
        timeout(Duration::from_secs(2), chatty.read_exact(&mut buf))
            .await
            .expect("the echo within 2 s")
            .expect("the chatty tunnel stayed open");
        assert_eq!(buf[0], b'0' + i);
    }
    // The silent one was closed about a second after its last byte.
    let n = timeout(Duration::from_secs(5), silent.read(&mut buf))
        .await
        .expect("the silent tunnel was closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "read {:?}", &buf[..n]);
    let after = silent_since.elapsed();
    assert!(after >= IDLE, "closed after {after:?}");
    let n = metric(
        &web,
        "isdp_tcp_idle_timeouts_total",
        "direction=\"outbound\",kind=\"tcp\"",
    )
    .await;
    assert!(n >= 1.0, "outbound tcp idle timeouts: {n}");
}

/// A WebSocket through two sidecars is closed once silent for the
/// receiving sidecar's `tcp_idle_timeout` (an inbound upgrade), and stays
/// open while messages flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_websocket_is_closed_after_the_idle_timeout() {
    use tokio_tungstenite::tungstenite::Message;
    let cp = control_plane().await;
    let (_echo, pay) = payments_with(&cp, "tcp_idle_timeout = \"1s\"").await;
    let web = SidecarToml::new("web", &cp.grpc_url())
        .upstream_on_port0(SERVICE, "http", "round_robin")
        .start()
        .await;
    let url = format!("ws://{}/ws", web.upstream_addr(SERVICE));
    let connect = || async {
        let connected = timeout(
            Duration::from_secs(5),
            tokio_tungstenite::connect_async(url.as_str()),
        )
        .await;
        anyhow::Ok(connected??.0)
    };
    eventually(SETUP, "a WebSocket through the mesh", || async {
        connect().await.map(drop)
    })
    .await;
    let mut ws = connect().await.unwrap();
    for i in 0..8 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let text = format!("message {i}");
        ws.send(Message::text(text.clone())).await.expect("send");
        let echo = timeout(Duration::from_secs(2), ws.next())
            .await
            .expect("an echo within 2 s")
            .expect("the socket stayed open")
            .expect("an echo frame");
        assert_eq!(echo, Message::text(text));
    }
    let silent_since = Instant::now();
    let end = timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("the silent WebSocket was closed");
    assert!(
        !matches!(end, Some(Ok(Message::Text(_) | Message::Binary(_)))),
        "{end:?}"
    );
    assert!(silent_since.elapsed() >= Duration::from_millis(700));
    let n = metric(
        &pay,
        "isdp_tcp_idle_timeouts_total",
        "direction=\"inbound\",kind=\"upgrade\"",
    )
    .await;
    assert!(n >= 1.0, "inbound upgrade idle timeouts: {n}");
}
