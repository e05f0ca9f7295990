//! A tiny HTTP/1.0 client over a raw `TcpStream`: enough for admin
//! endpoints (`/config`, `/ready`, `/admin/health/fail`) without pulling an
//! HTTP client stack into the test crate. HTTP/1.0 makes the server close
//! the connection after the response, so "read to EOF" is the whole body.

use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One request may take this long before it counts as failed.
const TIMEOUT: Duration = Duration::from_secs(5);

/// A response: status code, headers and body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Names lowercased, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET http://{addr}{path}`.
pub async fn get(addr: &str, path: &str) -> anyhow::Result<Response> {
    request("GET", addr, path).await
}

/// `POST http://{addr}{path}` with an empty body.
pub async fn post(addr: &str, path: &str) -> anyhow::Result<Response> {
    request("POST", addr, path).await
}

/// `GET` that must answer 2xx with a JSON body.
pub async fn get_json(addr: &str, path: &str) -> anyhow::Result<serde_json::Value> {
    let resp = get(addr, path).await?;
    if !(200..300).contains(&resp.status) {
        bail!("GET {addr}{path}: status {}: {}", resp.status, resp.body);
    }
    serde_json::from_str(&resp.body)
        .with_context(|| format!("GET {addr}{path}: body is not JSON: {}", resp.body))
}

pub async fn request(method: &str, addr: &str, path: &str) -> anyhow::Result<Response> {
    tokio::time::timeout(TIMEOUT, request_inner(method, addr, path))
        .await
        .with_context(|| format!("{method} {addr}{path}: no answer within {TIMEOUT:?}"))?
}

async fn request_inner(method: &str, addr: &str, path: &str) -> anyhow::Result<Response> {
    let mut s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let req = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("{method} {addr}{path}: malformed response: {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{method} {addr}{path}: no status in {head:?}"))?;
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: body.to_owned(),
    })
}
