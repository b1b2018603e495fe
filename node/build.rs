//! Compiles `proto/forward.proto` (node-to-node forwarding) with protox (pure Rust): no
//! system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/forward.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .bytes(".")
        // Small starting buffers instead of tonic's 8 KiB (src/routing/codec.rs).
        .codec_path("crate::routing::codec::SmallBufferCodec")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
