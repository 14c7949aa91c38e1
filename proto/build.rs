//! Generates the CloudEvents gRPC types with a pure-Rust protobuf compiler
//! (`protox`), so building spokelet never needs a system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/cloudevent.proto";
    println!("cargo:rerun-if-changed={proto}");
    // protox ships the well-known types (Any, Empty, Timestamp) itself.
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
