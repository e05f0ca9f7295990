//! What one ADS stream may make the control plane hold, log or show, with
//! the standard `envoy-types` ADS client against the real binary: names
//! per stream and type (refused ones included), streams per principal,
//! name bytes per principal across its streams, node ids, NACK texts in
//! `isdpctl proxy-status`, requests over the size limit, and the log
//! lines stream churn may cause. Each limit ends the stream with the status the README
//! names (RESOURCE_EXHAUSTED, INVALID_ARGUMENT) and a message naming it.

use std::{collections::HashMap, time::Duration};

use envoy_types::pb::{
    envoy::{
        config::core::v3::Node,
        service::discovery::v3::{
            DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        },
    },
    google::rpc::Status as RpcStatus,
};
use isdp_proto::v1::{SERVICE_ENDPOINTS_TYPE_URL as EPS, TRUST_BUNDLE_NAME, TRUST_BUNDLE_TYPE_URL};
use isdp_tests::{ControlPlane, ControlPlaneOpts, bearer, eventually};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};

const WAIT: Duration = Duration::from_secs(10);

async fn start(args: &[&str]) -> ControlPlane {
    ControlPlane::start(ControlPlaneOpts {
        extra_args: args.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    })
    .await
}

/// A join token for `web` that reads only `payments` besides its own.
async fn scoped_token(cp: &ControlPlane) -> String {
    scoped_token_with_id(cp).await.1
}

/// [`scoped_token`] and its id: (id, secret).
async fn scoped_token_with_id(cp: &ControlPlane) -> (String, String) {
    let t = cp
        .create_token(&[
            "--role",
            "join",
            "--service",
            "web",
            "--upstream",
            "payments",
        ])
        .await;
    (t.id, t.secret)
}

// === Streams ===

/// One ADS stream: requests go in through a channel, responses (or the
/// status that ends it) come out.
struct Ads<Req, Resp> {
    tx: mpsc::Sender<Req>,
    rx: Result<Streaming<Resp>, Status>,
}

impl<Req, Resp> Ads<Req, Resp> {
    async fn send(&self, req: Req) {
        self.tx.send(req).await.expect("the request stream is open");
    }

    /// The next response; panics on an error or silence.
    async fn next(&mut self, what: &str) -> Resp {
        let rx = self
            .rx
            .as_mut()
            .unwrap_or_else(|s| panic!("{what}: refused: {s}"));
        match tokio::time::timeout(WAIT, rx.message()).await {
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) => panic!("{what}: the stream ended"),
            Ok(Err(s)) => panic!("{what}: the stream failed: {s}"),
            Err(_) => panic!("{what}: no response within {WAIT:?}"),
        }
    }

    /// The status the stream ends with, refused on opening or after;
    /// panics on a response or a clean end.
    async fn error(&mut self, what: &str) -> Status {
        let rx = match &mut self.rx {
            Err(s) => return s.clone(),
            Ok(rx) => rx,
        };
        match tokio::time::timeout(WAIT, rx.message()).await {
            Ok(Err(s)) => s,
            Ok(Ok(Some(_))) => panic!("{what}: expected the stream to fail, got a response"),
            Ok(Ok(None)) => panic!("{what}: expected the stream to fail, it ended with OK"),
            Err(_) => panic!("{what}: expected the stream to fail within {WAIT:?}"),
        }
    }
}

type Delta = Ads<DeltaDiscoveryRequest, DeltaDiscoveryResponse>;
type Sotw = Ads<DiscoveryRequest, DiscoveryResponse>;

async fn delta(cp: &ControlPlane, token: &str, first: DeltaDiscoveryRequest) -> Delta {
    let (tx, rx) = mpsc::channel(16);
    tx.send(first).await.expect("queue the first request");
    let mut client =
        AggregatedDiscoveryServiceClient::with_interceptor(cp.channel().await, bearer(token));
    let rx = tokio::time::timeout(
        WAIT,
        client.delta_aggregated_resources(ReceiverStream::new(rx)),
    )
    .await
    .expect("DeltaAggregatedResources answered")
    .map(tonic::Response::into_inner);
    Ads { tx, rx }
}

async fn sotw(cp: &ControlPlane, token: &str, first: DiscoveryRequest) -> Sotw {
    let (tx, rx) = mpsc::channel(16);
    tx.send(first).await.expect("queue the first request");
    let mut client =
        AggregatedDiscoveryServiceClient::with_interceptor(cp.channel().await, bearer(token));
    let rx = tokio::time::timeout(
        WAIT,
        client.stream_aggregated_resources(ReceiverStream::new(rx)),
    )
    .await
    .expect("StreamAggregatedResources answered")
    .map(tonic::Response::into_inner);
    Ads { tx, rx }
}

fn node(id: &str) -> Option<Node> {
    Some(Node {
        id: id.into(),
        ..Default::default()
    })
}

fn strings<S: AsRef<str>>(names: &[S]) -> Vec<String> {
    names.iter().map(|n| n.as_ref().to_owned()).collect()
}

fn subscribe<S: AsRef<str>>(type_url: &str, names: &[S]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: node("limits-test"),
        type_url: type_url.into(),
        resource_names_subscribe: strings(names),
        ..Default::default()
    }
}

fn bundle() -> DeltaDiscoveryRequest {
    subscribe(TRUST_BUNDLE_TYPE_URL, &[TRUST_BUNDLE_NAME])
}

fn ack(r: &DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: r.type_url.clone(),
        response_nonce: r.nonce.clone(),
        ..Default::default()
    }
}

fn sotw_request<S: AsRef<str>>(node_id: &str, names: &[S]) -> DiscoveryRequest {
    DiscoveryRequest {
        node: node(node_id),
        type_url: EPS.into(),
        resource_names: strings(names),
        ..Default::default()
    }
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// `status` is `code` and its message holds every one of `parts`.
fn check(status: &Status, code: Code, parts: &[&str]) {
    assert_eq!(status.code(), code, "{status}");
    for part in parts {
        assert!(status.message().contains(part), "{part:?} not in {status}");
    }
}

// === Tests ===

/// Names are counted per stream and type after deduplication, refused
/// ones included, over state of the world, delta subscriptions and delta
/// `initial_resource_versions`; the request over the limit ends the stream
/// with RESOURCE_EXHAUSTED naming the type, the count and the limit. A
/// stream cycling through refused names never exceeds it and is logged a
/// bounded number of times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_per_stream_are_capped_and_refusals_logged_at_a_bounded_rate() {
    let mut cp = start(&["--xds-max-names-per-stream=5"]).await;
    let web = scoped_token(&cp).await;
    let exhausted = |count: &str| [EPS.to_owned(), format!(" {count} "), "limit of 5".into()];

    // Delta: three names (two refused), then three more.
    let mut d = delta(
        &cp,
        &web,
        subscribe(EPS, &["payments", "billing", "ledger"]),
    )
    .await;
    let r = d.next("the first response").await;
    d.send(ack(&r)).await;
    d.send(subscribe(EPS, &["x", "y", "z"])).await;
    let s = d.error("a sixth name").await;
    let want = exhausted("6");
    check(&s, Code::ResourceExhausted, &[&want[0], &want[1], &want[2]]);

    // Duplicates count once.
    let same = vec!["billing"; 50];
    let mut d = delta(&cp, &web, subscribe(EPS, &same)).await;
    d.next("fifty copies of one name").await;

    // Delta: names the stream says it holds count with those it subscribes to.
    let held: HashMap<String, String> = names("held-", 5)
        .into_iter()
        .map(|n| (n, "v1".to_owned()))
        .collect();
    let mut d = delta(
        &cp,
        &web,
        DeltaDiscoveryRequest {
            initial_resource_versions: held,
            ..subscribe(EPS, &["payments"])
        },
    )
    .await;
    let s = d.error("five held names and one more").await;
    check(&s, Code::ResourceExhausted, &[EPS, " 6 ", "limit of 5"]);

    // State of the world: the whole set at once, a flood of refused names.
    let flood = names("refused-", 60_000);
    let mut s = sotw(&cp, &web, sotw_request("limits-test", &flood)).await;
    let status = s.error("sixty thousand names").await;
    check(
        &status,
        Code::ResourceExhausted,
        &[EPS, " 60000 ", "limit of 5"],
    );

    // A delta stream cycling through 2000 refused names, five at a time,
    // stays within the limit and is logged a bounded number of times.
    let before = refusal_lines(&mut cp);
    let mut d = delta(&cp, &web, subscribe(EPS, &names("cycle-0-", 5))).await;
    let mut r = d.next("the first five").await;
    for round in 1..400 {
        let next = names(&format!("cycle-{round}-"), 5);
        d.send(ack(&r)).await;
        d.send(DeltaDiscoveryRequest {
            resource_names_unsubscribe: names(&format!("cycle-{}-", round - 1), 5),
            ..subscribe(EPS, &next)
        })
        .await;
        r = d.next(&format!("round {round}")).await;
        assert_eq!(
            r.removed_resources.len(),
            5,
            "round {round}: answered as absent"
        );
    }
    drop(d);
    let logged = refusal_lines(&mut cp) - before;
    assert!(
        (1..=4).contains(&logged),
        "2000 refusals on one stream logged in {logged} lines"
    );
    assert!(
        cp.process()
            .stderr()
            .contains("xds subscription refused: the resource is treated as absent"),
        "the first refusal is logged in full"
    );
}

/// Lines of the control plane's log about refused subscriptions.
fn refusal_lines(cp: &mut ControlPlane) -> usize {
    cp.process()
        .stderr()
        .lines()
        .filter(|l| l.contains("xds subscription"))
        .count()
}

/// A principal holds at most `--max-streams-per-principal` ADS streams
/// (delta and state of the world together); the next is refused with
/// RESOURCE_EXHAUSTED naming the flag and limit, another principal has its
/// own count, and closing a stream frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_per_principal_are_capped_and_a_closed_stream_frees_its_place() {
    let cp = start(&["--max-streams-per-principal=3"]).await;
    let web = scoped_token(&cp).await;
    let other = scoped_token(&cp).await;
    let mut open = Vec::new();
    for n in 0..2 {
        let mut d = delta(&cp, &web, bundle()).await;
        d.next(&format!("stream {n}")).await;
        open.push(d);
    }
    let mut third = sotw(&cp, &web, sotw_request("web-3", &["payments"])).await;
    third.next("the state-of-the-world stream").await;

    let mut refused = delta(&cp, &web, bundle()).await;
    let s = refused.error("a fourth stream").await;
    check(
        &s,
        Code::ResourceExhausted,
        &["--max-streams-per-principal (3)", "3 ADS streams"],
    );
    let mut theirs = delta(&cp, &other, bundle()).await;
    theirs.next("another principal's stream").await;

    drop(open.pop());
    eventually(WAIT, "a closed stream frees its place", || async {
        let mut d = delta(&cp, &web, bundle()).await;
        match &mut d.rx {
            Ok(rx) => match tokio::time::timeout(WAIT, rx.message()).await {
                Ok(Ok(Some(_))) => Ok(()),
                other => anyhow::bail!("{other:?}"),
            },
            Err(s) => anyhow::bail!("{s}"),
        }
    })
    .await;
}

/// `node.id` is checked on the first request, over both protocols: a
/// valid id (the session's rule) of at most 128 characters; control
/// characters, spaces, other characters, the empty id and 129 characters
/// are INVALID_ARGUMENT naming `node.id` and the rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_ids_are_validated_on_the_first_request() {
    let cp = start(&[]).await;
    let web = scoped_token(&cp).await;
    let longest = "n".repeat(128);
    for ok in [longest.as_str(), "web-1.pod_2:a"] {
        let mut d = delta(
            &cp,
            &web,
            DeltaDiscoveryRequest {
                node: node(ok),
                ..bundle()
            },
        )
        .await;
        d.next(ok).await;
        let mut s = sotw(&cp, &web, sotw_request(ok, &["payments"])).await;
        s.next(ok).await;
    }
    let too_long = "n".repeat(129);
    let huge = "n".repeat(3 << 20);
    let bad = [
        "",
        too_long.as_str(),
        huge.as_str(),
        "web-1\n2026-12-03T10:00:00Z  INFO isdp_control_plane: token created role=admin\x1b[31m",
        "web-1\r",
        "\x1b[2J",
        "tab\there",
        "web 1",
        "wéb-1",
        "web/1",
    ];
    for id in bad {
        let what = format!("node id {:?}", id.chars().take(40).collect::<String>());
        let mut d = delta(
            &cp,
            &web,
            DeltaDiscoveryRequest {
                node: node(id),
                ..bundle()
            },
        )
        .await;
        let s = d.error(&what).await;
        check(&s, Code::InvalidArgument, &["node.id", "128"]);
        assert!(
            !s.message().contains('\n') && !s.message().contains('\x1b'),
            "{s}"
        );
        assert!(s.message().len() < 512, "{what}: a bounded message");
        let mut s = sotw(&cp, &web, sotw_request(id, &["payments"])).await;
        let s = s.error(&what).await;
        check(&s, Code::InvalidArgument, &["node.id", "128"]);
    }
    // No node at all.
    let mut d = delta(
        &cp,
        &web,
        DeltaDiscoveryRequest {
            node: None,
            ..bundle()
        },
    )
    .await;
    check(
        &d.error("no node").await,
        Code::InvalidArgument,
        &["node.id"],
    );
    let table = cp.ctl_ok(&["proxy-status"]).await;
    for row in table.lines().skip(1) {
        assert!(
            row.starts_with(&longest) || row.starts_with("web-1.pod_2:a "),
            "only accepted streams are listed: {row}"
        );
    }
}

/// `isdpctl proxy-status` shows a stream with the longest node id and a
/// NACK of megabytes full of control characters: no panic, one line per
/// row, the NACK text cut to 1 KiB with a marker, and the peer's address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_status_shows_long_ids_cut_nacks_and_the_peer() {
    let cp = start(&[]).await;
    let web = scoped_token(&cp).await;
    let id = "n".repeat(128);
    let mut d = delta(
        &cp,
        &web,
        DeltaDiscoveryRequest {
            node: node(&id),
            ..bundle()
        },
    )
    .await;
    let r = d.next("the trust bundle").await;
    let message = format!(
        "bad bundle\nweb-1  127.0.0.1:1  delta  TrustBundle  1  SYNCED  0  forged\x1b[31m{}",
        "é".repeat(3 << 19)
    );
    d.send(DeltaDiscoveryRequest {
        error_detail: Some(RpcStatus {
            code: Code::InvalidArgument as i32,
            message,
            ..Default::default()
        }),
        ..ack(&r)
    })
    .await;

    eventually(WAIT, "the NACK shows", || async {
        let out = cp.ctl_ok(&["-o", "json", "proxy-status"]).await;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let nack = v[0]["types"][0]["last_nack"].as_str().unwrap_or_default();
        anyhow::ensure!(!nack.is_empty(), "no NACK yet: {out}");
        Ok(())
    })
    .await;
    let out = cp.ctl_ok(&["-o", "json", "proxy-status"]).await;
    let json: serde_json::Value = serde_json::from_str(&out).expect("proxy-status JSON");
    let p = &json[0];
    assert_eq!(p["node_id"], id.as_str());
    let peer = p["peer"].as_str().expect("peer");
    assert!(
        peer.parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback()),
        "the peer's address: {peer:?}"
    );
    let nack = p["types"][0]["last_nack"].as_str().expect("last_nack");
    assert!(nack.len() <= 1024, "{} bytes kept", nack.len());
    assert!(nack.starts_with("bad bundle\nweb-1"), "{nack}");
    assert!(nack.ends_with("… (truncated)"), "{nack}");

    let table = cp.ctl_ok(&["proxy-status"]).await;
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "a header and one row:\n{table}");
    let row = lines[1];
    assert!(row.starts_with(&id), "{row}");
    assert!(row.contains(peer), "PEER column: {row}");
    assert!(row.contains(r"NACK: bad bundle\nweb-1"), "{row}");
    assert!(row.contains(r"forged\u{1b}[31m"), "{row}");
    assert!(row.ends_with("… (truncated)"), "{row}");
    assert!(
        !table.contains('\x1b') && !table.contains('\r'),
        "{table:?}"
    );
}

/// A request over the 4 MiB limit ends the stream with RESOURCE_EXHAUSTED
/// naming the limit, over both protocols, whether it opens the stream or
/// follows an answered one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_is_resource_exhausted() {
    let cp = start(&[]).await;
    let web = scoped_token(&cp).await;
    let big = "x".repeat(5 << 20);
    let limit = (4usize << 20).to_string();

    let mut d = delta(&cp, &web, bundle()).await;
    let r = d.next("the trust bundle").await;
    d.send(ack(&r)).await;
    d.send(subscribe(EPS, &[big.as_str()])).await;
    check(
        &d.error("a 5 MiB delta request").await,
        Code::ResourceExhausted,
        &[&limit],
    );

    let mut d = delta(&cp, &web, subscribe(EPS, &[big.as_str()])).await;
    check(
        &d.error("a 5 MiB first request").await,
        Code::ResourceExhausted,
        &[&limit],
    );

    let mut s = sotw(&cp, &web, sotw_request("web-1", &[big.as_str()])).await;
    check(
        &s.error("a 5 MiB sotw request").await,
        Code::ResourceExhausted,
        &[&limit],
    );
}

// === Name bytes per principal ===

/// `n` names starting with `prefix`, each costing 1000 bytes of the
/// budget (936 bytes and the 64 counted per name).
fn kilo_names(prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let head = format!("{prefix}{i:03}-");
            format!("{head}{}", "x".repeat(936 - head.len()))
        })
        .collect()
}

/// A delta stream of `token` subscribing to `names` that is answered,
/// tried until the budget has room (bytes given back by streams that
/// ended, or names unsubscribed, are returned as the server processes
/// them).
async fn answered(cp: &ControlPlane, token: &str, names: &[String], what: &str) -> Delta {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut d = delta(cp, token, subscribe(EPS, names)).await;
        let outcome = match &mut d.rx {
            Ok(rx) => tokio::time::timeout(WAIT, rx.message()).await,
            Err(s) => Ok(Err(s.clone())),
        };
        match outcome {
            Ok(Ok(Some(_))) => return d,
            other if tokio::time::Instant::now() >= deadline => {
                panic!("{what}: not answered within {WAIT:?}: {other:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The name bytes all of one principal's streams hold are budgeted
/// together (`--xds-max-name-bytes-per-principal`), refused names
/// included, over delta and state of the world: the subscription past it
/// ends its stream (a new one, or one that grows) with RESOURCE_EXHAUSTED
/// naming the flag, the limit and the principal; unsubscribing and
/// ending streams give bytes back; another principal has its own budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_bytes_per_principal_are_budgeted_across_streams() {
    let cp = start(&["--xds-max-name-bytes-per-principal=20000"]).await;
    let (id, web) = scoped_token_with_id(&cp).await;
    let other = scoped_token(&cp).await;
    let over = |s: &Status, what: &str| {
        check(
            s,
            Code::ResourceExhausted,
            &[
                "--xds-max-name-bytes-per-principal (20000)",
                &format!("principal {id} "),
            ],
        );
        assert!(s.message().contains("would hold 2"), "{what}: {s}");
    };

    // Twelve names on one stream, eight on another: the budget is full.
    let mut a = answered(&cp, &web, &kilo_names("a", 12), "twelve names").await;
    let b = answered(&cp, &web, &kilo_names("b", 8), "eight more").await;
    let mut c = delta(&cp, &web, subscribe(EPS, &kilo_names("c", 1))).await;
    over(&c.error("a third stream's name").await, "a new stream");
    let mut s = sotw(&cp, &web, sotw_request("web-1", &kilo_names("c", 1))).await;
    over(&s.error("a state-of-the-world stream").await, "sotw");

    // Another principal has its own budget.
    let theirs = answered(&cp, &other, &kilo_names("t", 19), "another principal").await;

    // Unsubscribing five names makes room for five.
    a.send(DeltaDiscoveryRequest {
        resource_names_unsubscribe: kilo_names("a", 5),
        ..subscribe(EPS, &[] as &[&str])
    })
    .await;
    let d = answered(&cp, &web, &kilo_names("d", 5), "room made by unsubscribing").await;

    // A stream that grows past the budget ends, and gives back what it held.
    a.send(subscribe(EPS, &kilo_names("e", 1))).await;
    over(&a.error("a growing stream").await, "a growth");
    let _e = answered(
        &cp,
        &web,
        &kilo_names("e", 7),
        "room made by a refused stream",
    )
    .await;

    // Ending a stream gives its bytes back.
    drop(b);
    let _f = answered(
        &cp,
        &web,
        &kilo_names("f", 8),
        "room made by an ended stream",
    )
    .await;
    drop((d, theirs));
}

// === The log under stream churn ===

/// Lines the control plane logged at info level or above.
fn log_lines(cp: &mut ControlPlane) -> Vec<String> {
    cp.process()
        .stderr()
        .lines()
        .filter(|l| !l.contains(" DEBUG ") && !l.contains(" TRACE "))
        .map(str::to_owned)
        .collect()
}

/// One churned stream: opened, made to cause a line (a refused
/// subscription; an invalid node id; a NACK), then cancelled.
async fn churn_one(cp: &ControlPlane, token: &str, n: usize) {
    let what = format!("churned stream {n}");
    match n % 3 {
        0 => {
            let mut d = delta(cp, token, subscribe(EPS, &[format!("churn-{n}")])).await;
            d.next(&what).await;
        }
        1 => {
            let bad = DeltaDiscoveryRequest {
                node: node(&format!("bad node {n}")),
                ..bundle()
            };
            let mut d = delta(cp, token, bad).await;
            d.error(&what).await;
        }
        _ => {
            let mut d = delta(cp, token, bundle()).await;
            let r = d.next(&what).await;
            d.send(DeltaDiscoveryRequest {
                error_detail: Some(RpcStatus {
                    code: Code::InvalidArgument as i32,
                    message: format!("churn NACK {n}"),
                    ..Default::default()
                }),
                ..ack(&r)
            })
            .await;
            // The NACK is read before the stream is cancelled.
            let _ = tokio::time::timeout(Duration::from_millis(50), d.next(&what)).await;
        }
    }
}

/// Streams that come and go cannot grow the log faster than the server's
/// bound, whatever each does (a refused subscription, an invalid node id,
/// a NACK): 300 streams, 8 at a time, add at most the lines of the
/// windows they span (20 a window and the count of those left out),
/// not lines per stream. The first refusal is still logged in full, and
/// the lines left out are counted once their window is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_churn_grows_the_log_at_a_bounded_rate() {
    const STREAMS: usize = 300;
    let mut cp = start(&[]).await;
    let web = scoped_token(&cp).await;
    let before = log_lines(&mut cp).len();
    let started = std::time::Instant::now();
    let mut next = 0;
    while next < STREAMS {
        let batch: Vec<_> = (next..(next + 8).min(STREAMS))
            .map(|n| churn_one(&cp, &web, n))
            .collect();
        futures::future::join_all(batch).await;
        next += 8;
    }
    let elapsed = started.elapsed();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let lines = log_lines(&mut cp);
    let added = &lines[before..];
    // The windows the churn spanned, each with 20 lines and one count.
    let windows = (elapsed.as_secs() / 10 + 1) as usize;
    assert!(
        added.len() <= windows * 21 + 2,
        "{STREAMS} streams in {elapsed:?} added {} lines:\n{}",
        added.len(),
        added.join("\n")
    );
    assert!(
        added.iter().any(|l| l
            .contains("xds subscription refused: the resource is treated as absent")
            && l.contains("churn-0")),
        "the first refusal is logged in full:\n{}",
        added.join("\n")
    );

    // Once the window is over, the lines left out are counted.
    tokio::time::sleep(Duration::from_secs(10)).await;
    churn_one(&cp, &web, 0).await;
    eventually(WAIT, "the count of lines left out", || {
        let lines = log_lines(&mut cp);
        async move {
            anyhow::ensure!(
                lines
                    .iter()
                    .any(|l| l.contains("left out") && l.contains("suppressed=")),
                "no count"
            );
            Ok(())
        }
    })
    .await;
}

/// A node id is the client's word, not bound to its caller (several
/// services' sidecars may share a host's node id), so `isdpctl
/// proxy-status` shows who opened each stream: a `web` token's stream
/// claiming `pay-1` is listed with that token's id (never its secret),
/// beside the real `pay-1` opened with another token, in JSON and in the
/// table's PRINCIPAL column.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_status_shows_who_opened_each_stream() {
    let cp = start(&[]).await;
    let token = |service: &'static str| {
        let cp = &cp;
        async move {
            let t = cp
                .create_token(&["--role", "join", "--service", service])
                .await;
            (t.id, t.secret)
        }
    };
    let (web_id, web) = token("web").await;
    let (pay_id, pay) = token("payments").await;
    let named = |id: &str| DeltaDiscoveryRequest {
        node: node(id),
        ..bundle()
    };
    let mut real = delta(&cp, &pay, named("pay-1")).await;
    real.next("the real pay-1").await;
    let mut forged = delta(&cp, &web, named("pay-1")).await;
    forged.next("web's stream named pay-1").await;

    let out = cp.ctl_ok(&["-o", "json", "proxy-status"]).await;
    let json: serde_json::Value = serde_json::from_str(&out).expect("proxy-status JSON");
    let mut principals: Vec<(&str, &str)> = json
        .as_array()
        .expect("a list")
        .iter()
        .map(|p| {
            (
                p["node_id"].as_str().unwrap_or_default(),
                p["principal"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    principals.sort();
    let mut expected = vec![("pay-1", pay_id.as_str()), ("pay-1", web_id.as_str())];
    expected.sort();
    assert_eq!(principals, expected, "{out}");
    assert!(
        !out.contains(&web) && !out.contains(&pay),
        "no secret shown"
    );

    let table = cp.ctl_ok(&["proxy-status"]).await;
    let mut lines = table.lines();
    let header = lines.next().expect("a header");
    assert!(
        header.starts_with("NODE") && header.contains("PRINCIPAL"),
        "{header}"
    );
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 2, "{table}");
    for id in [&web_id, &pay_id] {
        assert!(
            rows.iter()
                .any(|r| r.starts_with("pay-1") && r.contains(id.as_str())),
            "{id} in\n{table}"
        );
    }
}
