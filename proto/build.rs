//! Compiles the protobuf definitions with protox (a pure-Rust protobuf
//! compiler), so building needs no system `protoc`:
//! - `isdp/v1/*.proto`, the project's own API, always, with its descriptor
//!   set written beside the code (`isdp_v1.fds`) so tests can walk every
//!   service and method;
//! - `etcd/api/**.proto`, etcd's v3 API, with the `etcd` feature (the
//!   control plane's etcd store and its tests). Clients only.

use protox::prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let isdp = [
        "isdp/v1/registry.proto",
        "isdp/v1/discovery.proto",
        "isdp/v1/sidecar.proto",
        "isdp/v1/status.proto",
        "isdp/v1/security.proto",
        "isdp/v1/policy.proto",
    ];
    for f in isdp {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(isdp, ["."])?;
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
    std::fs::write(out.join("isdp_v1.fds"), fds.encode_to_vec())?;
    // Every message implements `prost::Name`, with the type URL an xDS
    // `Any` carries (`type.googleapis.com/isdp.v1.X`): the xDS cache takes
    // typed resources and reads their type URL from it.
    let mut names = tonic_prost_build::Config::new();
    names
        .enable_type_names()
        .type_name_domain(["."], "type.googleapis.com");
    tonic_prost_build::configure()
        // Maps encode in key order, so equal content gives equal bytes: the
        // xDS engine versions resources by a hash of their encoding.
        .btree_map(".")
        .compile_fds_with_config(fds, names)?;

    if std::env::var_os("CARGO_FEATURE_ETCD").is_some() {
        let etcd = [
            "etcd/api/mvccpb/kv.proto",
            "etcd/api/authpb/auth.proto",
            "etcd/api/etcdserverpb/rpc.proto",
        ];
        println!("cargo:rerun-if-changed=etcd");
        tonic_prost_build::configure()
            .build_server(false)
            .compile_fds(protox::compile(etcd, ["."])?)?;
    }
    Ok(())
}
