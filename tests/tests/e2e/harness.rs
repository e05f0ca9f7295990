//! The harness itself, against `echo-http` (which needs nothing else): the
//! listening-line handshake, health toggling, kill and restart on the same
//! port, and the polling helpers.

use std::time::Duration;

use isdp_tests::{EchoHttp, binary, eventually, holds_for, http};

#[tokio::test]
async fn echo_reports_itself_and_toggles_health() {
    let echo = EchoHttp::start("h-1").await;

    let r = http::get(echo.addr(), "/some/path?q=1").await.expect("GET");
    assert_eq!(r.status, 200);
    let body: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
    assert_eq!(body["instance"], "h-1");
    assert_eq!(body["method"], "GET");
    assert_eq!(body["path"], "/some/path");
    assert_eq!(body["headers"]["host"], echo.addr());

    let r = http::request("DELETE", echo.addr(), "/x")
        .await
        .expect("DELETE");
    assert_eq!(r.status, 200, "any method is echoed");

    assert_eq!(
        http::get(echo.addr(), "/healthz").await.unwrap().status,
        200
    );
    echo.fail_health().await;
    assert_eq!(
        http::get(echo.addr(), "/healthz").await.unwrap().status,
        503
    );
    echo.pass_health().await;
    assert_eq!(
        http::get(echo.addr(), "/healthz").await.unwrap().status,
        200
    );
}

#[tokio::test]
async fn echo_restarts_on_the_same_port() {
    let mut echo = EchoHttp::start("h-2").await;
    let addr = echo.addr().to_owned();
    echo.kill9().await;
    assert!(
        http::get(&addr, "/healthz").await.is_err(),
        "still answering after kill -9"
    );
    echo.restart().await;
    assert_eq!(echo.addr(), addr);
    let took = eventually(Duration::from_secs(5), "echo back", || async {
        anyhow::ensure!(http::get(&addr, "/healthz").await?.status == 200);
        Ok(())
    })
    .await;
    assert!(took < Duration::from_secs(5));
}

#[tokio::test]
async fn holds_for_passes_while_true() {
    holds_for(Duration::from_millis(200), "constant", || async { Ok(()) }).await;
}

#[tokio::test]
#[should_panic(expected = "timed out after")]
async fn eventually_panics_with_the_last_failure() {
    eventually(Duration::from_millis(200), "the impossible", || async {
        anyhow::bail!("nope")
    })
    .await;
}

#[test]
#[should_panic(expected = "cargo build --workspace --bins")]
fn a_missing_binary_fails_loudly() {
    binary("no-such-isdp-binary");
}
