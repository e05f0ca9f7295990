//! Compiles `proto/echo.proto` with protox (pure Rust, no system `protoc`),
//! as `proto/build.rs` does for the project's own protos.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let file = "proto/echo.proto";
    println!("cargo:rerun-if-changed={file}");
    let fds = protox::compile([file], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
