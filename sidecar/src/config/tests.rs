use clap::Parser;

use super::*;

const EXAMPLE: &str = r#"
node_id = "web-1"
control_plane = ["http://127.0.0.1:15010"]
admin_listen = "127.0.0.1:15000"
address = "127.0.0.1"

[[service]]
name = "web"
port = 8080
protocol = "http"
check = "http://127.0.0.1:8080/healthz"
interval = "1s"
timeout = "1s"
rise = 1
fall = 1
weight = 1
metadata = { version = "v1", zone = "a" }

[[upstream]]
name = "payments"
listen = "127.0.0.1:9191"
protocol = "http"
"#;

fn err(text: &str) -> String {
    Config::from_toml(text).unwrap_err().to_string()
}

fn cli(args: &[&str]) -> Cli {
    let mut all = vec!["isdp-sidecar"];
    all.extend_from_slice(args);
    Cli::try_parse_from(all).unwrap()
}

#[test]
fn parses_the_documented_example() {
    let c = Config::from_toml(EXAMPLE).unwrap();
    assert_eq!(c.node_id, "web-1");
    assert_eq!(c.control_plane, vec!["http://127.0.0.1:15010"]);
    assert_eq!(c.admin_listen, "127.0.0.1:15000".parse().unwrap());
    assert_eq!(c.address, "127.0.0.1".parse::<IpAddr>().unwrap());
    assert_eq!(c.services.len(), 1);
    let s = &c.services[0];
    assert_eq!(
        (s.name.as_str(), s.port, s.protocol),
        ("web", 8080, Protocol::Http)
    );
    assert_eq!(
        s.check.as_ref().unwrap().to_string(),
        "http://127.0.0.1:8080/healthz"
    );
    assert_eq!(
        (s.interval, s.timeout),
        (Duration::from_secs(1), Duration::from_secs(1))
    );
    assert_eq!((s.rise, s.fall, s.weight), (1, 1, 1));
    assert_eq!(s.metadata["version"], "v1");
    assert_eq!(s.metadata["zone"], "a");
    assert!(s.check_spec().is_some());
    assert_eq!(
        c.upstreams,
        vec![Upstream {
            name: "payments".into(),
            listen: Some("127.0.0.1:9191".parse().unwrap()),
            protocol: Protocol::Http,
            lb: crate::balance::Algorithm::LoadAware,
            hash_key: None,
            locality: crate::balance::locality::LocalityConfig::default(),
            caller_zone: None,
        }]
    );
    assert_eq!(c.log_format, LogFormat::Text);
    assert_eq!(c.drain_timeout, DEFAULT_DRAIN_TIMEOUT);
}

#[test]
fn applies_defaults() {
    let c =
        Config::from_toml("node_id = \"n\"\nca_file = \"/ca.pem\"\njoin_token = \"t\"\n[[service]]\nname = \"db\"\nport = 5432\n").unwrap();
    assert_eq!(c.control_plane, vec![DEFAULT_CONTROL_PLANE]);
    assert_eq!(c.admin_listen, DEFAULT_ADMIN_LISTEN.parse().unwrap());
    assert_eq!(c.address, default_address());
    let s = &c.services[0];
    assert_eq!(s.check, None);
    assert!(s.check_spec().is_none());
    assert_eq!(
        (s.interval, s.timeout),
        (DEFAULT_CHECK_PERIOD, DEFAULT_CHECK_PERIOD)
    );
    assert_eq!((s.rise, s.fall, s.weight), (1, 1, 1));
    assert_eq!(s.priority, 0);
}

#[test]
fn node_id_defaults_to_hostname() {
    // The test machine has a hostname; the default must be non-empty.
    if hostname().is_some() {
        let text = "ca_file = \"/ca.pem\"\njoin_token = \"t\"";
        assert!(!Config::from_toml(text).unwrap().node_id.is_empty());
    }
    assert_eq!(err("node_id = \"  \""), "node_id: must not be empty");
}

#[test]
fn unknown_keys_are_named() {
    let e = err("node_id = \"n\"\nca_file = \"/ca.pem\"\njoin_token = \"t\"\nbogus = 1\n");
    assert!(e.contains("unknown field `bogus`"), "{e}");
    let e = err(
        "node_id = \"n\"\nca_file = \"/ca.pem\"\njoin_token = \"t\"\n[[service]]\nname = \"a\"\nport = 1\nhealth = \"x\"\n",
    );
    assert!(e.contains("unknown field `health`"), "{e}");
    let e = err(
        "node_id = \"n\"\nca_file = \"/ca.pem\"\njoin_token = \"t\"\n[[upstream]]\nname = \"a\"\nport = 1\n",
    );
    assert!(e.contains("unknown field `port`"), "{e}");
}

#[test]
fn validation_errors_name_the_field() {
    let svc = |body: &str| {
        err(&format!(
            "node_id = \"n\"\nca_file = \"/ca.pem\"\njoin_token = \"t\"\n[[service]]\n{body}\n"
        ))
    };
    assert_eq!(
        svc("name = \"web\"\nport = 0"),
        "service[0].port: must be 1..=65535, got 0"
    );
    assert_eq!(
        svc("name = \"web\"\nport = 70000"),
        "service[0].port: must be 1..=65535, got 70000"
    );
    for bad in ["Web", "-web", "web-", "", "w_b", &"a".repeat(64)] {
        let e = svc(&format!("name = {bad:?}\nport = 1"));
        assert!(e.starts_with("service[0].name: must be a DNS label"), "{e}");
    }
    let e = svc("name = \"web\"\nport = 1\ncheck = \"ftp://x:1\"");
    assert!(
        e.starts_with("service[0].check: invalid check target"),
        "{e}"
    );
    let e = svc("name = \"web\"\nport = 1\ninterval = \"soon\"");
    assert!(
        e.starts_with("service[0].interval: invalid duration"),
        "{e}"
    );
    let e = svc("name = \"web\"\nport = 1\ntimeout = \"0s\"");
    assert_eq!(e, "service[0].timeout: must be greater than 0");
    let e = svc("name = \"web\"\nport = 1\nweight = 10001");
    assert_eq!(e, "service[0].weight: must be 1..=10000, got 10001");
    let e = svc("name = \"web\"\nport = 1\npriority = 8");
    assert_eq!(e, "service[0].priority: must be 0..=7, got 8");
    let e = svc("name = \"web\"\nport = 1\npriority = -1");
    assert_eq!(e, "service[0].priority: must be 0..=7, got -1");

    let e = err(
        "node_id = \"n\"\nca_file = \"/ca.pem\"\njoin_token = \"t\"\n[[service]]\nname = \"a\"\nport = 1\n[[service]]\nname = \"a\"\nport = 2\n",
    );
    assert_eq!(
        e,
        "service[1].name: duplicate service name \"a\" (also service[0])"
    );
    let e = err(
        "node_id = \"n\"\nca_file = \"/ca.pem\"\njoin_token = \"t\"\n[[upstream]]\nname = \"p\"\n[[upstream]]\nname = \"p\"\n",
    );
    assert_eq!(
        e,
        "upstream[1].name: duplicate upstream name \"p\" (also upstream[0])"
    );
    let e = err(
        "node_id = \"n\"\nca_file = \"/ca.pem\"\njoin_token = \"t\"\n[[upstream]]\nname = \"P\"\n",
    );
    assert!(
        e.starts_with("upstream[0].name: must be a DNS label"),
        "{e}"
    );
    let e = err(
        "node_id = \"n\"\nca_file = \"/ca.pem\"\njoin_token = \"t\"\n[[upstream]]\nname = \"p\"\nlisten = \"nope\"\n",
    );
    assert!(e.starts_with("upstream[0].listen: invalid address"), "{e}");

    assert_eq!(
        err("node_id = \"n\"\nca_file = \"/ca.pem\"\njoin_token = \"t\"\ncontrol_plane = []"),
        "control_plane: at least one URL is required"
    );
    let e = err(
        "node_id = \"n\"\nca_file = \"/ca.pem\"\njoin_token = \"t\"\ncontrol_plane = [\"http://a:1\", \"grpc://b\"]",
    );
    assert!(
        e.starts_with("control_plane[1]: expected http://HOST:PORT"),
        "{e}"
    );
    let e = err(
        "node_id = \"n\"\nca_file = \"/ca.pem\"\njoin_token = \"t\"\nadmin_listen = \"localhost\"",
    );
    assert!(e.starts_with("admin_listen: invalid address"), "{e}");
    let e = err(
        "node_id = \"n\"\nca_file = \"/ca.pem\"\njoin_token = \"t\"\naddress = \"example.com\"",
    );
    assert!(e.starts_with("address: invalid IP address"), "{e}");
}

#[test]
fn flags_override_the_file() {
    let file = FileConfig::parse(EXAMPLE, "test").unwrap();
    let flags = cli(&[
        "--node-id",
        "web-2",
        "--control-plane",
        "http://10.0.0.1:15010,http://10.0.0.2:15010",
        "--control-plane",
        "http://10.0.0.3:15010",
        "--admin-listen",
        "127.0.0.1:0",
        "--address",
        "::1",
        "--service",
        "name=api,port=9090,protocol=grpc,check=grpc://127.0.0.1:9090/api,interval=500ms,rise=2,fall=3,weight=5,priority=2,meta.version=v2,meta.zone=b",
        "--service",
        "name=db,port=5432,check=tcp://127.0.0.1:5432",
        "--upstream",
        "name=orders,listen=127.0.0.1:9292,protocol=tcp",
        "--log-format",
        "json",
        "--drain-timeout",
        "2s",
    ]);
    let c = Config::from_parts(file, flags).unwrap();
    assert_eq!(c.node_id, "web-2");
    assert_eq!(c.control_plane.len(), 3);
    assert_eq!(c.control_plane[1], "http://10.0.0.2:15010");
    assert_eq!(c.admin_listen.port(), 0);
    assert_eq!(c.address, "::1".parse::<IpAddr>().unwrap());
    assert_eq!(c.services.len(), 2);
    let api = &c.services[0];
    assert_eq!(
        (api.name.as_str(), api.port, api.protocol),
        ("api", 9090, Protocol::Grpc)
    );
    assert_eq!(api.interval, Duration::from_millis(500));
    assert_eq!((api.rise, api.fall, api.weight), (2, 3, 5));
    assert_eq!((api.priority, c.services[1].priority), (2, 0));
    assert_eq!(api.metadata.get("zone").map(String::as_str), Some("b"));
    assert_eq!(
        c.services[1].check,
        Some(Target::Tcp("127.0.0.1:5432".into()))
    );
    assert_eq!(c.upstreams.len(), 1);
    assert_eq!(c.upstreams[0].protocol, Protocol::Tcp);
    assert_eq!(c.log_format, LogFormat::Json);
    assert_eq!(c.drain_timeout, Duration::from_secs(2));
}

#[test]
fn bad_flag_specs_are_named() {
    let parts = |args: &[&str]| {
        let args = [&["--ca-file", "/ca.pem", "--join-token", "t"], args].concat();
        Config::from_parts(FileConfig::default(), cli(&args))
            .unwrap_err()
            .to_string()
    };
    let e = parts(&["--node-id", "n", "--service", "name=web,port=80,colour=red"]);
    assert!(e.starts_with("service[0]: unknown field `colour`"), "{e}");
    let e = parts(&["--node-id", "n", "--service", "name=web,port=eighty"]);
    assert_eq!(e, "service[0].port: expected a number, got \"eighty\"");
    let e = parts(&["--node-id", "n", "--service", "name=web,port"]);
    assert_eq!(e, "service[0]: expected KEY=VALUE, got \"port\"");
    let e = parts(&["--node-id", "n", "--service", "name=web,port=0"]);
    assert_eq!(e, "service[0].port: must be 1..=65535, got 0");
    let e = parts(&["--node-id", "n", "--service", "port=80"]);
    assert!(e.contains("missing field `name`"), "{e}");
    let e = parts(&[
        "--node-id",
        "n",
        "--upstream",
        "name=a",
        "--upstream",
        "name=b,x=1",
    ]);
    assert!(e.starts_with("upstream[1]: unknown field `x`"), "{e}");
}

#[test]
fn load_reads_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.toml");
    std::fs::write(&path, EXAMPLE).unwrap();
    let c = Config::load(cli(&[
        "--config",
        path.to_str().unwrap(),
        "--admin-listen",
        "127.0.0.1:1",
    ]))
    .unwrap();
    assert_eq!(c.node_id, "web-1");
    assert_eq!(c.admin_listen.port(), 1);
    let missing = dir.path().join("missing.toml");
    let e = Config::load(cli(&["--config", missing.to_str().unwrap()])).unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }), "{e}");
}

#[test]
fn upstream_balancing_is_parsed_and_checked() {
    let c = Config::from_toml(
        "node_id = \"n\"\nidentity = \"cli\"\nca_file = \"/ca.pem\"\njoin_token = \"t\"\n[[upstream]]\nname = \"pay\"\nlb = \"maglev\"\nhash_key = \"header:x-user\"\n",
    )
    .unwrap();
    assert_eq!(c.upstreams[0].lb, crate::balance::Algorithm::Maglev);
    assert!(c.upstreams[0].hash_key.is_some());
    let err =
        Config::from_toml("node_id = \"n\"\nca_file = \"/ca.pem\"\njoin_token = \"t\"\n[[upstream]]\nname = \"pay\"\nlb = \"fastest\"\n")
            .unwrap_err()
            .to_string();
    assert!(err.starts_with("upstream[0].lb:"), "{err}");
    let err = Config::from_toml(
        "node_id = \"n\"\nca_file = \"/ca.pem\"\njoin_token = \"t\"\n[[upstream]]\nname = \"pay\"\nhash_key = \"header:x\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("ring_hash"), "{err}");
}

#[test]
fn listeners_default_to_the_advertised_address_and_15001() {
    let c = Config::from_toml(
        "node_id = \"n\"\nca_file = \"/ca.pem\"\njoin_token = \"t\"\naddress = \"127.0.0.2\"\n",
    )
    .unwrap();
    assert_eq!(c.inbound_listen, "127.0.0.2:15006".parse().unwrap());
    assert_eq!(c.outbound_listen, "127.0.0.1:15001".parse().unwrap());
    let err = Config::from_toml(
        "node_id = \"n\"\nca_file = \"/ca.pem\"\njoin_token = \"t\"\ninbound_listen = \"nope\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.starts_with("inbound_listen:"), "{err}");
}

#[test]
fn identity_defaults_to_the_first_service_and_is_required_for_upstreams() {
    let c = Config::from_toml(
        "node_id = \"n\"\nca_file = \"/ca.pem\"\njoin_token = \"t\"\n[[service]]\nname = \"web\"\nport = 1\n[[service]]\nname = \"api\"\nport = 2\n",
    )
    .unwrap();
    assert_eq!(c.identity.as_deref(), Some("web"));
    let c =
        Config::from_toml("node_id = \"n\"\nca_file = \"/ca.pem\"\njoin_token = \"t\"").unwrap();
    assert_eq!(
        c.identity, None,
        "no services, no upstreams: nothing to certify"
    );
    let err = Config::from_toml("node_id = \"n\"\nca_file = \"/ca.pem\"\njoin_token = \"t\"\n[[upstream]]\nname = \"pay\"\n").unwrap_err();
    assert!(err.to_string().contains("identity"), "{err}");
    let c = Config::load(cli(&[
        "--node-id",
        "n",
        "--upstream",
        "name=pay",
        "--identity",
        "batch",
        "--ca-file",
        "/ca.pem",
        "--join-token",
        "t",
    ]))
    .unwrap();
    assert_eq!(c.identity.as_deref(), Some("batch"));
    let err = Config::from_toml(
        "node_id = \"n\"\nca_file = \"/ca.pem\"\njoin_token = \"t\"\nidentity = \"Not A Label\"\n",
    )
    .unwrap_err();
    assert!(err.to_string().contains("identity"), "{err}");
}

#[test]
fn https_control_plane_needs_a_ca_file_and_a_join_token() {
    let e = err("node_id = \"m\"\ncontrol_plane = [\"https://cp:15010\"]\njoin_token = \"t\"");
    assert!(e.starts_with("ca_file: required"), "{e}");
    let e = err("node_id = \"m\"\ncontrol_plane = [\"https://cp:15010\"]\nca_file = \"/ca.pem\"");
    assert!(e.starts_with("join_token: required"), "{e}");
    let c = Config::from_toml("node_id = \"m\"\ncontrol_plane = [\"http://cp:15010\"]").unwrap();
    assert_eq!(c.join_token, None);
    let cli = Cli::parse_from([
        "isdp-sidecar",
        "--node-id=m",
        "--ca-file=/x/ca.pem",
        "--join-token=isdp_abc",
    ]);
    let c = Config::from_parts(FileConfig::default(), cli).unwrap();
    assert_eq!(c.control_plane, vec![DEFAULT_CONTROL_PLANE]);
    assert_eq!(c.join_token.as_deref(), Some("isdp_abc"));
}

/// The xDS relay is off unless `xds_relay_listen` is set; loopback
/// addresses (IPv4, IPv6, IPv4-mapped) and absolute unix socket paths are
/// taken, with 64 streams unless `xds_relay_max_streams` says otherwise.
#[test]
fn the_xds_relay_is_off_by_default_and_takes_loopback_or_a_unix_socket() {
    let base = "node_id = \"n\"\nca_file = \"/ca.pem\"\njoin_token = \"t\"\n";
    assert_eq!(Config::from_toml(base).unwrap().xds_relay, None);
    let relay = |keys: &str| {
        Config::from_toml(&format!("{base}{keys}"))
            .unwrap()
            .xds_relay
            .expect("the relay is on")
    };
    for (text, listen) in [
        ("127.0.0.1:15002", "127.0.0.1:15002"),
        ("127.9.9.9:0", "127.9.9.9:0"),
        ("[::1]:15002", "[::1]:15002"),
        ("[::ffff:127.0.0.1]:15002", "[::ffff:127.0.0.1]:15002"),
        (" unix:/run/isdp/xds.sock ", "unix:/run/isdp/xds.sock"),
    ] {
        let r = relay(&format!("xds_relay_listen = {text:?}"));
        assert_eq!(r.listen.to_string(), listen);
        assert_eq!(r.max_streams, DEFAULT_RELAY_MAX_STREAMS);
    }
    assert_eq!(
        relay("xds_relay_listen = \"unix:/run/x.sock\"").listen,
        RelayListen::Unix("/run/x.sock".into())
    );
    let r = relay("xds_relay_listen = \"127.0.0.1:0\"\nxds_relay_max_streams = 8");
    assert_eq!(r.max_streams, 8);
    assert_eq!(
        relay("xds_relay_listen = \"127.0.0.1:0\"\nxds_relay_max_streams = 1024").max_streams,
        MAX_RELAY_MAX_STREAMS
    );
}

/// A relay anyone but the host could reach is refused at startup with the
/// key and the reason; so are malformed addresses and unix paths, a bad
/// stream cap, and a stream cap without a relay.
#[test]
fn a_relay_others_could_reach_is_refused_naming_the_key_and_why() {
    let base = "node_id = \"n\"\nca_file = \"/ca.pem\"\njoin_token = \"t\"\n";
    let listen = |text: &str| err(&format!("{base}xds_relay_listen = {text:?}"));
    for open in [
        "0.0.0.0:15002",
        "10.0.0.1:15002",
        "192.168.1.20:15002",
        "[::]:15002",
        "[fe80::1]:15002",
        "[::ffff:10.0.0.1]:15002",
    ] {
        let e = listen(open);
        assert!(
            e.starts_with("xds_relay_listen: must be a loopback address"),
            "{open}: {e}"
        );
        assert!(
            e.contains("reads the mesh with this sidecar's credentials"),
            "{open}: {e}"
        );
    }
    for bad in ["localhost:15002", "127.0.0.1", "", "tcp://127.0.0.1:1"] {
        let e = listen(bad);
        assert!(
            e.starts_with("xds_relay_listen: invalid address") && e.contains("unix:/PATH"),
            "{bad}: {e}"
        );
    }
    let e = listen("unix:run/xds.sock");
    assert!(
        e.starts_with("xds_relay_listen: a unix socket needs an absolute path"),
        "{e}"
    );
    let e = listen(&format!("unix:/{}", "a".repeat(120)));
    assert!(e.contains("at most 107 bytes"), "{e}");
    let e = listen("unix:/run/isdp/");
    assert!(e.contains("must name a file"), "{e}");

    for n in [0u64, 1025, 1 << 40] {
        assert_eq!(
            err(&format!(
                "{base}xds_relay_listen = \"127.0.0.1:0\"\nxds_relay_max_streams = {n}"
            )),
            format!("xds_relay_max_streams: must be 1..=1024, got {n}")
        );
    }
    assert_eq!(
        err(&format!("{base}xds_relay_max_streams = 8")),
        "xds_relay_max_streams: set without xds_relay_listen: the relay is off"
    );
}

/// `--xds-relay-listen` and `--xds-relay-max-streams` override the file,
/// and are checked alike.
#[test]
fn relay_flags_override_the_file() {
    let file = FileConfig::parse(
        "node_id = \"n\"\nca_file = \"/ca.pem\"\njoin_token = \"t\"\n\
         xds_relay_listen = \"127.0.0.1:1\"\nxds_relay_max_streams = 2\n",
        "test",
    )
    .unwrap();
    let c = Config::from_parts(
        file,
        cli(&[
            "--xds-relay-listen",
            "[::1]:15002",
            "--xds-relay-max-streams",
            "16",
        ]),
    )
    .unwrap();
    assert_eq!(
        c.xds_relay,
        Some(XdsRelay {
            listen: RelayListen::Tcp("[::1]:15002".parse().unwrap()),
            max_streams: 16,
        })
    );
    let e = Config::from_parts(
        FileConfig::parse(
            "node_id = \"n\"\nca_file = \"/ca.pem\"\njoin_token = \"t\"",
            "t",
        )
        .unwrap(),
        cli(&["--xds-relay-listen", "0.0.0.0:15002"]),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("xds_relay_listen: must be a loopback address"),
        "{e}"
    );
}

/// Without a `[limits]` table every bound has its default: 10,000
/// connections per data-plane listener, 64 on the admin listener, 1024
/// handshakes at once, 10 s for a head, 5 min idle, 1 h for a silent
/// stream, and hyper's HTTP/2 bounds made explicit.
#[test]
fn limits_default_to_bounds_a_busy_service_does_not_meet() {
    let l = Config::from_toml(EXAMPLE).unwrap().limits;
    assert_eq!(l, Limits::default());
    assert_eq!(
        (
            l.max_connections,
            l.admin_max_connections,
            l.max_tls_handshakes
        ),
        (10_000, 64, 1024)
    );
    assert_eq!(
        (
            l.header_read_timeout,
            l.http_idle_timeout,
            l.tcp_idle_timeout
        ),
        (
            Duration::from_secs(10),
            Duration::from_secs(300),
            Duration::from_secs(3600)
        )
    );
    let h2 = &l.http2;
    assert_eq!(
        (
            h2.max_concurrent_streams,
            h2.max_header_list_size,
            h2.max_pending_accept_reset_streams,
            h2.max_local_error_reset_streams
        ),
        (200, 16384, 20, 1024)
    );
    assert_eq!(
        (h2.keepalive_interval, h2.keepalive_timeout),
        (Duration::from_secs(30), Duration::from_secs(10))
    );
    // The handshake cap follows a lower connection cap rather than
    // exceed it.
    let low = Config::from_toml(&format!("{EXAMPLE}\n[limits]\nmax_connections = 100\n"))
        .unwrap()
        .limits;
    assert_eq!((low.max_connections, low.max_tls_handshakes), (100, 100));
}

/// Every key of `[limits]` is read from the file, and its flag wins.
#[test]
fn limits_come_from_the_table_and_flags_win() {
    let file = FileConfig::parse(
        &format!(
            "{EXAMPLE}\n[limits]\nmax_connections = 500\nadmin_max_connections = 8\n\
             max_tls_handshakes = 50\nheader_read_timeout = \"2s\"\nhttp_idle_timeout = \"1m\"\n\
             tcp_idle_timeout = \"10m\"\nhttp2_max_concurrent_streams = 64\n\
             http2_max_header_list_size = 32768\nhttp2_max_pending_accept_reset_streams = 5\n\
             http2_max_local_error_reset_streams = 100\nhttp2_keepalive_interval = \"20s\"\n\
             http2_keepalive_timeout = \"3s\"\n"
        ),
        "test",
    )
    .unwrap();
    let from_file = Config::from_parts(file, Cli::default()).unwrap().limits;
    assert_eq!(
        from_file,
        Limits {
            max_connections: 500,
            admin_max_connections: 8,
            max_tls_handshakes: 50,
            header_read_timeout: Duration::from_secs(2),
            http_idle_timeout: Duration::from_secs(60),
            tcp_idle_timeout: Duration::from_secs(600),
            http2: Http2Limits {
                max_concurrent_streams: 64,
                max_header_list_size: 32768,
                max_pending_accept_reset_streams: 5,
                max_local_error_reset_streams: 100,
                keepalive_interval: Duration::from_secs(20),
                keepalive_timeout: Duration::from_secs(3),
            },
        }
    );
    let file = FileConfig::parse(
        &format!("{EXAMPLE}\n[limits]\nmax_connections = 500\nheader_read_timeout = \"2s\"\n"),
        "test",
    )
    .unwrap();
    let flags = cli(&[
        "--max-connections",
        "7",
        "--admin-max-connections",
        "3",
        "--max-tls-handshakes",
        "2",
        "--header-read-timeout",
        "1s",
        "--http-idle-timeout",
        "4s",
        "--tcp-idle-timeout",
        "5s",
        "--http2-max-concurrent-streams",
        "9",
        "--http2-max-header-list-size",
        "2048",
        "--http2-max-pending-accept-reset-streams",
        "4",
        "--http2-max-local-error-reset-streams",
        "6",
        "--http2-keepalive-interval",
        "7s",
        "--http2-keepalive-timeout",
        "2s",
    ]);
    let l = Config::from_parts(file, flags).unwrap().limits;
    assert_eq!(
        (
            l.max_connections,
            l.admin_max_connections,
            l.max_tls_handshakes
        ),
        (7, 3, 2)
    );
    assert_eq!(
        (
            l.header_read_timeout,
            l.http_idle_timeout,
            l.tcp_idle_timeout
        ),
        (
            Duration::from_secs(1),
            Duration::from_secs(4),
            Duration::from_secs(5)
        )
    );
    assert_eq!(
        l.http2,
        Http2Limits {
            max_concurrent_streams: 9,
            max_header_list_size: 2048,
            max_pending_accept_reset_streams: 4,
            max_local_error_reset_streams: 6,
            keepalive_interval: Duration::from_secs(7),
            keepalive_timeout: Duration::from_secs(2),
        }
    );
}

/// A bad limit is refused at startup naming its key and the bound.
#[test]
fn bad_limits_name_the_key() {
    let limit = |body: &str| err(&format!("{EXAMPLE}\n[limits]\n{body}\n"));
    for (body, expected) in [
        (
            "max_connections = 0",
            "limits.max_connections: must be 1..=1048576, got 0",
        ),
        (
            "max_connections = 2000000",
            "limits.max_connections: must be 1..=1048576, got 2000000",
        ),
        (
            "admin_max_connections = 0",
            "limits.admin_max_connections: must be 1..=1048576, got 0",
        ),
        (
            "max_connections = 10\nmax_tls_handshakes = 11",
            "limits.max_tls_handshakes: must be 1..=10 (limits.max_connections: a handshake holds one of its places), got 11",
        ),
        (
            "max_tls_handshakes = 0",
            "limits.max_tls_handshakes: must be 1..=10000 (limits.max_connections: a handshake holds one of its places), got 0",
        ),
        (
            "header_read_timeout = \"0s\"",
            "limits.header_read_timeout: must be greater than 0",
        ),
        (
            "http_idle_timeout = \"0s\"",
            "limits.http_idle_timeout: must be greater than 0",
        ),
        (
            "tcp_idle_timeout = \"0s\"",
            "limits.tcp_idle_timeout: must be greater than 0",
        ),
        (
            "http2_max_concurrent_streams = 0",
            "limits.http2_max_concurrent_streams: must be 1..=4294967295, got 0",
        ),
        (
            "http2_max_header_list_size = 100",
            "limits.http2_max_header_list_size: must be 1024..=8388608, got 100",
        ),
        (
            "http2_max_pending_accept_reset_streams = 0",
            "limits.http2_max_pending_accept_reset_streams: must be 1..=1048576, got 0",
        ),
        (
            "http2_max_local_error_reset_streams = 0",
            "limits.http2_max_local_error_reset_streams: must be 1..=1048576, got 0",
        ),
        (
            "http2_keepalive_interval = \"0s\"",
            "limits.http2_keepalive_interval: must be greater than 0",
        ),
        (
            "http2_keepalive_timeout = \"0s\"",
            "limits.http2_keepalive_timeout: must be greater than 0",
        ),
    ] {
        assert_eq!(limit(body), expected, "{body}");
    }
    let e = limit("header_read_timeout = \"soon\"");
    assert!(
        e.starts_with("limits.header_read_timeout: invalid duration \"soon\""),
        "{e}"
    );
    assert_eq!(
        limit("max_connections = -1"),
        "limits.max_connections: must be 1..=1048576, got -1"
    );
    let e = limit("max_conections = 5");
    assert!(e.contains("unknown field `max_conections`"), "{e}");
    // A flag is checked the same way.
    let e = Config::from_parts(
        FileConfig::parse(EXAMPLE, "test").unwrap(),
        cli(&["--max-connections", "0"]),
    )
    .unwrap_err()
    .to_string();
    assert_eq!(e, "limits.max_connections: must be 1..=1048576, got 0");
}

#[test]
fn zone_and_upstream_locality_are_parsed_and_checked() {
    let base = "node_id = \"n\"\nidentity = \"cli\"\nca_file = \"/ca.pem\"\njoin_token = \"t\"\n";
    let c = Config::from_toml(&format!(
        "{base}zone = \"zone-a\"\n[[upstream]]\nname = \"pay\"\nfailover = [\"zone-c\", \"zone-b\"]\noverprovisioning_percent = 200\n[[upstream]]\nname = \"web\"\nlocality = false\n"
    ))
    .unwrap();
    assert_eq!(c.zone.as_deref(), Some("zone-a"));
    let pay = &c.upstreams[0];
    assert_eq!(pay.caller_zone.as_deref(), Some("zone-a"));
    assert!(pay.locality.enabled);
    assert_eq!(pay.locality.failover, ["zone-c", "zone-b"]);
    assert_eq!(pay.locality.overprovisioning, 200);
    assert!(!c.upstreams[1].locality.enabled);
    assert_eq!(c.upstreams[1].locality.overprovisioning, 140);

    // Without a zone nothing changes.
    let c = Config::from_toml(&format!("{base}[[upstream]]\nname = \"pay\"\n")).unwrap();
    assert_eq!(c.zone, None);
    assert_eq!(c.upstreams[0].caller_zone, None);

    // The flag SPEC takes the same keys as strings.
    let c = Config::from_parts(
        FileConfig::parse(base, "config").unwrap(),
        cli(&[
            "--zone",
            "zone-a",
            "--upstream",
            "name=pay,locality=on,failover=zone-b zone-c,overprovisioning_percent=100",
        ]),
    )
    .unwrap();
    assert_eq!(c.upstreams[0].locality.failover, ["zone-b", "zone-c"]);
    assert_eq!(c.upstreams[0].locality.overprovisioning, 100);

    for (extra, field) in [
        ("zone = \"Zone_A\"\n", "zone:"),
        ("zone = \"a-\"\n", "zone:"),
        (
            "[[upstream]]\nname = \"pay\"\nfailover = [\"b\", \"B\"]\n",
            "upstream[0].failover:",
        ),
        (
            "[[upstream]]\nname = \"pay\"\nfailover = [\"b\", \"b\"]\n",
            "upstream[0].failover:",
        ),
        (
            "[[upstream]]\nname = \"pay\"\noverprovisioning_percent = 99\n",
            "upstream[0].overprovisioning_percent: must be 100..=1000",
        ),
        (
            "[[upstream]]\nname = \"pay\"\nlocality = \"maybe\"\n",
            "upstream[0].locality:",
        ),
    ] {
        let e = err(&format!("{base}{extra}"));
        assert!(e.starts_with(field), "{extra}: {e}");
    }
}
