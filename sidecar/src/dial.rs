//! Dialing the control plane: channel settings shared by the xDS client and
//! the session, and round-robin over the configured URLs.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// How long one connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP/2 PING interval, so a dead control plane is noticed on an idle stream.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a PING may go unanswered before the connection is dropped.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a control-plane connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("invalid control-plane URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("connect {url}: {reason}")]
    Connect { url: String, reason: String },
}

/// Rotates through control-plane URLs, one per attempt.
#[derive(Clone, Debug)]
pub struct Dialer {
    /// Configured URLs; never empty (config validation guarantees it).
    urls: Vec<String>,
    /// Index of the URL the next attempt uses.
    next: usize,
}

// === impl Dialer ===

impl Dialer {
    pub fn new(urls: Vec<String>) -> Self {
        Self { urls, next: 0 }
    }

    /// The URL for the next attempt; advances the rotation.
    pub fn next_url(&mut self) -> String {
        let url = self.urls[self.next % self.urls.len().max(1)].clone();
        self.next = self.next.wrapping_add(1);
        url
    }

    /// Connects to `url` with the shared channel settings.
    pub async fn connect(url: &str) -> Result<Channel, DialError> {
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| DialError::InvalidUrl {
                url: url.to_owned(),
                reason: e.to_string(),
            })?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        endpoint.connect().await.map_err(|e| DialError::Connect {
            url: url.to_owned(),
            reason: error_chain(&e),
        })
    }
}

/// An error and its sources, joined with ": ".
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_round_robin() {
        let mut d = Dialer::new(vec!["http://a:1".into(), "http://b:1".into()]);
        let got: Vec<_> = (0..5).map(|_| d.next_url()).collect();
        assert_eq!(
            got,
            [
                "http://a:1",
                "http://b:1",
                "http://a:1",
                "http://b:1",
                "http://a:1"
            ]
        );
    }

    #[tokio::test]
    async fn connect_errors_name_the_url() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let err = Dialer::connect(&url).await.unwrap_err().to_string();
        assert!(err.starts_with(&format!("connect {url}: ")), "{err}");
    }
}
