//! The dashboard's live updates: one Server-Sent Events stream per page
//! (`GET /ui/events`), pushing the whole snapshot (`snapshot`) as JSON
//! whenever it differs from the last one sent.
//!
//! Bounds: at most `--ui-max-streams` streams at once and
//! `--ui-max-streams-per-session` per session (503 over either); each
//! holds a connection of the listener, so `--http-max-connections`
//! counts it too. A stream is a pull: the next snapshot is built only
//! when the connection has taken the previous frame, so a browser that
//! stops reading holds one frame, never a queue. A stream ends when its
//! session ends (logout, idleness, its token revoked or expired: checked
//! before every frame), and at shutdown.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::body::Bytes;
use tokio::{sync::broadcast, time::Instant};

/// How often the snapshot is rebuilt and compared when nothing woke the
/// stream (proxy status and traffic change without a notification).
pub const REFRESH: Duration = Duration::from_secs(1);

/// A comment line sent when nothing changed for this long, so proxies and
/// browsers see a live connection.
pub const KEEPALIVE: Duration = Duration::from_secs(15);

/// One event: `event:` and `data:` lines (one `data:` per line of `data`,
/// which the browser joins again with `\n`), then a blank line. A line
/// break inside `event` would end the field, so it is cut there.
pub fn frame(event: &str, data: &str) -> Bytes {
    let event = event.split(['\r', '\n']).next().unwrap_or_default();
    let mut out = String::with_capacity(data.len() + event.len() + 16);
    out.push_str("event: ");
    out.push_str(event);
    out.push('\n');
    // `lines()` would drop a trailing empty line and keep `\r`: split on
    // every line ending SSE knows.
    for line in data.split("\r\n").flat_map(|l| l.split(['\r', '\n'])) {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
    Bytes::from(out)
}

/// A comment: ignored by the browser, keeps the connection busy.
pub fn keepalive() -> Bytes {
    Bytes::from_static(b": keepalive\n\n")
}

/// The streams open, in total and per session.
#[derive(Clone)]
pub struct Streams {
    shared: Arc<StreamsShared>,
}

struct StreamsShared {
    max: usize,
    per_session: usize,
    open: Mutex<HashMap<String, usize>>,
}

/// Why a stream is refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum StreamRefused {
    #[error("{open} live-update streams are open, the most --ui-max-streams allows ({max})")]
    Total { open: usize, max: usize },
    #[error(
        "this session has {open} live-update streams open, the most --ui-max-streams-per-session allows ({max})"
    )]
    Session { open: usize, max: usize },
}

/// A stream's place, given back when dropped.
pub struct Permit {
    streams: Streams,
    session: String,
}

impl Streams {
    pub fn new(max: usize, per_session: usize) -> Self {
        Streams {
            shared: Arc::new(StreamsShared {
                max,
                per_session,
                open: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn acquire(&self, session: &str) -> Result<Permit, StreamRefused> {
        let mut open = self.shared.open.lock().expect("streams lock");
        let total: usize = open.values().sum();
        if total >= self.shared.max {
            return Err(StreamRefused::Total {
                open: total,
                max: self.shared.max,
            });
        }
        let mine = open.entry(session.to_owned()).or_default();
        if *mine >= self.shared.per_session {
            return Err(StreamRefused::Session {
                open: *mine,
                max: self.shared.per_session,
            });
        }
        *mine += 1;
        Ok(Permit {
            streams: self.clone(),
            session: session.to_owned(),
        })
    }

    #[cfg(test)]
    pub fn open(&self) -> usize {
        self.shared
            .open
            .lock()
            .expect("streams lock")
            .values()
            .sum()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut open = self.streams.shared.open.lock().expect("streams lock");
        if let Some(n) = open.get_mut(&self.session) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.session);
            }
        }
    }
}

/// Waits until the stream should look again: a change notification, the
/// refresh tick, or the keepalive deadline (returns true for the last).
pub async fn wait<T: Clone>(
    changes: &mut broadcast::Receiver<T>,
    last_sent: Instant,
) -> WaitOutcome {
    let keepalive_at = last_sent + KEEPALIVE;
    tokio::select! {
        r = changes.recv() => match r {
            Err(broadcast::error::RecvError::Closed) => WaitOutcome::Closed,
            _ => WaitOutcome::Look,
        },
        _ = tokio::time::sleep(REFRESH) => WaitOutcome::Look,
        _ = tokio::time::sleep_until(keepalive_at) => WaitOutcome::Keepalive,
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum WaitOutcome {
    Look,
    Keepalive,
    Closed,
}

#[cfg(test)]
mod tests;
