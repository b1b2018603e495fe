//! Puts `memory.x` on the linker search path (the package is not built from its own
//! directory when CI calls it), passes the cortex-m-rt and defmt linker scripts, and
//! copies the CA certificate named by `TETHER_CA_DER` (if any) for `src/config.rs`.

use std::env;
use std::fs;
use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    fs::write(out.join("memory.x"), include_bytes!("memory.x")).expect("write memory.x");
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rerun-if-changed=memory.x");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-link-arg-bins=--nmagic");
    println!("cargo:rustc-link-arg-bins=-Tlink.x");
    println!("cargo:rustc-link-arg-bins=-Tdefmt.x");

    let ca = match env::var_os("TETHER_CA_DER") {
        Some(path) => fs::read(&path).expect("TETHER_CA_DER names a readable DER file"),
        None => Vec::new(),
    };
    fs::write(out.join("ca.der"), ca).expect("write ca.der");
    for var in [
        "TETHER_CA_DER",
        "TETHER_URL",
        "TETHER_SERIAL",
        "TETHER_KEY_ID",
        "TETHER_DEFAULT_SECRET",
        "TETHER_TLS_INSECURE",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
}
