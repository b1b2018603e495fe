//! Puts the board's memory layout (`memory/nrf52840.x`, embassy-boot's partitions) on the
//! linker search path as `memory.x` (kept out of the workspace root: the linker looks in
//! its working directory first, where the QEMU test must find its own), passes the cortex-m-rt and defmt linker scripts, and
//! copies the CA certificate named by `TETHER_CA_DER` (if any) for `src/config.rs`.

use std::env;
use std::fs;
use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    fs::write(out.join("memory.x"), include_bytes!("memory/nrf52840.x")).expect("write memory.x");
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rerun-if-changed=memory/nrf52840.x");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-link-arg-bins=--nmagic");
    println!("cargo:rustc-link-arg-bins=-Tlink.x");
    println!("cargo:rustc-link-arg-bins=-Tdefmt.x");

    let ca = match env::var_os("TETHER_CA_DER") {
        Some(path) => fs::read(&path).expect("TETHER_CA_DER names a readable DER file"),
        None => Vec::new(),
    };
    fs::write(out.join("ca.der"), ca).expect("write ca.der");
    // The firmware key's public half: 64 hex digits, or none (no updates).
    let key = match env::var("TETHER_FIRMWARE_KEY") {
        Ok(hex) => {
            let hex = hex.trim();
            assert!(
                hex.len() == 64,
                "TETHER_FIRMWARE_KEY must be 64 hex digits (tether admin firmware-key generate)"
            );
            (0..32)
                .map(|i| {
                    u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                        .expect("TETHER_FIRMWARE_KEY must be hex")
                })
                .collect()
        }
        Err(_) => Vec::new(),
    };
    fs::write(out.join("firmware_key.bin"), key).expect("write firmware_key.bin");
    for var in [
        "TETHER_CA_DER",
        "TETHER_URL",
        "TETHER_SERIAL",
        "TETHER_KEY_ID",
        "TETHER_DEFAULT_SECRET",
        "TETHER_TLS_INSECURE",
        "TETHER_FIRMWARE_KEY",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
}
