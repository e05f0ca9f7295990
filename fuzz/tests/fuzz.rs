//! Every fuzz target under the stable harness for a bounded time: its
//! corpus (seeds and past crashes) first, then mutations from a fixed
//! seed. `ISDP_FUZZ_SECONDS` sets the time per target (default 20),
//! `ISDP_FUZZ_SEED` the generator's seed (default 1).

use std::time::Duration;

use isdp_fuzz::{run, targets};

fn budget() -> (Duration, u64) {
    let var = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}: not a number")))
            .unwrap_or(default)
    };
    (
        Duration::from_secs(var("ISDP_FUZZ_SECONDS", 20)),
        var("ISDP_FUZZ_SEED", 1),
    )
}

fn fuzz(name: &str) {
    let target = targets::by_name(name).expect("target");
    assert!(
        !run::corpus(target).is_empty(),
        "{name}: no seeds in {}",
        run::corpus_dir(target).display()
    );
    let (time, seed) = budget();
    match run::run(target, time, None, seed) {
        Ok(report) => {
            assert!(report.runs > report.seeds as u64, "{name}: no mutation ran");
            println!(
                "{name}: {} inputs ({} seeds) in {:.1?}",
                report.runs, report.seeds, report.elapsed
            );
        }
        Err(crash) => panic!("{crash}"),
    }
}

#[test]
fn sidecar_config() {
    fuzz("sidecar_config");
}

#[test]
fn policy_document() {
    fuzz("policy_document");
}

#[test]
fn xds_resources() {
    fuzz("xds_resources");
}

#[test]
fn inbound_bytes() {
    fuzz("inbound_bytes");
}

#[test]
fn register_request() {
    fuzz("register_request");
}

/// The hand-written seeds are valid, so mutations start deep in each
/// parser rather than at its first refusal.
#[test]
fn text_seeds_are_valid() {
    use std::collections::BTreeMap;
    let dir = |t: &str| run::corpus_dir(targets::by_name(t).expect("target"));
    let config = std::fs::read_to_string(dir("sidecar_config").join("readme_example.toml"))
        .expect("config seed");
    isdp_sidecar::config::Config::from_toml(&config).expect("the config seed is valid");
    for file in ["readme_example.yaml", "json.json"] {
        let text = std::fs::read_to_string(dir("policy_document").join(file)).expect("seed");
        for doc in isdp_cli::yaml::documents(&text).expect("YAML") {
            let any = |_: &str, _: &BTreeMap<String, String>| true;
            isdp_control_plane::policy::document::parse(&doc, &any)
                .unwrap_or_else(|p| panic!("{file}: {p:?}"));
        }
    }
}

/// The inbound target's seeds reach the local service through every way
/// in (HTTP/1.1 and HTTP/2 over mTLS, a tunnel, the outbound listener's
/// refusal), so mutations start past the handshake rather than at it.
#[test]
fn inbound_seeds_reach_the_service() {
    use isdp_fuzz::targets::inbound_bytes::answer;
    let dir = run::corpus_dir(targets::by_name("inbound_bytes").expect("target"));
    let seed = |name: &str| std::fs::read(dir.join(name)).expect("seed");
    // Patient, unlike the fuzzing client: a loaded machine may take a
    // while to answer, and these answers are asserted.
    let quiet = Duration::from_secs(2);
    let text =
        |name: &str| String::from_utf8_lossy(&answer(&seed(name), quiet).expect(name)).into_owned();
    let http1 = text("http1_get");
    assert!(http1.starts_with("HTTP/1.1 200"), "{http1}");
    assert!(http1.ends_with("ok"), "{http1}");
    // HTTP/2 frames: the DATA frame carries the body.
    let h2 = answer(&seed("h2_get"), quiet).expect("h2");
    assert!(h2.windows(2).any(|w| w == b"ok"), "{h2:?}");
    assert!(
        text("tunnel").ends_with("ok"),
        "the tunnel reaches the backend"
    );
    // No endpoint for `orders`: the outbound listener answers itself.
    let outbound = text("outbound_get");
    assert!(outbound.starts_with("HTTP/1.1 503"), "{outbound}");
    // Plaintext on the mTLS port is closed without an answer.
    assert!(text("plaintext_on_inbound").is_empty());
}
