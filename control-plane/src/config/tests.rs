use clap::Parser;

use super::Config;

fn check(args: &[&str]) -> Result<(), String> {
    let mut all = vec!["isdp-control-plane"];
    all.extend_from_slice(args);
    Config::try_parse_from(all).unwrap().validate()
}

#[test]
fn quota_flags_default_and_parse() {
    let c = Config::try_parse_from(["isdp-control-plane"]).unwrap();
    assert_eq!(c.quotas(), crate::registry::Quotas::default());
    let c = Config::try_parse_from([
        "isdp-control-plane",
        "--max-instances-per-service=10",
        "--max-metadata-bytes-per-instance=11",
        "--max-metadata-bytes-per-service=12",
        "--max-service-endpoints-bytes=13",
        "--max-instances-per-session=14",
        "--max-sessions-per-principal=15",
    ])
    .unwrap();
    let q = c.quotas();
    assert_eq!(
        (
            q.instances_per_service,
            q.metadata_bytes_per_instance,
            q.metadata_bytes_per_service,
            q.service_endpoints_bytes,
            q.instances_per_session,
            q.sessions_per_principal
        ),
        (10, 11, 12, 13, 14, 15)
    );
    assert!(c.validate().is_ok());
    assert!(check(&["--max-service-endpoints-bytes=8388608"]).is_ok());
}

#[test]
fn stream_limit_flags_default_parse_and_are_at_least_one() {
    let c = Config::try_parse_from(["isdp-control-plane"]).unwrap();
    assert_eq!(c.xds_limits(), isdp_xds::Limits::default());
    assert_eq!(c.xds_limits().names_per_stream, 4096);
    assert_eq!(c.max_streams_per_principal, 1000);
    let c = Config::try_parse_from([
        "isdp-control-plane",
        "--xds-max-names-per-stream=7",
        "--max-streams-per-principal=8",
    ])
    .unwrap();
    assert_eq!(
        (c.xds_limits().names_per_stream, c.max_streams_per_principal),
        (7, 8)
    );
    assert_eq!(c.xds_max_name_bytes_per_principal, 16 << 20);
    let c = Config::try_parse_from([
        "isdp-control-plane",
        "--xds-max-name-bytes-per-principal=4096",
    ])
    .unwrap();
    assert_eq!(c.xds_max_name_bytes_per_principal, 4096);
    assert!(
        Config::try_parse_from(["isdp-control-plane", "--xds-max-streams-per-principal=8"])
            .is_err(),
        "the ADS-only flag is gone"
    );
    for flag in [
        "--xds-max-names-per-stream",
        "--max-streams-per-principal",
        "--xds-max-name-bytes-per-principal",
    ] {
        let err = check(&[&format!("{flag}=0")]).unwrap_err();
        assert_eq!(err, format!("{flag} must be at least 1"));
    }
}

#[test]
fn etcd_flags_are_checked_and_errors_name_the_flag() {
    assert!(check(&[]).is_ok());
    let ep = "--etcd-endpoints=http://127.0.0.1:2379,http://127.0.0.1:2479";
    assert!(check(&["--store=etcd", ep, "--kek-file=/kek"]).is_ok());
    let cases: &[(&[&str], &str)] = &[
        (&["--store=etcd"], "--store etcd needs --etcd-endpoints"),
        (&[ep], "--etcd-endpoints needs --store etcd"),
        (
            &["--store=etcd", "--etcd-endpoints=127.0.0.1:2379"],
            "--etcd-endpoints: \"127.0.0.1:2379\"",
        ),
        (&["--store=etcd", ep, "--etcd-prefix=isdp"], "--etcd-prefix"),
        (
            &["--store=etcd", ep, "--etcd-ca-file=/ca.pem"],
            "need https://",
        ),
        (
            &[
                "--store=etcd",
                "--etcd-endpoints=https://e:2379",
                "--etcd-ca-file=/ca.pem",
                "--etcd-cert-file=/c.pem",
            ],
            "--etcd-key-file go together",
        ),
        (
            &["--store=etcd", "--etcd-endpoints=https://e:2379"],
            "need --etcd-ca-file",
        ),
        (
            &["--store=etcd", ep, "--etcd-username=u"],
            "--etcd-password",
        ),
        (&["--store=etcd", ep, "--leader-lease=1s"], "--leader-lease"),
        (&["--trust-domain=Bad_Domain"], "--trust-domain"),
        (&["--cert-lifetime=1s"], "--cert-lifetime"),
        (&["--cert-lifetime=40days"], "--cert-lifetime"),
        (&["--ca-cert=/ca.pem"], "--ca-key go together"),
        (
            &["--store=etcd", ep],
            "--store etcd needs a key-encryption key",
        ),
        (
            &["--previous-kek-file=/old"],
            "--previous-kek-file / ISDP_PREVIOUS_KEK needs the new KEK",
        ),
        (
            &["--max-instances-per-service=0"],
            "--max-instances-per-service must be at least 1",
        ),
        (
            &["--max-sessions-per-principal=0"],
            "--max-sessions-per-principal must be at least 1",
        ),
        (
            &["--max-service-endpoints-bytes=8388609"],
            "--max-service-endpoints-bytes (8388609) must be at most 8388608",
        ),
    ];
    for (args, want) in cases {
        let err = check(args).unwrap_err();
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn keks_come_once_from_a_file_or_the_environment() {
    let parse = |args: &[&str]| {
        let mut all = vec!["isdp-control-plane"];
        all.extend_from_slice(args);
        Config::try_parse_from(all).unwrap()
    };
    let mut c = parse(&["--kek-file=/kek"]);
    c.kek = Some(super::EnvSecret("a2V5".into()));
    let err = c.validate().unwrap_err();
    assert!(
        err.contains("--kek-file (ISDP_KEK_FILE) or ISDP_KEK"),
        "{err}"
    );
    let mut c = parse(&["--kek-file=/kek", "--previous-kek-file=/old"]);
    c.previous_kek = Some(super::EnvSecret("a2V5".into()));
    let err = c.validate().unwrap_err();
    assert!(
        err.contains("--previous-kek-file (ISDP_PREVIOUS_KEK_FILE)"),
        "{err}"
    );
    // The variable alone is a KEK for etcd, and never shows in Debug.
    let mut c = parse(&["--store=etcd", "--etcd-endpoints=http://e:2379"]);
    c.kek = Some(super::EnvSecret("c2VjcmV0LXZhbHVl".into()));
    c.validate().unwrap();
    assert!(!format!("{c:?}").contains("c2VjcmV0LXZhbHVl"));
    assert!(!format!("{:?}", c.kek_sources()).contains("c2VjcmV0LXZhbHVl"));
    // There is no flag that takes the key itself.
    assert!(Config::try_parse_from(["isdp-control-plane", "--kek=abc"]).is_err());
}

#[test]
fn load_weight_flags_default_parse_and_are_bounded() {
    let c = Config::try_parse_from(["isdp-control-plane"]).unwrap();
    assert_eq!(c.load.weight_config(), crate::load::WeightConfig::default());
    let c = Config::try_parse_from([
        "isdp-control-plane",
        "--load-weights=false",
        "--load-weight-blackout=3s",
        "--load-weight-error-penalty=2",
        "--load-weight-min-factor=0.5",
        "--load-weight-max-factor=4",
    ])
    .unwrap();
    let w = c.load.weight_config();
    assert!(!w.enabled);
    assert_eq!(w.blackout, std::time::Duration::from_secs(3));
    assert_eq!(
        (w.error_penalty, w.min_factor, w.max_factor),
        (2.0, 0.5, 4.0)
    );
    for (arg, flag) in [
        (
            "--load-weight-blackout=2h",
            "--load-weight-blackout must be at most 1h",
        ),
        (
            "--load-weight-error-penalty=-1",
            "--load-weight-error-penalty must be",
        ),
        (
            "--load-weight-error-penalty=NaN",
            "--load-weight-error-penalty must be",
        ),
        (
            "--load-weight-min-factor=0",
            "--load-weight-min-factor must be a number 0.001..=1",
        ),
        (
            "--load-weight-min-factor=2",
            "--load-weight-min-factor must be",
        ),
        (
            "--load-weight-max-factor=0.5",
            "--load-weight-max-factor must be a number 1..=1000",
        ),
    ] {
        let e = check(&[arg]).unwrap_err();
        assert!(e.starts_with(flag), "{arg}: {e}");
    }
}
