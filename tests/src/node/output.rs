//! What `client.js` prints, read: one JSON line per report window and
//! a summary at the end, each counting calls by the instance that
//! answered and failures by status code.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::io::{AsyncBufReadExt, BufReader};

/// Counts over some calls: successes by the answering instance, failures
/// by gRPC status code name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub calls: u64,
    pub instances: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
    /// The first message of each status code (summaries only).
    pub messages: BTreeMap<String, String>,
}

/// One report window of a running client: the calls that finished in it.
#[derive(Clone, Debug)]
pub struct Window {
    /// When its line arrived (the window's end, give or take a pipe).
    pub at: Instant,
    pub counts: Counts,
}

// === impl Counts ===

impl Counts {
    fn from_json(v: &serde_json::Value) -> anyhow::Result<Self> {
        let map = |key: &str| -> anyhow::Result<BTreeMap<String, u64>> {
            let Some(obj) = v.get(key) else {
                return Ok(BTreeMap::new());
            };
            let obj = obj
                .as_object()
                .ok_or_else(|| anyhow::anyhow!("{key} is not an object in {v}"))?;
            obj.iter()
                .map(|(k, n)| {
                    n.as_u64()
                        .map(|n| (k.clone(), n))
                        .ok_or_else(|| anyhow::anyhow!("{key}.{k} is not a count in {v}"))
                })
                .collect()
        };
        let messages = v
            .get("messages")
            .and_then(|m| m.as_object())
            .map(|m| {
                m.iter()
                    .map(|(k, s)| (k.clone(), s.as_str().unwrap_or_default().to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self {
            calls: v["calls"]
                .as_u64()
                .ok_or_else(|| anyhow::anyhow!("no calls count in {v}"))?,
            instances: map("instances")?,
            errors: map("errors")?,
            messages,
        })
    }

    /// Calls answered by `instance`.
    pub fn of(&self, instance: &str) -> u64 {
        self.instances.get(instance).copied().unwrap_or(0)
    }

    /// Calls that failed, whatever their status.
    pub fn failed(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// What the client printed so far.
#[derive(Default)]
pub(super) struct Printed {
    pub(super) windows: Vec<Window>,
    pub(super) summary: Option<Counts>,
    /// A line that was not what `client.js` prints.
    pub(super) bad: Option<String>,
}

/// Collects the client's JSON lines until its stdout closes.
pub(super) async fn read_lines(
    stdout: BufReader<tokio::process::ChildStdout>,
    printed: Arc<Mutex<Printed>>,
) {
    let mut lines = stdout.lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let at = Instant::now();
        let parsed = serde_json::from_str::<serde_json::Value>(&line)
            .map_err(anyhow::Error::from)
            .and_then(|v| {
                Ok((
                    v["type"].as_str().map(str::to_owned),
                    Counts::from_json(&v)?,
                ))
            });
        let mut printed = printed.lock().expect("node client output lock");
        match parsed {
            Ok((Some(t), counts)) if t == "window" => printed.windows.push(Window { at, counts }),
            Ok((Some(t), counts)) if t == "summary" => printed.summary = Some(counts),
            Ok(_) => printed.bad = Some(format!("a line of no known type: {line}")),
            Err(e) => printed.bad = Some(format!("an unreadable line ({e:#}): {line}")),
        }
    }
}
