//! Compiles `proto/tether/v1/*.proto` with protox (pure Rust): no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/tether/v1/device.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let mut config = prost_build::Config::new();
    // BTreeMap keeps the generated code usable without std.
    config.btree_map(["."]);
    config.compile_fds(fds)?;
    Ok(())
}
