//! The sidecar's DNS server (`dns_listen`) as `dig` sees it: A and SRV
//! records of the healthy instances of an upstream, their targets resolving
//! on their own, NXDOMAIN and REFUSED, TC on a UDP answer too big for 512
//! bytes and dig's retry over TCP, a dead instance gone from the answers
//! within the health-check time, a standby's address given only once the
//! instances above it are down, and malformed packets answered FORMERR
//! (or not at all) while the server keeps serving, TCP connections past
//! `dns_max_tcp_connections` closed.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use isdp_tests::{ControlPlane, ControlPlaneOpts, EchoHttp, SidecarToml, dig, eventually, http};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// The health contract: a dead instance is seen within 2 s.
const DETECT: Duration = Duration::from_secs(2);
/// Instances of `many`: 40 A records (16 bytes each) overflow 512 bytes.
const MANY: u16 = 40;

fn addresses(out: &str, record: &str) -> BTreeSet<String> {
    dig::answers(out)
        .into_iter()
        .filter(|(t, _)| t == record)
        .map(|(_, data)| data)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_reads_healthy_instances_and_retries_big_answers_over_tcp() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let mut echoes = Vec::new();
    let mut ids = Vec::new();
    for n in 0..3u8 {
        let echo = EchoHttp::start(&format!("payments-{n}")).await;
        let check = echo.health_url();
        let address = format!("127.0.0.{}", 11 + n);
        let id = cp
            .register(
                "payments",
                &address,
                echo.port(),
                &["--check", &check, "--interval", "200ms"],
            )
            .await;
        ids.push((id, address, echo.port()));
        echoes.push(echo);
    }
    for n in 0..MANY {
        cp.register("many", &format!("127.0.1.{}", n + 1), 8000 + n, &[])
            .await;
    }
    let sc = SidecarToml::new("web", &cp.grpc_url())
        .upstream("payments")
        .upstream("many")
        .dns("dns_max_answers = 64\ndns_ttl = \"0s\"")
        .start()
        .await;
    let dns = sc.dns_addr().to_owned();

    // A: the three addresses, authoritative, TTL 0.
    let all: BTreeSet<String> = ids.iter().map(|(_, a, _)| a.clone()).collect();
    eventually(Duration::from_secs(10), "three A records", || async {
        let out = dig::run(&dns, &["payments.service.isdp", "A"]).await;
        anyhow::ensure!(dig::status(&out) == Some("NOERROR"), "{out}");
        anyhow::ensure!(addresses(&out, "A") == all, "{out}");
        Ok(())
    })
    .await;
    let out = dig::run(&dns, &["payments.service.isdp", "A"]).await;
    assert!(out.contains(" aa"), "not authoritative: {out}");
    assert!(out.contains("\t0\tIN\tA\t"), "TTL not 0: {out}");

    // SRV: each instance's port, its target's address in the additional
    // section, and the target resolving on its own.
    let out = dig::run(&dns, &["payments.service.isdp", "SRV"]).await;
    let srv: BTreeSet<String> = addresses(&out, "SRV");
    let want: BTreeSet<String> = ids
        .iter()
        .map(|(id, _, port)| format!("0 1 {port} {id}.instance.isdp."))
        .collect();
    assert_eq!(srv, want, "{out}");
    let extra: BTreeSet<String> = dig::additionals(&out)
        .into_iter()
        .filter(|(t, _)| t == "A")
        .map(|(_, d)| d)
        .collect();
    assert_eq!(extra, all, "{out}");
    let (id, address, _) = &ids[0];
    let out = dig::run(&dns, &[&format!("{id}.instance.isdp"), "A"]).await;
    assert_eq!(addresses(&out, "A"), [address.clone()].into(), "{out}");

    // Names that are not instances, and names outside the domain.
    let out = dig::run(&dns, &["payments.service.isdp", "AAAA"]).await;
    assert_eq!(dig::status(&out), Some("NOERROR"), "{out}");
    assert!(dig::answers(&out).is_empty(), "{out}");
    let out = dig::run(&dns, &["nope.service.isdp", "A"]).await;
    assert_eq!(dig::status(&out), Some("NXDOMAIN"), "{out}");
    let out = dig::run(&dns, &["example.com", "A"]).await;
    assert_eq!(dig::status(&out), Some("REFUSED"), "{out}");

    // 40 A records do not fit 512 bytes: TC over UDP, all of them over
    // the TCP retry dig makes by itself.
    eventually(Duration::from_secs(10), "all of many", || async {
        let out = dig::run(&dns, &["many.service.isdp", "A", "+noedns"]).await;
        anyhow::ensure!(out.contains("Truncated, retrying in TCP mode"), "{out}");
        anyhow::ensure!(addresses(&out, "A").len() == usize::from(MANY), "{out}");
        Ok(())
    })
    .await;
    let out = dig::run(&dns, &["many.service.isdp", "A", "+noedns", "+ignore"]).await;
    assert!(out.contains(" tc"), "no TC flag: {out}");
    assert!(dig::answers(&out).is_empty(), "{out}");
    let out = dig::run(&dns, &["many.service.isdp", "A", "+tcp"]).await;
    assert_eq!(addresses(&out, "A").len(), usize::from(MANY), "{out}");

    // A dead instance leaves the answers within the health-check time.
    let (_, victim, _) = ids[1].clone();
    let killed = Instant::now();
    echoes[1].kill9().await;
    eventually(DETECT * 2, "dead instance gone from DNS", || async {
        let out = dig::run(&dns, &["payments.service.isdp", "A"]).await;
        let seen = addresses(&out, "A");
        anyhow::ensure!(seen.len() == 2 && !seen.contains(&victim), "{out}");
        Ok(())
    })
    .await;
    let gone = killed.elapsed();
    eprintln!("dead instance gone from DNS answers after {gone:?}");
    assert!(gone <= DETECT, "dead instance answered for {gone:?}");

    let metrics = http::get(sc.admin_addr(), "/metrics")
        .await
        .expect("metrics");
    assert!(
        metrics
            .body
            .contains("isdp_dns_queries_total{type=\"A\",rcode=\"NXDOMAIN\"} 1"),
        "{}",
        metrics.body
    );
}

/// A query for `payments.service.isdp` A with id `id`.
/// A and AAAA answers hold the best priority level only (an address
/// client cannot fail over by level); SRV holds every level, each with its
/// priority. When the primary dies its standby's address takes its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_is_in_address_answers_only_once_the_primary_is_down() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let mut primary = EchoHttp::start("db-primary").await;
    let standby = EchoHttp::start("db-standby").await;
    let check = |e: &EchoHttp| e.health_url();
    let (p, s) = (check(&primary), check(&standby));
    let primary_id = cp
        .register(
            "db",
            "127.0.0.21",
            primary.port(),
            &["--check", &p, "--interval", "200ms"],
        )
        .await;
    let standby_id = cp
        .register(
            "db",
            "127.0.0.22",
            standby.port(),
            &["--check", &s, "--interval", "200ms", "--priority", "1"],
        )
        .await;
    let sc = SidecarToml::new("web", &cp.grpc_url())
        .upstream("db")
        .dns("dns_ttl = \"0s\"")
        .start()
        .await;
    let dns = sc.dns_addr().to_owned();
    let a_is = |want: &'static str| {
        let dns = dns.clone();
        async move {
            let out = dig::run(&dns, &["db.service.isdp", "A"]).await;
            anyhow::ensure!(addresses(&out, "A") == [want.to_owned()].into(), "{out}");
            Ok(())
        }
    };
    eventually(Duration::from_secs(10), "the primary's address", || {
        a_is("127.0.0.21")
    })
    .await;
    let out = dig::run(&dns, &["db.service.isdp", "SRV"]).await;
    let want: BTreeSet<String> = [
        format!("0 1 {} {primary_id}.instance.isdp.", primary.port()),
        format!("1 1 {} {standby_id}.instance.isdp.", standby.port()),
    ]
    .into();
    assert_eq!(addresses(&out, "SRV"), want, "{out}");

    primary.kill9().await;
    eventually(DETECT * 2, "the standby's address", || a_is("127.0.0.22")).await;
}

fn query(id: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in ["payments", "service", "isdp"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// (id, rcode) of a response.
fn head(reply: &[u8]) -> (u16, u8) {
    (u16::from_be_bytes([reply[0], reply[1]]), reply[3] & 0x0f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_get_formerr_or_nothing_and_the_server_keeps_serving() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let echo = EchoHttp::start("payments-0").await;
    cp.register("payments", "127.0.0.1", echo.port(), &[]).await;
    let sc = SidecarToml::new("web", &cp.grpc_url())
        .upstream("payments")
        .dns("dns_max_tcp_connections = 2")
        .start()
        .await;
    let dns = sc.dns_addr().to_owned();
    eventually(Duration::from_secs(10), "an A record", || async {
        let out = dig::run(&dns, &["payments.service.isdp", "A"]).await;
        anyhow::ensure!(addresses(&out, "A").len() == 1, "{out}");
        Ok(())
    })
    .await;

    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp.connect(&dns).await.unwrap();
    let mut buf = [0u8; 2048];
    let mut next_reply = async |udp: &UdpSocket| {
        let n = tokio::time::timeout(Duration::from_secs(2), udp.recv(&mut buf))
            .await
            .expect("a reply within 2 s")
            .unwrap();
        head(&buf[..n])
    };
    // Shorter than a header, and a response: no answer. The reply that
    // comes is the next query's.
    udp.send(&[0xab, 0xcd, 0x01]).await.unwrap();
    let mut response = query(0x1111);
    response[2] |= 0x80;
    udp.send(&response).await.unwrap();
    udp.send(&query(7)).await.unwrap();
    assert_eq!(next_reply(&udp).await, (7, 0));
    // Garbage after a header; no question; two questions promised, one
    // sent: FORMERR (1) with the id.
    udp.send(b"\x00\x08\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff\xfe\xfd")
        .await
        .unwrap();
    assert_eq!(next_reply(&udp).await, (8, 1));
    udp.send(b"\x00\x09\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    assert_eq!(next_reply(&udp).await, (9, 1));
    let mut two = query(10);
    two[5] = 2;
    udp.send(&two).await.unwrap();
    assert_eq!(next_reply(&udp).await, (10, 1));

    // TCP: garbage gets FORMERR and the connection keeps serving.
    let mut tcp = TcpStream::connect(&dns).await.unwrap();
    let garbage = b"\x00\x0b\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff";
    let mut framed = (garbage.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(garbage);
    let q = query(12);
    framed.extend_from_slice(&(q.len() as u16).to_be_bytes());
    framed.extend_from_slice(&q);
    tcp.write_all(&framed).await.unwrap();
    for want in [(11, 1), (12, 0)] {
        let len = tcp.read_u16().await.unwrap();
        let mut reply = vec![0u8; usize::from(len)];
        tcp.read_exact(&mut reply).await.unwrap();
        assert_eq!(head(&reply), want);
    }

    // dns_max_tcp_connections = 2: a second connection, announcing 64 KiB
    // and sending nothing, takes the last place; a third is closed.
    let mut idle = TcpStream::connect(&dns).await.unwrap();
    idle.write_all(&[0xff, 0xff]).await.unwrap();
    let mut third = TcpStream::connect(&dns).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), third.read(&mut [0u8; 2]))
        .await
        .expect("the third connection is closed at once");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");

    // And dig is still answered.
    let out = dig::run(&dns, &["payments.service.isdp", "A"]).await;
    assert_eq!(
        addresses(&out, "A"),
        ["127.0.0.1".to_owned()].into(),
        "{out}"
    );
    let metrics = http::get(sc.admin_addr(), "/metrics")
        .await
        .expect("metrics");
    assert!(
        metrics
            .body
            .contains("isdp_dns_queries_total{type=\"none\",rcode=\"FORMERR\"} 4"),
        "{}",
        metrics.body
    );
}
