//! Compiles `isdp/v1/*.proto` with protox (a pure-Rust protobuf compiler), so
//! building needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "isdp/v1/registry.proto",
        "isdp/v1/discovery.proto",
        "isdp/v1/sidecar.proto",
        "isdp/v1/status.proto",
        "isdp/v1/security.proto",
        "isdp/v1/policy.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    tonic_prost_build::configure()
        // Maps encode in key order, so equal content gives equal bytes: the
        // xDS engine versions resources by a hash of their encoding.
        .btree_map(".")
        .compile_fds(fds)?;
    Ok(())
}
