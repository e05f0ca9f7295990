//! Prometheus' own `promtool` (Debian package `prometheus`), so metric
//! exposition and alerting rules are checked by the tool Prometheus users
//! run, not by our reading of the format.

use std::path::PathBuf;
use std::process::Stdio;

use tokio::io::AsyncWriteExt;

/// `promtool`'s path: `$PROMTOOL`, else the one on `PATH`. Panics with the
/// install command when neither exists: a check that cannot run must fail.
pub fn promtool() -> PathBuf {
    if let Some(p) = std::env::var_os("PROMTOOL") {
        return PathBuf::from(p);
    }
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("promtool"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "promtool not found (set PROMTOOL or install it: apt-get install prometheus; \
             `make test` installs it)"
        )
    })
}

/// Runs `promtool ARGS` with `stdin` as its input; returns (success, stdout
/// and stderr together).
pub async fn run(args: &[&str], stdin: &str) -> (bool, String) {
    let mut child = tokio::process::Command::new(promtool())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running promtool");
    let mut input = child.stdin.take().expect("piped stdin");
    input
        .write_all(stdin.as_bytes())
        .await
        .expect("promtool stdin");
    drop(input);
    let out = child.wait_with_output().await.expect("promtool output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `promtool check metrics` on an exposition: must pass with nothing to
/// say (promtool prints lint problems such as missing units or `_total`).
pub async fn check_metrics(exposition: &str) {
    let (ok, text) = run(&["check", "metrics"], exposition).await;
    assert!(
        ok && text.trim().is_empty(),
        "promtool check metrics complained:\n{text}\n--- exposition ---\n{exposition}"
    );
}
