//! `dig` (Debian package `dnsutils`), so the sidecar's DNS server is
//! checked by the client operators run, not by our own reading of the
//! wire format.

use std::path::PathBuf;

/// `dig`'s path: `$DIG`, else the one on `PATH`. Panics with the install
/// command when neither exists: a check that cannot run must fail.
pub fn dig() -> PathBuf {
    if let Some(p) = std::env::var_os("DIG") {
        return PathBuf::from(p);
    }
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("dig"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("dig not found (set DIG or install it: apt-get install dnsutils; `make test` installs it)")
    })
}

/// `dig @ADDR -p PORT ARGS` with short timeouts and no `.digrc`; its
/// stdout and stderr together (dig reports failures on stdout too).
pub async fn run(server: &str, args: &[&str]) -> String {
    let (host, port) = server.rsplit_once(':').expect("ADDR:PORT");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let out = tokio::process::Command::new(dig())
        .arg(format!("@{host}"))
        .args(["-p", port, "+time=2", "+tries=1", "-r"])
        .args(args)
        .output()
        .await
        .expect("running dig");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The `status:` of dig's header line (`NOERROR`, `NXDOMAIN`, ...).
pub fn status(output: &str) -> Option<&str> {
    let at = output.find("status: ")? + "status: ".len();
    output[at..].split(',').next()
}

/// The answer section's records as `(type, data)`, from dig's default
/// output.
pub fn answers(output: &str) -> Vec<(String, String)> {
    section(output, ";; ANSWER SECTION:")
}

/// The additional section's records as `(type, data)`, the OPT
/// pseudo-record left out.
pub fn additionals(output: &str) -> Vec<(String, String)> {
    section(output, ";; ADDITIONAL SECTION:")
}

fn section(output: &str, heading: &str) -> Vec<(String, String)> {
    let Some(at) = output.find(heading) else {
        return Vec::new();
    };
    output[at + heading.len()..]
        .lines()
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| {
            // NAME TTL CLASS TYPE DATA...
            let fields: Vec<&str> = l.split_whitespace().collect();
            (fields.len() >= 5).then(|| (fields[3].to_owned(), fields[4..].join(" ")))
        })
        .collect()
}
