//! The workspace's binaries for tests: built with the cargo running the tests (a no-op when
//! up to date) and found by path, from cargo's JSON messages.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

/// Builds `bin` of workspace package `package` (debug profile; a no-op when it is up to
/// date) with the cargo running this process (`$CARGO`, else `cargo`) and returns its
/// path. For tests in other packages, where `CARGO_BIN_EXE_<bin>` does not exist.
pub fn cargo_binary(package: &str, bin: &str) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("test-support lives in the workspace")?;
    let mut command = std::process::Command::new(&cargo);
    // Cargo sets these for the test process itself; a nested cargo that inherits them
    // rebuilds build scripts that watch them (ring's watches CARGO_MANIFEST_DIR), and then
    // the next `cargo test` rebuilds them back: minutes per round trip on 2 cores.
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        let set_for_tests = [
            "CARGO_MANIFEST_",
            "CARGO_PKG_",
            "CARGO_CRATE_NAME",
            "CARGO_BIN_",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
            "CARGO_RUSTC_CURRENT_DIR",
            "OUT_DIR",
        ];
        if set_for_tests.iter().any(|p| k.starts_with(p)) {
            command.env_remove(&key);
        }
    }
    let out = command
        .current_dir(root)
        .args(["build", "-p", package, "--bin", bin])
        .arg("--message-format=json-render-diagnostics")
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running `{cargo} build -p {package}`"))?;
    if !out.status.success() {
        bail!(
            "`cargo build -p {package} --bin {bin}` failed ({})",
            out.status
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == bin)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("cargo built no `{bin}` executable"))
}

/// The `tether` binary under test: `$TETHER_BIN` when set, else built once per test
/// process with [`cargo_binary`]. Panics (failing the test loudly) when it cannot be built.
pub fn tether() -> &'static Path {
    static TETHER: OnceLock<PathBuf> = OnceLock::new();
    TETHER.get_or_init(|| match std::env::var_os("TETHER_BIN") {
        Some(path) => PathBuf::from(path),
        None => cargo_binary("tether-node", "tether")
            .unwrap_or_else(|e| panic!("cannot build the tether binary: {e:#}")),
    })
}
