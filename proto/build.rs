//! Compiles the CSI spec, the node-agent service and the kubelet's plugin-registration
//! service with the vendored protoc, so
//! building needs no system protoc. The vendored include directory supplies the
//! well-known types csi.proto imports (descriptor, wrappers, timestamp).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;
    // SAFETY: the build script is single-threaded; nothing else reads the
    // environment concurrently. prost-build finds protoc through PROTOC.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let protos = [
        PathBuf::from("proto/csi.proto"),
        PathBuf::from("proto/agent.proto"),
        PathBuf::from("proto/pluginregistration.proto"),
    ];
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&protos, &[PathBuf::from("proto"), include])?;
    Ok(())
}
