//! The sidecar's TOML file (`--config`), validated into its `Config`, and
//! the `--service` / `--upstream` flag specs (the input's first line),
//! which are parsed into the same tables.

use isdp_sidecar::config::{Config, ServiceSpec, UpstreamSpec};

use super::Target;

pub const TARGET: Target = Target {
    name: "sidecar_config",
    run,
    dictionary: &[
        b"[[service]]\n",
        b"[[upstream]]\n",
        b"[limits]\n",
        b"[xds_relay]\n",
        b"name = ",
        b"port = ",
        b"listen = ",
        b"protocol = ",
        b"check = ",
        b"interval = ",
        b"timeout = ",
        b"weight = ",
        b"metadata = ",
        b"\"1s\"",
        b"\"0s\"",
        b"\"18446744073709551615s\"",
        b"\"http://127.0.0.1:0/\"",
        b"\"tcp://127.0.0.1:1\"",
        b"\"127.0.0.1:0\"",
        b"\"[::1]:65535\"",
        b"\"grpc\"",
        b"\"tcp\"",
        b"\"http\"",
        b"65536",
        b"-1",
        b"{ a = \"b\" }",
        b"max_connections = ",
        b"header_read_timeout = ",
        b"control_plane = [",
    ],
    seeds: super::no_seeds,
};

pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::from_toml(text) {
        for s in &config.services {
            let _ = s.check_spec();
        }
    }
    let first = text.lines().next().unwrap_or_default();
    let _ = ServiceSpec::from_flag(first, 0);
    let _ = UpstreamSpec::from_flag(first, 0);
}
